"""Shared fixtures. Every broker here is a private Mosquitto on a free loopback port."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from simulator.mosquitto import MosquittoBroker

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CORPUS = SHARED / "corpus"
CORPUS_ENV = "ADDIN_CORPUS"
"""Names another corpus folder (the one holding manifests/real) instead of ../shared/corpus."""


def corpus_root() -> Path:
    return Path(os.environ[CORPUS_ENV]) if os.environ.get(CORPUS_ENV) else CORPUS


def corpus_missing_reason(path: Path) -> str:
    """The skip reason of every corpus test: what the corpus is and where it goes."""
    return (
        "needs the published-manifest corpus (297 Office add-in manifests from Microsoft's "
        "OfficeDev GitHub repositories, kept outside this repository; see docs/conformance.md): "
        f"none at {path}; put it at ../shared/corpus next to this checkout, or set "
        f"{CORPUS_ENV}=DIR (the folder holding manifests/real)"
    )


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[Callable[..., MosquittoBroker]]:
    """Make brokers with options (password_file, acl_file, persistence, port...); all are
    killed after the test."""
    made: list[MosquittoBroker] = []

    def make(start: bool = True, **options: Any) -> MosquittoBroker:
        b = MosquittoBroker(tmp_path / f"broker{len(made)}", **options)
        made.append(b)
        if start:
            b.start()
        return b

    yield make
    for b in made:
        b.kill()


@pytest.fixture
def broker(broker_factory: Callable[..., MosquittoBroker]) -> MosquittoBroker:
    """A running anonymous broker without persistence."""
    return broker_factory()


@pytest.fixture
def corpus_dir() -> Path:
    path = corpus_root() / "manifests" / "real"
    if not path.is_dir():
        pytest.skip(corpus_missing_reason(path))
    return path

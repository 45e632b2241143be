"""Shared fixtures. Every broker here is a private Mosquitto on a free loopback port."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from simulator.mosquitto import MosquittoBroker

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CORPUS = SHARED / "corpus"


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
    path = CORPUS / "manifests" / "real"
    if not path.is_dir():
        pytest.skip(
            f"the manifest corpus is absent (expected ../shared/corpus next to the repo: {path})"
        )
    return path

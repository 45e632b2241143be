"""Installing the project prints no setuptools deprecation warning about its metadata."""

from __future__ import annotations

import tomllib
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_pyproject_metadata_applies_without_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    monkeypatch.chdir(REPO)  # setuptools finds the readme and packages from here
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), REPO / "pyproject.toml")
    assert [str(w.message) for w in caught if "license" in str(w.message).lower()] == []
    assert dist.metadata.license_expression == "MIT"


def test_build_requires_a_setuptools_that_reads_spdx_licenses() -> None:
    """`license = "MIT"` (an SPDX expression) needs setuptools 77 or newer."""
    build = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]
    (setuptools,) = [r for r in build["requires"] if r.startswith("setuptools")]
    assert setuptools.replace(" ", "") == "setuptools>=77"

"""The test command tells a new user why tests skip and how to run them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_corpus_tests_say_what_the_corpus_is_and_where_it_goes(tmp_path: Path) -> None:
    env = {**os.environ, "ADDIN_CORPUS": str(tmp_path / "absent")}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
            "tests/test_conformance.py::test_corpus_has_the_documented_files",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    (line,) = [ln for ln in r.stdout.splitlines() if ln.startswith("SKIPPED")]
    for text in (
        "published-manifest corpus",
        "OfficeDev GitHub repositories",
        f"none at {tmp_path / 'absent' / 'manifests' / 'real'}",
        "../shared/corpus",
        "ADDIN_CORPUS=DIR",
        "docs/conformance.md",
    ):
        assert text in line


def test_the_test_command_prints_skip_reasons() -> None:
    pytest_line = [
        ln for ln in (REPO / "scripts" / "test.sh").read_text().splitlines() if "pytest" in ln
    ][-1]
    assert " -rs " in pytest_line

"""The open-files limit a run needs: Mosquitto holds one socket per client, so `addin-sim run`
raises its soft RLIMIT_NOFILE (which the broker, server and workers inherit) up to the hard
limit, and says what to raise when the hard limit is too low."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from simulator.processes import OPEN_FILES_MARGIN, open_files_needed


def test_the_broker_or_the_busiest_worker_sets_what_a_run_needs() -> None:
    # Its own broker: one socket per client, whatever the workers.
    assert open_files_needed(19_000, 2, True, "none") == 19_000 + OPEN_FILES_MARGIN
    # Someone else's broker: the busiest worker (rounded up), its SQLite files included.
    assert open_files_needed(19_001, 2, False, "none") == 9_501 + OPEN_FILES_MARGIN
    assert open_files_needed(1_000, 2, False, "file") == 500 * 4 + OPEN_FILES_MARGIN
    # In process (0 workers): the coordinator hosts every agent.
    assert open_files_needed(1_000, 0, False, "memory") == 1_000 + OPEN_FILES_MARGIN


def _limited(soft: int, hard: int) -> Callable[[], None]:
    def in_child() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return in_child


def _python(code: str, soft: int, hard: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_limited(soft, hard),
        check=False,
    )


def test_the_soft_limit_is_raised_to_the_hard_limit_for_the_children() -> None:
    code = (
        "import resource, subprocess, sys\n"
        "from simulator.processes import raise_open_files\n"
        "print(raise_open_files(700))\n"
        # What a child process (Mosquitto, a worker) gets.
        "print(subprocess.run([sys.executable, '-c', 'import resource; "
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])'], capture_output=True, "
        "text=True).stdout.strip())\n"
    )
    r = _python(code, 300, 900)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["900", "900"]
    # Already enough: left as it is.
    r = _python(code, 800, 900)
    assert r.stdout.split() == ["800", "800"], r.stderr


def test_a_run_over_the_hard_limit_says_what_to_raise_and_starts_nothing(tmp_path: Path) -> None:
    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (200, 400))

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "simulator.cli",
            "run",
            "--clients",
            "500",
            "--workers",
            "1",
            "--scenario",
            "phased-rollout",
            "--cache",
            "none",
            "--report",
            str(tmp_path / "rep"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=limited,
        env={**os.environ, "COLUMNS": "300"},
        check=False,
    )
    assert r.returncode != 0
    flat = " ".join((r.stdout + r.stderr).split())
    assert "needs about 756 open files" in flat and "the hard limit is 400" in flat, flat
    assert "ulimit -Hn 756" in flat and "Traceback" not in flat
    assert not (tmp_path / "rep").exists()

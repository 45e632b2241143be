"""Child processes (Mosquitto, the server stub, workers) that never outlive the run.

An orderly end (including SIGTERM, which `addin-sim run` turns into one) stops them
explicitly. For a parent killed outright (SIGKILL, a crash), Linux can deliver a signal to
the child when its parent dies: `PR_SET_PDEATHSIG`, set between fork and exec.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1


def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
        return prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _prctl()  # resolved once here: the child runs nothing but the call below


def die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` for `subprocess.Popen` that has the child killed when this process
    dies (None where the OS cannot). Linux sends the signal when the *thread* that started
    the child ends: start children from the main thread or from an executor thread that
    lives as long as the run (asyncio's default executor does)."""
    prctl = _PRCTL
    if prctl is None:
        return None
    parent = os.getpid()

    def in_child() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the line above took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return in_child


OPEN_FILES_MARGIN = 256
"""Open files a process of the run needs beyond one per client: the control channel, the
state tap, the server's connections, a worker's HTTP pool (64), logs, the event loop."""

SQLITE_FILES_PER_CLIENT = 3
"""With `--cache file` each agent holds its database, its WAL and its shared-memory file."""


class OpenFilesError(RuntimeError):
    """The hard limit on open files is too low for the run; the message says what to raise."""


def open_files_needed(clients: int, workers: int, own_broker: bool, cache: str | None) -> int:
    """The most open files one process of the run needs: the run's own Mosquitto holds one
    socket per client (the bare fan-out's subscribers leave before the agents connect), a
    worker one per agent it hosts (plus its SQLite files with the file cache); with
    `workers` 0 the coordinator hosts them all."""
    per_agent = 1 + (SQLITE_FILES_PER_CLIENT if cache == "file" else 0)
    agents = -(-clients // max(1, workers)) * per_agent
    return max(clients if own_broker else 0, agents) + OPEN_FILES_MARGIN


def raise_open_files(needed: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE (inherited by the broker, server and workers
    it starts) to what the run needs, up to the hard limit; return the new soft limit.
    Raises `OpenFilesError` saying what to raise when even the hard limit is too low."""
    try:
        import resource
    except ImportError:  # not on Windows; its limits are per-handle-table and large
        return needed
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and needed > hard:
        raise OpenFilesError(
            f"this run needs about {needed:,} open files in one process (Mosquitto holds one "
            f"per client, a worker one per agent it hosts) but the hard limit is {hard:,}: "
            f"raise it (as root `ulimit -Hn {needed}` in the shell that starts addin-sim, "
            f"LimitNOFILE={needed} in a systemd unit, or `nofile` in "
            "/etc/security/limits.conf), or run fewer clients (more --workers share the "
            "agents, not the broker's connections)"
        )
    if soft != resource.RLIM_INFINITY and soft < needed:
        # Up to the hard limit, not just `needed`: a worker's count is an estimate.
        new = needed if hard == resource.RLIM_INFINITY else hard
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        return int(new)
    return int(soft)

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

"""Giving memory back to the operating system once the daemon goes idle again.

A download burst or a resync allocates (answers, manifests, parsed trees, query rows) and
frees it all a moment later; Python and glibc's malloc keep much of the freed memory for
reuse, so without this a daemon stays at its busiest RSS for the rest of the day. After the
work settles, `MemoryReleaser` runs one full garbage collection (cycles left by exceptions
and tasks) and glibc's ``malloc_trim(0)``, which returns free pages anywhere in malloc's heaps,
not only at their top. Elsewhere (macOS, Windows, musl) only the collection runs.

One per process: the daemon's CLI creates it. Never per agent: the simulator runs thousands
of agents in a process, and a full collection there costs far more than it returns.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import os
import sys
import time
from collections.abc import Callable

MIN_INTERVAL = 10.0
"""At most one release every ten seconds: under a stream of changes the daemon never idles.
A release costs ~0.1-3 ms of CPU once the start's objects are frozen (`freeze_started`);
~21 ms without that, most of it walking the imported modules' objects (measured with the
daemon's modules imported, docs/benchmarks.md "Agent")."""

SETTLE = 2.0
"""Seconds after the request: the last task of a burst has returned by then."""


@functools.cache
def _glibc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library is not glibc."""
    if sys.platform != "linux":
        return None
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
    except (ValueError, OSError):
        return None
    import ctypes  # only here: ~0.2 MB, and only on glibc

    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


def freeze_started() -> None:
    """Move everything alive after the start (modules, classes, the loaded state) out of the
    collector's sight: later collections, automatic or `release_freed_memory`'s, walk only
    what was allocated since. A frozen object that later becomes part of unreachable cycle is
    never collected; that is bounded by what the start holds, and is what a long-running
    process that imports once and then runs trades for collections that cost ~0.1 ms."""
    gc.collect()
    gc.freeze()


def release_freed_memory() -> None:
    """One full collection, then malloc_trim(0) on glibc."""
    gc.collect()
    trim = _glibc_trim()
    if trim is not None:
        trim(0)


class MemoryReleaser:
    """`request()` after a burst of work; the release runs once, SETTLE seconds later and at
    least MIN_INTERVAL after the previous one, however many requests came in between."""

    def __init__(
        self,
        release: Callable[[], None] = release_freed_memory,
        settle: float = SETTLE,
        min_interval: float = MIN_INTERVAL,
    ) -> None:
        self._release = release
        self._settle, self._min_interval = settle, min_interval
        self._last = -float("inf")
        self._timer: asyncio.TimerHandle | None = None

    def request(self) -> None:
        if self._timer is not None:
            return  # one is due: it covers this request too
        now = time.monotonic()
        delay = max(self._settle, self._last + self._min_interval - now)
        self._timer = asyncio.get_running_loop().call_later(delay, self._run)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _run(self) -> None:
        self._timer = None
        self._last = time.monotonic()
        self._release()

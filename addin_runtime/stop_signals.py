"""Stopping a daemon on SIGTERM/SIGINT, on every platform Python runs on.

``loop.add_signal_handler`` is the clean way (the handler runs on the loop), but Windows'
event loops do not implement it (NotImplementedError). There the handler is installed with
``signal.signal`` and hands the stop to the loop thread-safely. Windows delivers Ctrl+C as
SIGINT and Ctrl+Break as SIGBREAK; a scheduled task's `schtasks /End` terminates the process
without a signal, which the cache survives (every write is one SQLite transaction).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any


def stop_signals() -> list[signal.Signals]:
    sigs = [signal.SIGTERM, signal.SIGINT]
    if (brk := getattr(signal, "SIGBREAK", None)) is not None:  # Windows only
        sigs.append(brk)
    return sigs


def on_stop_signals(
    loop: asyncio.AbstractEventLoop, stop: Callable[[], None]
) -> Callable[[], None]:
    """Call `stop` on the loop when a stop signal arrives; returns what undoes it."""
    sigs = stop_signals()
    try:
        for s in sigs:
            loop.add_signal_handler(s, stop)
    except NotImplementedError:  # Windows' loops (they raise for the first signal already)
        return _with_signal_module(loop, stop, sigs)

    def undo() -> None:
        for s in sigs:
            loop.remove_signal_handler(s)

    return undo


def _with_signal_module(
    loop: asyncio.AbstractEventLoop, stop: Callable[[], None], sigs: list[signal.Signals]
) -> Callable[[], None]:
    def handler(_signum: int, _frame: FrameType | None) -> None:
        # Runs in the main thread between bytecodes, maybe while the loop is mid-step:
        # only schedule the stop, never act here.
        loop.call_soon_threadsafe(stop)

    previous: dict[signal.Signals, Any] = {s: signal.signal(s, handler) for s in sigs}

    def undo() -> None:
        for s, old in previous.items():
            signal.signal(s, old)

    return undo

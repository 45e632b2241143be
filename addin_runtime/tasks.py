"""Waiting on, stopping and finishing asyncio work without losing a cancellation.

On Python 3.11 `asyncio.wait_for` returns the awaited result and drops a cancellation that
arrives in the same turn of the event loop (fixed in 3.12); aiomqtt awaits every CONNACK,
SUBACK and PUBACK with it. A task stopped at that moment runs on, and whoever awaits it
after one `cancel()` waits forever. These helpers cancel again until the task ends (within
a bound), and wait for events with `asyncio.timeout`, which has no such race.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

RECANCEL_INTERVAL = 0.5
"""Seconds between two cancellations of a task that has not ended yet."""


async def cancel_and_wait(task: asyncio.Task[Any], timeout: float, what: str) -> bool:
    """Cancel `task` and wait until it ends, at most `timeout` seconds; False (and a warning
    naming `what`) if it did not. Its result or error is consumed: whoever stops a task wants
    it gone, not its outcome."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not task.done():
        task.cancel()
        left = deadline - loop.time()
        if left <= 0:
            log.warning(
                "%s did not end within %.0fs of being stopped; abandoning it", what, timeout
            )
            return False
        await asyncio.wait({task}, timeout=min(RECANCEL_INTERVAL, left))
    if not task.cancelled() and task.exception() is not None:
        log.debug("%s ended with %r", what, task.exception())
    return True


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait until `event` is set, at most `timeout` seconds; whether it was."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True


async def to_completion(aw: Awaitable[T]) -> T:
    """Await `aw` to its end even if the caller is cancelled meanwhile, then re-raise that
    cancellation: for work that goes on anyway in another thread (an SQLite statement, a
    process being started) and whose outcome must be known before cleaning up after it."""
    task = asyncio.ensure_future(aw)
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        error = None if task.cancelled() else task.exception()
        raise asyncio.CancelledError() from error
    return task.result()

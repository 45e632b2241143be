"""The server's MQTT work on an event loop and thread of its own, stepping aside for admin
writes (`serve`).

After a broker restart the publisher gives the broker its whole state again (10,501 QoS 1
publishes and their PUBACKs through paho/aiomqtt for 10,000 users) while the fleet
reconnects and reports at once (10,000 messages to read and validate). On the event loop
that serves HTTP, every admin write waited for turns of that work (+300-900 ms at p99,
docs/benchmarks.md, "Admin writes during a burst"). A loop of its own alone is not enough:
that thread then holds the GIL the writes need (`WritesFirst` says how), so it also pauses
while writes are in flight.

What crosses between the loops: a coroutine started here (`LoopThread.submit`), a coroutine
function of the HTTP loop called from here (`on_loop`: the report sink, whose database
connection and lock belong to that loop and order the reports with the admin writes), the
count of writes in flight, and `Publisher.wake` (thread-safe itself). Everything the
publisher opens (its database connection, its MQTT client) is made on this thread's loop,
and one task there drains its outbox in commit order, as before.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from addin_runtime.tasks import cancel_and_wait

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger("addin_server.loop_thread")

P = ParamSpec("P")
T = TypeVar("T")


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class LoopThread:
    """A daemon thread running an event loop until `stop`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.loop = _new_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    def start(self) -> None:
        self._thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run `coro` as a task of this thread's loop; `stop` cancels it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    async def stop(self, timeout: float) -> None:
        """Cancel what runs on this thread's loop, wait for it to end (at most `timeout`
        seconds), then end the thread. Awaited from the loop that started it, which goes on
        serving the calls `on_loop` makes meanwhile (a report batch being stored)."""
        if self._running():
            ended = asyncio.run_coroutine_threadsafe(_cancel_all(timeout, self.name), self.loop)
            await asyncio.wrap_future(ended)
            self.loop.call_soon_threadsafe(self.loop.stop)
        await asyncio.to_thread(self._thread.join, timeout)

    def _running(self) -> bool:
        return self._thread.is_alive() and not self.loop.is_closed()


async def _cancel_all(timeout: float, name: str) -> None:
    me = asyncio.current_task()
    for task in asyncio.all_tasks():
        if task is not me:
            await cancel_and_wait(task, timeout, f"{name}: {task.get_name()}")


class WritesFirst:
    """Admin writes take precedence over the MQTT thread's bulk work.

    A thread that never blocks holds the GIL but for forced switches (every 5 ms), and each
    admin write needs it some twenty times (the HTTP loop after each poll, aiosqlite's
    thread for each statement): behind a thread reading a fleet's 10,000 reports, writes
    took 300-400 ms even with the reports dropped unstored. So the HTTP loop counts the writes it is serving
    (`asgi`), and the MQTT thread, between two messages or two small batches of publishes,
    stops (`step_aside`: the whole thread, its socket callbacks included) while any is in
    flight. Under a constant stream of writes the MQTT work still gets `run_s` out of every
    `run_s + max_pause_s`."""

    def __init__(self, max_pause_s: float = 0.02, run_s: float = 0.002) -> None:
        self.max_pause_s = max_pause_s
        self.run_s = run_s
        self.in_flight = 0
        """Writes being served; changed on the HTTP loop only, read from the MQTT thread."""
        self._ran_since = time.monotonic()

    def step_aside(self) -> None:
        """Called on the MQTT thread: block it while writes are in flight (at most
        `max_pause_s`), once it has run `run_s` since its last pause."""
        now = time.monotonic()
        if not self.in_flight or now - self._ran_since < self.run_s:
            return
        deadline = now + self.max_pause_s
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(PAUSE_STEP)  # releases the GIL: the writes run uncontested
        self._ran_since = time.monotonic()

    def asgi(self, app: ASGIApp) -> ASGIApp:
        """`app`, counting the requests that change something while they are served."""

        async def counted(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http" or scope["method"] in READ_METHODS:
                await app(scope, receive, send)
                return
            self.in_flight += 1
            try:
                await app(scope, receive, send)
            finally:
                self.in_flight -= 1

        return counted


PAUSE_STEP = 0.0005
"""Seconds between two looks at the writes in flight while stepping aside."""
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def on_loop(
    loop: asyncio.AbstractEventLoop, fn: Callable[P, Awaitable[T]]
) -> Callable[P, Coroutine[Any, Any, T]]:
    """`fn` (a coroutine function of `loop`) callable from another loop: each call runs on
    `loop` and is awaited from the caller's; cancelling the caller cancels it there."""

    async def call(*args: P.args, **kwargs: P.kwargs) -> T:
        async def run() -> T:
            return await fn(*args, **kwargs)

        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(run(), loop))

    return call

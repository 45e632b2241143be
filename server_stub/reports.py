"""Report intake: the agents' ``report/{client_id}`` messages, batched into the database.

The publisher's MQTT session subscribes to ``report/+`` (one connection per server) and
offers each valid report here; a single writer task stores whatever arrived while the
previous batch was being written, in one transaction.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from addin_core.protocol import AgentReport

log = logging.getLogger("addin_server.reports")

ReportSink = Callable[[list[AgentReport]], Awaitable[None]]

REPORT_BATCH = 250
"""Reports written in one transaction at most: a burst is stored in transactions short
enough for the admin writes queued behind each (one writer at a time) not to wait long."""


class ReportIntake:
    def __init__(self, sink: ReportSink) -> None:
        self.sink = sink
        self._queue: asyncio.Queue[AgentReport] = asyncio.Queue()

    def offer(self, report: AgentReport) -> None:
        self._queue.put_nowait(report)

    async def run(self) -> None:
        """Store reports as they come; runs until cancelled. A batch that cannot be
        stored is logged and dropped: its agents report again."""
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty() and len(batch) < REPORT_BATCH:
                batch.append(self._queue.get_nowait())
            try:
                await self.sink(batch)
            except Exception:
                log.exception("could not store %d report(s)", len(batch))

"""Report intake: the agents' ``report/{client_id}`` messages, batched into the database.

The publisher's MQTT session subscribes to ``report/+`` (one connection per server) and
offers each valid report here; a single writer task stores whatever arrived while the
previous batch was being written, in one transaction.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from itertools import islice

from addin_core.protocol import AgentReport

log = logging.getLogger("addin_server.reports")

ReportSink = Callable[[list[AgentReport]], Awaitable[None]]

REPORT_BATCH = 250
"""Reports written in one transaction at most: a burst is stored in transactions short
enough for the admin writes queued behind each (one writer at a time) not to wait long."""


LINGER_S = 0.05
"""Seconds the first report of a batch waits for others: a fleet's burst was stored one or
two reports per transaction (340 transactions for 10,000 reports, each queued with the
admin writes on the database lock); about 100 now."""

MAX_PENDING = 100_000
"""Devices whose report waits to be stored at most; past it a new device's report is dropped
(its agent reports again) rather than memory growing with whatever the broker delivers."""


class ReportIntake:
    """Reports waiting to be stored, at most one per device (client id and user): a device's
    newer report replaces the one still waiting, as the database would (the higher revision
    wins, the later arrival on a tie). So what waits is bounded by the devices, not by how
    many reports arrive while the database is slow or busy (a flooding device, a fleet
    reconnecting while a large ORG load holds the write lock)."""

    def __init__(
        self, sink: ReportSink, max_pending: int = MAX_PENDING, linger_s: float = LINGER_S
    ) -> None:
        self.sink = sink
        self.linger_s = linger_s
        self.max_pending = max_pending
        self._pending: dict[tuple[str, str], AgentReport] = {}
        self._ready = asyncio.Event()
        self.dropped = 0
        """Reports dropped because `max_pending` devices were already waiting."""

    def offer(self, report: AgentReport) -> None:
        key = (report.client_id, report.user_id)
        waiting = self._pending.get(key)
        if waiting is not None:
            if report.revision >= waiting.revision:
                self._pending[key] = report
            return
        if len(self._pending) >= self.max_pending:
            self.dropped += 1
            if self.dropped % 10_000 == 1:
                log.warning("%d report(s) dropped so far: %d devices' reports already wait "
                            "to be stored", self.dropped, len(self._pending))  # fmt: skip
            return
        self._pending[key] = report
        self._ready.set()

    def _take(self) -> list[AgentReport]:
        batch = [self._pending.pop(k) for k in list(islice(self._pending, REPORT_BATCH))]
        if not self._pending:
            self._ready.clear()
        return batch

    async def run(self) -> None:
        """Store reports as they come; runs until cancelled. A batch that cannot be
        stored is logged and dropped: its agents report again."""
        while True:
            await self._ready.wait()
            if len(self._pending) < REPORT_BATCH:
                await asyncio.sleep(self.linger_s)
            batch = self._take()
            try:
                await self.sink(batch)
            except Exception:
                log.exception("could not store %d report(s)", len(batch))

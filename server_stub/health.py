"""Readiness: may this server take traffic? (``GET /readyz``; ``/healthz`` is liveness only.)

Three checks, each with its reason in words so an operator reading the probe's body knows
what to fix: the database answers a read, the publisher holds a broker session, and the
oldest message waiting in the outbox is younger than a threshold (a publisher that is
connected but not getting its messages acknowledged is not serving agents either).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

from server_stub.db import Database

log = logging.getLogger("addin_server.health")

DEFAULT_MAX_OUTBOX_LAG = 30.0
"""Seconds the oldest unpublished message may wait before the server reports not ready."""

DB_CHECK_TIMEOUT = 2.0
"""Seconds the database has to answer the readiness read."""


class BrokerLink(Protocol):
    """What readiness reads from the publisher (`server_stub.publisher.Publisher`)."""

    def is_connected(self) -> bool: ...

    def disconnected_reason(self) -> str: ...


@dataclass(frozen=True)
class Check:
    ok: bool
    detail: str

    def as_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "detail": self.detail}


class Readiness:
    def __init__(
        self,
        database: Database,
        broker: BrokerLink | None,
        max_outbox_lag: float = DEFAULT_MAX_OUTBOX_LAG,
    ) -> None:
        self.database = database
        self.broker = broker
        self.max_outbox_lag = max_outbox_lag

    async def check(self) -> tuple[bool, dict[str, Any]]:
        """(ready, the body of ``/readyz``: every check with its reason)."""
        database, backlog = await self._database()
        checks = {
            "database": database,
            "broker": self._broker(),
            "outbox": self._outbox(backlog),
        }
        ready = all(c.ok for c in checks.values())
        reasons = [f"{name}: {c.detail}" for name, c in checks.items() if not c.ok]
        return ready, {
            "ready": ready,
            "reasons": reasons,
            "checks": {name: c.as_json() for name, c in checks.items()},
        }

    async def _database(self) -> tuple[Check, dict[str, Any] | None]:
        try:
            async with asyncio.timeout(DB_CHECK_TIMEOUT):
                backlog = await self.database.outbox_backlog()
        except TimeoutError:
            return Check(False, f"no answer within {DB_CHECK_TIMEOUT:g} s"), None
        except Exception as e:  # any failure to read is the reason, whatever its type
            # The words go to the log: /readyz is often open, and a driver's message can
            # name the database's host and user.
            log.warning("readiness: cannot read the database: %s", e)
            return Check(False, f"cannot read the database ({type(e).__name__}; see the log)"), None
        return Check(True, "reachable"), backlog

    def _broker(self) -> Check:
        if self.broker is None:
            return Check(False, "no publisher runs in this process")
        if self.broker.is_connected():
            return Check(True, "connected")
        return Check(False, f"not connected ({self.broker.disconnected_reason()})")

    def _outbox(self, backlog: dict[str, Any] | None) -> Check:
        if backlog is None:
            return Check(False, "unknown: the database did not answer")
        waiting, oldest = int(backlog["waiting"]), backlog["oldest_created_at"]
        if not waiting or oldest is None:
            return Check(True, "empty")
        lag = max(0.0, time.time() - float(oldest))
        text = f"{waiting} message(s) waiting, the oldest for {lag:.1f} s"
        if lag > self.max_outbox_lag:
            return Check(False, f"{text} (threshold {self.max_outbox_lag:g} s)")
        return Check(True, text)

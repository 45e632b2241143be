"""Helpers shared by the server tests: a plain MQTT subscriber and manifest fixtures."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiomqtt

from addin_core.protocol import Filters

STORE = Path(__file__).resolve().parents[1] / "server_stub" / "store_catalog"
# Real manifests shipped in the store fixture catalog (MIT, see the LICENSE next to them).
TASKPANE_V1 = STORE / "WA200004567" / "1.0.0.0.xml"  # Word/Excel/PowerPoint, ReadWriteDocument
TASKPANE_V2_PERMS = STORE / "WA200004567" / "2.0.0.0.xml"  # Permissions changed: needs consent
SHEETS_V1 = STORE / "WA104380121" / "1.0.0.0.xml"  # Excel
SHEETS_V12 = STORE / "WA104380121" / "1.2.0.0.xml"  # same permissions, newer
TASKPANE_ID = "cff613f2-7421-4dfe-beb2-c81162b92abb"
SHEETS_ID = "9475b9bb-ff88-476f-917d-33a9c632508a"
GIFME_ID = "bd5d7b16-a08f-4bed-ac4f-f37882b5c55a"  # store asset WA104379501


def query(db: str, sql: str) -> list[tuple[Any, ...]]:
    """One SELECT on the SQLite file or the PostgreSQL database `db` (a server's --db)."""
    if "://" in db:
        import psycopg

        with psycopg.connect(db) as pc:
            return [tuple(r) for r in pc.execute(sql).fetchall()]  # type: ignore[arg-type]
    with sqlite3.connect(db) as c:
        return [tuple(r) for r in c.execute(sql).fetchall()]


class Collector:
    """A plain aiomqtt subscriber to everything under the tenant, recording each message."""

    def __init__(self, port: int, tenant: str = "contoso", **client_kw: Any) -> None:
        self.port = port
        self.tenant = tenant
        self.client_kw = client_kw
        self.messages: list[tuple[str, dict[str, Any], bool]] = []
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def __aenter__(self) -> Collector:
        self._task = asyncio.create_task(self._run())
        async with asyncio.timeout(10):
            await self._ready.wait()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        async with aiomqtt.Client("127.0.0.1", self.port, **self.client_kw) as c:
            await c.subscribe(Filters.everything(self.tenant), qos=1)
            self._ready.set()
            async for m in c.messages:
                if self.short(str(m.topic)).startswith("server/"):
                    continue  # the publisher's own marker, not protocol state
                payload = json.loads(bytes(m.payload))  # type: ignore[arg-type]
                self.messages.append((str(m.topic), payload, bool(m.retain)))

    def short(self, topic: str) -> str:
        return topic.removeprefix(f"addins/v1/{self.tenant}/")

    def by_revision(self, revision: int) -> dict[str, dict[str, Any]]:
        return {self.short(t): p for t, p, _ in self.messages if p.get("revision") == revision}

    def count(self, short_topic: str) -> int:
        return sum(1 for t, _, _ in self.messages if self.short(t) == short_topic)

    async def wait_for(self, revision: int, topics: set[str], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if topics <= set(self.by_revision(revision)):
                return
            await asyncio.sleep(0.02)
        raise AssertionError(
            f"revision {revision}: expected {sorted(topics)}, got {sorted(self.by_revision(revision))}"
        )


async def eventually(cond: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    """Wait (bounded in count and time) until `cond()` holds."""
    for _ in range(int(timeout / 0.05)):
        if cond():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or cond}")


async def retained_state(port: int, tenant: str = "contoso", quiet: float = 0.5) -> dict[str, Any]:
    """Every retained message under the tenant, as a fresh subscriber receives it."""
    got: dict[str, Any] = {}
    async with aiomqtt.Client("127.0.0.1", port) as c:
        await c.subscribe(Filters.everything(tenant), qos=1)
        try:
            async with asyncio.timeout(10):
                while True:
                    try:
                        async with asyncio.timeout(quiet):
                            m = await anext(c.messages)
                    except TimeoutError:
                        break
                    short = str(m.topic).removeprefix(f"addins/v1/{tenant}/")
                    if m.retain and not short.startswith("server/"):
                        got[short] = json.loads(
                            bytes(m.payload)  # type: ignore[arg-type]
                        )
        except TimeoutError:
            pass
    return got

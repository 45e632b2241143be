"""A write cancelled at any await point leaves its SQLite connection usable.

aiosqlite runs statements on its own thread, so a task cancelled while awaiting one does not
stop it: a cancelled BEGIN still opens a transaction. The server's API writes, its report
storage (cancelled whenever the broker connection drops) and the agent's cache commits share
one connection between tasks; each test cancels one write at its 1st, 2nd, ... statement and
checks the next write on the same connection (a real SQLite file) succeeds.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiosqlite
import pytest

from addin_core.protocol import AgentReport
from addin_runtime.sqlite_tx import transaction
from addin_runtime.tasks import to_completion
from agent.cache import Cache, Tx
from server_stub import db
from server_stub.service import Service


class CancelAtStatement:
    """Cancels `victim` right after it hands its n-th statement to the connection's thread:
    the statement still runs there, as it does when a real cancellation lands mid-await."""

    def __init__(self, conn: aiosqlite.Connection, n: int) -> None:
        self.conn, self.n, self.calls = conn, n, 0
        self.victim: asyncio.Task[Any] | None = None
        self.real = conn._execute
        conn._execute = self._execute  # type: ignore[method-assign]

    async def _execute(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        queued = self.real(fn, *args, **kwargs)
        if self.calls == self.n and self.victim is not None:
            self.victim.cancel()
        return await queued

    def remove(self) -> None:
        self.conn._execute = self.real  # type: ignore[method-assign]


async def _cancel_everywhere(
    conn: aiosqlite.Connection,
    write: Callable[[], Awaitable[Any]],
    next_write: Callable[[], Awaitable[Any]],
) -> int:
    """Cancel `write` at each of its statements in turn; after each, `next_write` must work.
    Returns how many statements the write has."""
    for n in itertools.count(1):
        hook = CancelAtStatement(conn, n)
        task = asyncio.ensure_future(write())
        hook.victim = task
        try:
            await asyncio.gather(task, return_exceptions=True)
        finally:
            hook.remove()
        await next_write()
        await conn.execute("SELECT 1")  # every statement queued so far has run
        assert not conn.in_transaction, f"left inside a transaction when cancelled at {n}"
        if not task.cancelled():
            assert task.exception() is None
            return n - 1
        assert n < 100, "the write never completed"
    raise AssertionError("unreachable")


def _report(i: int) -> AgentReport:
    return AgentReport(
        client_id=f"pc{i}", user_id="alice", revision=1, reported_at=float(i), applied=[]
    )


async def _service(tmp_path: Path) -> Service:
    database = await db.Database.open(tmp_path / "server.sqlite")
    await database.bind_tenant("contoso")
    return Service(database, "contoso")


async def test_cancelled_report_storage_leaves_the_service_writable(tmp_path: Path) -> None:
    service = await _service(tmp_path)
    users = (f"u{i}" for i in itertools.count())
    try:
        statements = await _cancel_everywhere(
            service.database.conn,
            lambda: service.record_reports([_report(1), _report(2)]),
            lambda: service.create_user(next(users)),
        )
        assert statements >= 2  # BEGIN, the insert and COMMIT at least
        rows = await service.database.rows("SELECT count(*) FROM reports")
        assert rows[0][0] == 2
    finally:
        await service.database.conn.close()


async def test_cancelled_admin_write_leaves_the_service_writable(tmp_path: Path) -> None:
    service = await _service(tmp_path)
    reports = (_report(i) for i in itertools.count())
    groups = (f"g{i}" for i in itertools.count())
    try:
        statements = await _cancel_everywhere(
            service.database.conn,
            lambda: service.create_group(next(groups)),
            lambda: service.record_reports([next(reports)]),
        )
        assert statements >= 5
        # A cancelled write either committed whole (revision, audit, outbox) or not at all.
        revision = await service.revision()
        audit = await service.database.rows("SELECT count(*) FROM audit")
        assert audit[0][0] == revision
    finally:
        await service.database.conn.close()


async def test_cancelled_cache_commit_leaves_the_cache_writable(tmp_path: Path) -> None:
    cache = await Cache.open(tmp_path / "cache.sqlite")
    assert cache._async is not None
    counter = itertools.count()

    def tx() -> Tx:
        t = Tx()
        t.sync("n", next(counter))
        t.event("test", "one event")
        return t

    try:
        statements = await _cancel_everywhere(
            cache._async, lambda: cache.commit(tx()), lambda: cache.commit(tx())
        )
        # One call on the connection's thread (BEGIN, the statements and COMMIT together):
        # cancelled there, it still commits whole, and the next commit finds no transaction.
        assert statements == 1
    finally:
        await cache.close()


async def test_a_transaction_left_open_elsewhere_is_rolled_back_first(tmp_path: Path) -> None:
    conn = await db.connect(tmp_path / "server.sqlite")
    try:
        await conn.execute("BEGIN IMMEDIATE")
        await conn.execute("INSERT INTO users(id, name) VALUES ('ghost', 'ghost')")
        async with transaction(conn):
            await conn.execute("INSERT INTO users(id, name) VALUES ('alice', 'alice')")
        rows = await (await conn.execute("SELECT id FROM users ORDER BY id")).fetchall()
        assert [r[0] for r in rows] == ["alice"]
    finally:
        await conn.close()


async def test_to_completion_finishes_the_work_then_reraises_the_cancellation() -> None:
    finished = asyncio.Event()
    release = asyncio.Event()

    async def work() -> str:
        await release.wait()
        finished.set()
        return "done"

    caller = asyncio.ensure_future(to_completion(work()))
    await asyncio.sleep(0)
    caller.cancel()
    await asyncio.sleep(0)
    caller.cancel()  # twice: still not interrupted
    await asyncio.sleep(0)
    assert not caller.done()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert finished.is_set()

"""The unit of work: one admin change, all or nothing, in a database transaction (which
concurrent changes share: group commit, `UnitOfWork`).

Inside it an operation changes the state and emits the MQTT messages that describe the
result. On exit the tenant revision is bumped, the audit log gets a line, the messages go
to the outbox (and the latest payload per topic to `retained`), all in the same commit.
Publishing happens later, in `server_stub/publisher.py`, so a crash at any point loses
nothing and publishes nothing uncommitted. An exception rolls the change back (to its
savepoint: the changes sharing its transaction are not affected).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager, suppress
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from addin_core.protocol import Tombstone, Topic
from addin_runtime.logs import context
from server_stub.db import Conn, Database, Row, read_revision
from server_stub.sql import Cursor

log = logging.getLogger("addin_server.changes")


@dataclass(frozen=True)
class Actor:
    """Who made a change, as the audit log records it: a name, its role, and the way in
    (``api``, ``console``, ``cli``)."""

    name: str
    role: str = "admin"
    via: str = "cli"


CURRENT_ACTOR: ContextVar[Actor | None] = ContextVar("current_actor", default=None)
"""The actor of the request being served: set by the API's guard and the console for the
duration of one request (each request runs in its own context), read by every write."""


@dataclass
class Tx:
    """The transaction in progress: its revision, commit time and collected messages."""

    conn: Conn
    tenant: str
    revision: int
    now: float
    messages: dict[str, bytes] = field(default_factory=dict)

    def emit(self, topic: Topic, payload: BaseModel) -> None:
        # One message per topic per commit: a later change in the same transaction wins.
        data = payload.model_dump_json(exclude_none=True).encode()
        self.messages[str(topic)] = data

    def tombstone(self, topic: Topic) -> None:
        self.emit(topic, Tombstone(deleted=True, revision=self.revision, committed_at=self.now))

    async def execute(self, sql: str, args: Iterable[Any] = ()) -> Cursor:
        return await self.conn.execute(sql, tuple(args))

    async def executemany(self, sql: str, rows: Iterable[Iterable[Any]]) -> None:
        batch = list(rows)
        if batch:  # nothing to send: no round trip (one per statement on either engine)
            await self.conn.executemany(sql, batch)

    async def rows(self, sql: str, args: Iterable[Any] = ()) -> list[Row]:
        return list(await (await self.conn.execute(sql, tuple(args))).fetchall())

    async def row(self, sql: str, args: Iterable[Any] = ()) -> Row | None:
        return await (await self.conn.execute(sql, tuple(args))).fetchone()


GROUP_MAX = 256
"""Writes committed in one transaction at most: the writes that arrive while a group is open
join it, and a bulk of admin work still commits (and replies) every few hundred writes."""


@dataclass(eq=False)
class _Group:
    """One transaction shared by the writes that arrive while it is open (group commit).

    Its task opens the transaction once the previous group has committed; the writes take
    turns on its connection, each inside a savepoint of its own, and the task commits when
    none is left running. Each write's bookkeeping (audit line, outbox and retained rows) is
    prepared by the write and inserted for the whole group just before the commit."""

    previous: _Group | None
    ready: asyncio.Future[Conn] = field(default_factory=lambda: _future())
    done: asyncio.Future[None] = field(default_factory=lambda: _future())
    turn: asyncio.Lock = field(default_factory=asyncio.Lock)
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    members: int = 0
    """Writes that joined (the open group takes no more at `GROUP_MAX`)."""
    running: int = 0
    """Writes that joined and have not finished their part of the transaction."""
    revision: int = 0
    """The last revision given to a write of this group."""
    base: int = 0
    broken: BaseException | None = None
    """An error that undid the whole transaction (not one write's refusal)."""
    audit: list[tuple[Any, ...]] = field(default_factory=list)
    outbox: list[tuple[int, str, bytes, float]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    def leave(self) -> None:
        self.running -= 1
        if self.running == 0:
            self.idle.set()


def _future() -> asyncio.Future[Any]:
    fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    # A group that fails with nobody left waiting (every write refused or cancelled)
    # must not log "exception was never retrieved".
    fut.add_done_callback(lambda f: f.cancelled() or f.exception())
    return fut


class UnitOfWork:
    """Opens the write transactions of one tenant; `actor` and `on_commit` may be changed
    after construction (the server sets them once the publisher exists). `actor` names the
    changes made outside any request (`CURRENT_ACTOR` unset): the CLI's (`via` "cli"), or
    the server's own (`via` "server").

    Group commit: concurrent writes (the API's requests) that arrive while a transaction is
    open, or while the previous one commits, share one transaction, each in a savepoint of
    its own: a refused write is rolled back to its savepoint and raises at once, its group
    mates are not affected. Each write still has its own revision (in the order the writes
    ran), audit line and messages, and `write` returns only once that transaction has
    committed: a reply is never sent for a write that a crash could lose. One commit per
    few hundred writes instead of one each (a transaction's BEGIN, revision read and
    update, COMMIT, and on PostgreSQL its lock and fsync)."""

    def __init__(
        self,
        database: Database,
        tenant: str,
        *,
        actor: str = "admin",
        on_commit: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.database = database
        self.tenant = tenant
        self.actor = actor
        self.via = "cli"
        self.on_commit = on_commit
        self.clock = clock
        self._open: _Group | None = None
        """The group new writes join; None when the last one has stopped taking writes."""
        self._last: _Group | None = None
        """The newest group: the next one's transaction starts after its commit."""
        self.commits = 0
        """Transactions committed (each holding one or more writes)."""

    def _join(self) -> _Group:
        group = self._open
        if group is None or group.members >= GROUP_MAX:
            group = _Group(previous=self._last)
            self._open = self._last = group
            group.task = asyncio.create_task(self._run(group), name="group commit")
        group.members += 1
        group.running += 1
        group.idle.clear()
        return group

    def _close(self, group: _Group) -> None:
        if self._open is group:
            self._open = None

    async def _run(self, group: _Group) -> None:
        """The group's transaction: open it, wait until its writes are done, commit."""
        try:
            if group.previous is not None:
                # One transaction at a time, in order: revisions and outbox ids follow
                # the commits. Its outcome is its own writes' business.
                await asyncio.wait([group.previous.done])
                group.previous = None
            async with self.database.write() as conn:
                group.base = group.revision = await read_revision(conn)
                group.ready.set_result(conn)
                while group.running:
                    await group.idle.wait()
                # No await from the last check to here: no write joins a closed group.
                self._close(group)
                if group.broken is not None:
                    raise group.broken
                if group.revision > group.base:
                    await _group_bookkeeping(conn, group)
            self.commits += 1
        except BaseException as e:
            self._close(group)
            if not group.ready.done():
                group.ready.set_exception(e)
            group.done.set_exception(e)
            if isinstance(e, asyncio.CancelledError):
                raise
        else:
            group.done.set_result(None)

    @asynccontextmanager
    async def write(
        self, operation: str, detail: Mapping[str, Any], *, actor: str | None = None
    ) -> AsyncIterator[Tx]:
        """`actor` names who decided when it is not this service's actor (a rollout's gate).
        Returns once the change has committed (with the writes of its group)."""
        group = self._join()
        try:
            ready = group.ready
            conn = ready.result() if ready.done() else await asyncio.shield(ready)
            async with group.turn:
                if group.broken is not None:
                    raise group.broken
                tx = Tx(conn, self.tenant, group.revision + 1, self.clock())
                await _savepoint(group, conn, "SAVEPOINT w")
                try:
                    yield tx
                    who = CURRENT_ACTOR.get() or Actor(actor or self.actor, "admin", self.via)
                    audit = (tx.revision, tx.now, who.name, who.role, who.via, operation,
                             json.dumps(detail, default=str))  # fmt: skip
                except BaseException:
                    # The refusal is what the caller needs to hear; a savepoint that cannot
                    # be rolled back to fails the whole group (`_savepoint` marks it).
                    with suppress(Exception):
                        await _savepoint(group, conn, "ROLLBACK TO SAVEPOINT w",
                                         "RELEASE SAVEPOINT w")  # fmt: skip
                    raise
                await _savepoint(group, conn, "RELEASE SAVEPOINT w")
                group.revision = tx.revision
                group.audit.append(audit)
                group.outbox += [(tx.revision, t, p, tx.now) for t, p in tx.messages.items()]
        except Exception:
            group.leave()
            # A refusal is returned once the group's transaction has ended too: a caller
            # that closes the database next (a CLI command) must not cut it short.
            await asyncio.wait([group.done])
            raise
        except BaseException:
            group.leave()
            raise
        group.leave()
        # The reply waits for the commit; a cancelled caller does not stop it.
        await asyncio.shield(group.done)
        log.info(
            "revision %d committed: %s by %s, %d message(s)",
            tx.revision,
            operation,
            who.name,
            len(tx.messages),
            extra=_log_context(tx.revision, operation, detail),
        )
        if self.on_commit is not None:
            self.on_commit(tx.revision)


async def _savepoint(group: _Group, conn: Conn, *statements: str) -> None:
    """Run savepoint statements; an error in them means the transaction itself failed (a
    lost connection, a full disk): every write of the group fails with it."""
    if group.broken is not None:
        raise group.broken
    try:
        for sql in statements:
            # Not `to_completion` (a task per statement): a cancelled caller's statement
            # still runs, and the rollback it then sends is queued behind it.
            await conn.execute(sql)
    except Exception as e:
        group.broken = e
        raise


def _log_context(revision: int, operation: str, detail: Mapping[str, Any]) -> dict[str, Any]:
    """The add-in and user a change names, for structured logs."""
    addin = detail.get("addin") or (detail.get("id") if operation in _ADDIN_OPS else None)
    user = detail.get("user") or (detail.get("id") if operation.endswith("_user") else None)
    if detail.get("target") == "user":
        user = detail.get("target_id")
    return context(revision=revision, operation=operation, addin=addin, user=user)


_ADDIN_OPS = frozenset({"add_lob", "consent", "enable", "disable", "remove"})


async def _group_bookkeeping(conn: Conn, group: _Group) -> None:
    """Revision, audit lines, outbox and retained rows of every write of the group: the
    same commit as the changes. Rows in revision order: outbox ids follow it, and the
    latest revision of a topic is the retained one."""
    await conn.execute("UPDATE meta SET value=? WHERE key='revision'", (str(group.revision),))
    await conn.executemany(
        "INSERT INTO audit(revision, at, actor, role, via, operation, detail) "
        "VALUES (?,?,?,?,?,?,?)",
        group.audit,
    )
    if group.outbox:
        await conn.executemany(
            "INSERT INTO outbox(revision, topic, payload, created_at) VALUES (?,?,?,?)",
            group.outbox,
        )
        latest = {t: (t, r, p) for r, t, p, _ in group.outbox}
        await conn.executemany(
            "INSERT INTO retained(topic, revision, payload) VALUES (?,?,?) "
            "ON CONFLICT(topic) DO UPDATE SET revision=excluded.revision, "
            "payload=excluded.payload",
            list(latest.values()),
        )

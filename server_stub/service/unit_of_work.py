"""The unit of work: one admin change as ONE database transaction.

Inside it an operation changes the state and emits the MQTT messages that describe the
result. On exit the tenant revision is bumped, the audit log gets a line, the messages go
to the outbox (and the latest payload per topic to `retained`), all in the same commit.
Publishing happens later, in `server_stub/publisher.py`, so a crash at any point loses
nothing and publishes nothing uncommitted. An exception rolls everything back.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
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
        await self.conn.executemany(sql, rows)

    async def rows(self, sql: str, args: Iterable[Any] = ()) -> list[Row]:
        return list(await (await self.conn.execute(sql, tuple(args))).fetchall())

    async def row(self, sql: str, args: Iterable[Any] = ()) -> Row | None:
        return await (await self.conn.execute(sql, tuple(args))).fetchone()


class UnitOfWork:
    """Opens the write transactions of one tenant; `actor` and `on_commit` may be changed
    after construction (the server sets them once the publisher exists). `actor` names the
    changes made outside any request (`CURRENT_ACTOR` unset): the CLI's (`via` "cli"), or
    the server's own (`via` "server")."""

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

    @asynccontextmanager
    async def write(
        self, operation: str, detail: Mapping[str, Any], *, actor: str | None = None
    ) -> AsyncIterator[Tx]:
        """`actor` names who decided when it is not this service's actor (a rollout's gate)."""
        async with self.database.write() as conn:
            tx = Tx(conn, self.tenant, await read_revision(conn) + 1, self.clock())
            yield tx
            who = CURRENT_ACTOR.get() or Actor(actor or self.actor, "admin", self.via)
            await _commit_bookkeeping(tx, who, operation, detail)
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


def _log_context(revision: int, operation: str, detail: Mapping[str, Any]) -> dict[str, Any]:
    """The add-in and user a change names, for structured logs."""
    addin = detail.get("addin") or (detail.get("id") if operation in _ADDIN_OPS else None)
    user = detail.get("user") or (detail.get("id") if operation.endswith("_user") else None)
    if detail.get("target") == "user":
        user = detail.get("target_id")
    return context(revision=revision, operation=operation, addin=addin, user=user)


_ADDIN_OPS = frozenset({"add_lob", "consent", "enable", "disable", "remove"})


async def _commit_bookkeeping(
    tx: Tx, actor: Actor, operation: str, detail: Mapping[str, Any]
) -> None:
    """Revision, audit line, outbox and retained rows: the same commit as the change."""
    await tx.execute("UPDATE meta SET value=? WHERE key='revision'", (str(tx.revision),))
    await tx.execute(
        "INSERT INTO audit(revision, at, actor, role, via, operation, detail) "
        "VALUES (?,?,?,?,?,?,?)",
        (tx.revision, tx.now, actor.name, actor.role, actor.via, operation,
         json.dumps(detail, default=str)),
    )
    msgs = [(tx.revision, t, p, tx.now) for t, p in tx.messages.items()]
    await tx.executemany(
        "INSERT INTO outbox(revision, topic, payload, created_at) VALUES (?,?,?,?)", msgs
    )
    await tx.executemany(
        "INSERT INTO retained(topic, revision, payload) VALUES (?,?,?) "
        "ON CONFLICT(topic) DO UPDATE SET revision=excluded.revision, "
        "payload=excluded.payload",
        [(t, r, p) for r, t, p, _ in msgs],
    )

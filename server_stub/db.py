"""The server's state: SQLite in one file (the default), or a PostgreSQL database.

Everything the deployment service knows lives here: directory (users, groups,
memberships, nesting), catalog (add-ins, their versions, manifest bytes by sha256),
assignments, policy, the tenant revision counter, the audit log, the outbox of messages
still to publish, the latest retained payload per topic, and the agents' reports.

`Database.open` takes a file path (SQLite) or a ``postgresql://`` URL. The schema is the
numbered migrations of `server_stub/migrations.py`, applied on open; the SQL is written
once, in the dialect of `server_stub/sql.py`, which PostgreSQL's connections translate
(`server_stub/pg.py`), so the services never ask which engine they run on.

SQLite: WAL mode lets the HTTP server, the publisher and CLI commands run by other
processes read while one of them writes; writers take the lock up front (``BEGIN
IMMEDIATE``) so two writers never deadlock on a lock upgrade. PostgreSQL: writers take an
advisory lock first, the same one-writer-at-a-time order across every replica
(`server_stub/pg.py` says why that is enough).

`Database` is the one owner of connections: the API, the CLI, anti-entropy and the
publisher call its methods (or the service's), never a connection. The SQL of the domain
operations lives in `server_stub/service/`; this module and that package are the whole of
the server's SQL.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import AsyncIterator, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiosqlite

from addin_runtime.sqlite_tx import transaction
from server_stub import migrations
from server_stub.db_target import is_url
from server_stub.sql import Conn, Dialect, Row, TransientError

if TYPE_CHECKING:
    from server_stub.pg import PgBackend

__all__ = ["TRANSIENT_ERRORS", "Conn", "Database", "DatabaseError", "Row", "connect"]


TRANSIENT_ERRORS: tuple[type[Exception], ...] = (sqlite3.OperationalError, TransientError)
"""The backend's errors that mean "not now": locked by another writer past the busy
timeout, disk full, I/O error, the PostgreSQL server unreachable. The transaction was
rolled back; a retry may work."""


async def _note_published(conn: Conn, last_id: int) -> None:
    """Raise the published revision to that of outbox row `last_id` (rows are in commit
    order, so it is the highest one up to there); what the broker's marker is checked
    against after a reconnect."""
    await conn.execute(
        "INSERT INTO meta(key, value) SELECT 'published_revision', CAST(r AS TEXT) FROM "
        "(SELECT revision AS r FROM outbox WHERE id<=? ORDER BY id DESC LIMIT 1) AS last "
        "WHERE true ON CONFLICT(key) DO UPDATE SET value=CASE WHEN "
        "CAST(excluded.value AS INTEGER) > CAST(meta.value AS INTEGER) "
        "THEN excluded.value ELSE meta.value END",
        (last_id,),
    )


class DatabaseError(RuntimeError):
    """The database belongs to another tenant, has an unknown schema, or cannot be reached."""


async def connect(path: str | Path) -> aiosqlite.Connection:
    """Open an SQLite database (migrating its schema) with the settings every user needs."""
    # How long a writer waits for another one's lock before failing with a clear error
    # (ADDIN_SERVER_BUSY_TIMEOUT seconds, default 30).
    busy = float(os.environ.get("ADDIN_SERVER_BUSY_TIMEOUT", "30"))
    conn = await aiosqlite.connect(str(path), isolation_level=None, timeout=busy)
    try:
        conn.row_factory = aiosqlite.Row
        await conn.execute(f"PRAGMA busy_timeout={int(busy * 1000)}")
        await conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL is durable across process crashes in WAL mode; only an OS crash can lose
        # the last transactions, which the outbox then never published either.
        await conn.execute("PRAGMA synchronous=NORMAL")
        await conn.execute("PRAGMA foreign_keys=ON")

        async def has_column(table: str, column: str) -> bool:
            cur = await conn.execute("SELECT name FROM pragma_table_info(?)", (table,))
            return column in {str(r[0]) for r in await cur.fetchall()}

        async with transaction(conn):
            await _migrate(conn, "sqlite", has_column)
    except BaseException:
        # An open aiosqlite connection keeps a non-daemon thread: without this close, a
        # CLI command facing a locked database printed nothing and never exited.
        await conn.close()
        raise
    return conn


async def _migrate(conn: Conn, dialect: Dialect, has_column: Any) -> None:
    try:
        await migrations.migrate(conn, dialect, has_column)
    except migrations.SchemaTooNew as e:
        raise DatabaseError(str(e)) from None


async def read_revision(conn: Conn) -> int:
    """The tenant revision: the number of the last committed change."""
    row = await (await conn.execute("SELECT value FROM meta WHERE key='revision'")).fetchone()
    return int(row[0]) if row else 0


class Database:
    """The server's database: one SQLite connection and the lock that orders its
    transactions, or a pool of PostgreSQL connections.

    One aiosqlite connection runs one transaction at a time; concurrent API requests
    queue on the lock instead of failing with "cannot start a transaction within a
    transaction". On PostgreSQL each transaction has a connection of its own."""

    def __init__(self, conn: aiosqlite.Connection | None, pg: PgBackend | None = None) -> None:
        self._conn = conn
        self._pg = pg
        self.dialect: Dialect = "sqlite" if pg is None else "postgresql"
        self._lock = asyncio.Lock()

    @property
    def conn(self) -> aiosqlite.Connection:
        """The SQLite connection, for tests of that backend only."""
        assert self._conn is not None, "not an SQLite database"
        return self._conn

    @classmethod
    async def open(cls, target: str | Path, *, pool_size: int = 8) -> Database:
        """`target`: an SQLite file, or a ``postgresql://`` URL (`pool_size` connections
        at most)."""
        if not is_url(target):
            return cls(await connect(target))
        from server_stub import pg  # the driver, only for PostgreSQL

        try:
            backend = await pg.PgBackend.open(str(target), pool_size)
        except ConnectionError as e:
            raise DatabaseError(str(e)) from None
        database = cls(None, backend)
        try:
            async with backend.transaction(write=True, lock=pg.MIGRATION_LOCK) as conn:

                async def has_column(table: str, column: str) -> bool:
                    return await backend.has_column(conn, table, column)

                await _migrate(conn, "postgresql", has_column)
        except BaseException:
            await backend.close()
            raise
        return database

    @property
    def is_postgresql(self) -> bool:
        return self._pg is not None

    async def publisher_running(self) -> bool | None:
        """PostgreSQL: whether a `serve` replica holds the outbox (None on SQLite, where the
        file's instance lock says it)."""
        return await self._pg.leader_held() if self._pg is not None else None

    async def close(self) -> None:
        if self._pg is not None:
            await self._pg.close()
        else:
            await self.conn.close()

    async def bind_tenant(self, tenant: str) -> None:
        """Record the tenant on first use; refuse a database of another tenant."""
        async with self.write() as conn:
            row = await (await conn.execute("SELECT value FROM meta WHERE key='tenant'")).fetchone()
            if row is None:
                await conn.execute("INSERT INTO meta(key, value) VALUES ('tenant', ?)", (tenant,))
            elif row[0] != tenant:
                raise DatabaseError(
                    f"database belongs to tenant {row[0]!r}, not {tenant!r}; one tenant per server"
                )

    async def stored_tenant(self) -> str | None:
        rows = await self.rows("SELECT value FROM meta WHERE key='tenant'")
        return str(rows[0][0]) if rows else None

    def write(self) -> AbstractAsyncContextManager[Conn]:
        """A write transaction, one at a time across every process on the database:
        committed on exit, rolled back on error."""
        if self._pg is not None:
            return self._pg.transaction(write=True)
        return self._sqlite_tx(immediate=True)

    def snapshot(self) -> AbstractAsyncContextManager[Conn]:
        """A read transaction: every SELECT inside sees one commit."""
        if self._pg is not None:
            return self._pg.transaction(write=False)
        return self._sqlite_tx(immediate=False)

    @asynccontextmanager
    async def _sqlite_tx(self, *, immediate: bool) -> AsyncIterator[Conn]:
        # Reads under the lock too: the connection is shared with the writes, and a BEGIN
        # must not interleave with theirs.
        async with self._lock, transaction(self.conn, immediate=immediate) as conn:
            yield conn

    async def rows(self, sql: str, args: Iterable[Any] = ()) -> list[Row]:
        """The rows of one statement, outside any transaction of ours."""
        if self._pg is not None:
            async with self._pg.autocommit() as conn:
                return list(await (await conn.execute(sql, tuple(args))).fetchall())
        return list(await (await self.conn.execute(sql, tuple(args))).fetchall())

    async def execute(self, sql: str, args: Iterable[Any] = ()) -> None:
        """One statement in its own transaction (autocommit)."""
        if self._pg is not None:
            async with self._pg.autocommit() as conn:
                await conn.execute(sql, tuple(args))
        else:
            await self.conn.execute(sql, tuple(args))

    async def revision(self) -> int:
        rows = await self.rows("SELECT value FROM meta WHERE key='revision'")
        return int(rows[0][0]) if rows else 0

    async def reports_since(self, generation: int) -> tuple[int, list[tuple[str, str, str]]]:
        """(the reports generation now, the (client id, user id, applied JSON) of every
        report stored by a write of a later generation than `generation`), read in one
        transaction. Reports are only ever inserted or replaced, never deleted, so these
        rows are the whole change since `generation` (-1: every report)."""
        async with self.snapshot() as conn:
            now = await _reports_generation(conn)
            if now == generation:
                return now, []
            cur = await conn.execute(
                "SELECT client_id, user_id, applied FROM reports WHERE generation > ?",
                (generation,),
            )
            rows = await cur.fetchall()
        return now, [(str(r[0]), str(r[1]), str(r[2])) for r in rows]

    async def manifest(self, sha256: str) -> bytes | None:
        """Manifest bytes by content hash."""
        rows = await self.rows("SELECT content FROM manifests WHERE sha256=?", (sha256,))
        return bytes(rows[0][0]) if rows else None

    async def user_ids(self) -> list[str]:
        return [str(r[0]) for r in await self.rows("SELECT id FROM users ORDER BY id")]

    # -- outbox: written by the service's units of work, drained by the publisher ----------

    async def outbox_waiting(self, revision: int | None = None) -> int:
        """Messages committed and not yet acknowledged by the broker (of one revision)."""
        sql = "SELECT count(*) FROM outbox WHERE published_at IS NULL"
        rows = await self.rows(sql + (" AND revision=?" if revision is not None else ""),
                               () if revision is None else (revision,))  # fmt: skip
        return int(rows[0][0])

    async def outbox_backlog(self) -> dict[str, Any]:
        """What waits to be published: how many messages, since when."""
        rows = await self.rows(
            "SELECT count(*), min(created_at) FROM outbox WHERE published_at IS NULL"
        )
        n, oldest = rows[0]
        return {"waiting": int(n), "oldest_created_at": oldest}

    async def outbox_batch(self, limit: int) -> list[tuple[int, int, str, bytes]]:
        """The oldest `limit` messages not yet published, in commit order: (id, revision,
        topic, payload)."""
        rows = await self.rows(
            "SELECT id, revision, topic, payload FROM outbox WHERE published_at IS NULL "
            "ORDER BY id LIMIT ?",
            (limit,),
        )
        return [(int(r[0]), int(r[1]), str(r[2]), bytes(r[3])) for r in rows]

    async def mark_published(self, first_id: int, last_id: int, at: float) -> None:
        async with self.write() as conn:
            await conn.execute(
                "UPDATE outbox SET published_at=? WHERE id<=? AND id>=? AND published_at IS NULL",
                (at, last_id, first_id),
            )
            await _note_published(conn, last_id)

    async def published_revision(self) -> int:
        """The revision of the last message the broker acknowledged (0: none yet)."""
        rows = await self.rows("SELECT value FROM meta WHERE key='published_revision'")
        return int(rows[0][0]) if rows else 0

    async def retained_state(
        self, newer_than: int = 0, up_to: int | None = None
    ) -> tuple[int, bool, list[tuple[str, bytes]]]:
        """(last outbox id, whether any message waits, every retained topic and payload of a
        revision above `newer_than` and at most `up_to`), read in one transaction: the outbox rows up to that
        id are exactly the ones the retained payloads cover."""
        async with self.snapshot():
            max_id = await self.rows("SELECT max(id) FROM outbox")
            pending = await self.rows("SELECT 1 FROM outbox WHERE published_at IS NULL LIMIT 1")
            retained = await self.rows(
                "SELECT topic, payload FROM retained WHERE revision > ? AND revision <= ?",
                (newer_than, 2**62 if up_to is None else up_to),
            )
        last = int(max_id[0][0] or 0) if max_id else 0
        return last, bool(pending), [(str(r[0]), bytes(r[1])) for r in retained]

    async def mark_published_up_to(self, last_id: int, at: float) -> None:
        async with self.write() as conn:
            await conn.execute(
                "UPDATE outbox SET published_at=? WHERE id<=? AND published_at IS NULL",
                (at, last_id),
            )
            await _note_published(conn, last_id)

    async def forget_published(self, before: float) -> None:
        """Drop outbox rows published before `before` (they are history)."""
        await self.execute("DELETE FROM outbox WHERE published_at < ?", (before,))

    # -- agents' reports -------------------------------------------------------------------

    async def record_reports(
        self, rows: list[tuple[Any, ...]], *, enrolled_only: bool = False
    ) -> list[tuple[str, str, str]]:
        """(client_id, user_id, revision, reported_at, received_at, applied JSON, errors
        JSON, failed JSON, cached JSON) rows, in one transaction; the (client_id, claimed user, why) of every report
        refused.

        With `enrolled_only` (the server runs with a PKI) a report is stored only when its
        client id is a device enrolled to the user it claims and not revoked: the broker
        took that client id from the device's certificate. A client id is also bound to the
        user of its first report. Reports are ordered by what
        the server can trust: a lower revision never replaces a higher one, and at equal
        revision the later received wins; `reported_at` is the agent's clock, kept only to
        show."""
        async with self.write() as conn:
            ids = sorted({str(r[0]) for r in rows})
            bound: dict[str, str] = {}
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                cur = await conn.execute(
                    "SELECT client_id, user_id FROM reports WHERE client_id IN "
                    f"({','.join('?' * len(chunk))})",
                    chunk,
                )
                bound.update({str(c): str(u) for c, u in await cur.fetchall()})
            devices = await _devices(conn, ids) if enrolled_only else {}
            accepted: list[tuple[Any, ...]] = []
            refused: list[tuple[str, str, str]] = []
            for row in rows:
                client_id, user_id = str(row[0]), str(row[1])
                if enrolled_only:
                    why = _not_enrolled(devices.get(client_id), user_id)
                    if why is not None:
                        refused.append((client_id, user_id, why))
                        continue
                owner = bound.setdefault(client_id, user_id)
                if owner == user_id:
                    accepted.append(row)
                else:
                    refused.append((client_id, user_id, f"that client reports for {owner!r}"))
            if not accepted:
                return refused
            # Each write is one reports generation, and every row it stores carries it:
            # `status` keeps its summary of the reports up to date by reading only the rows
            # of a generation above the one it reflects, whoever wrote them.
            await conn.execute(
                "INSERT INTO meta(key, value) VALUES ('reports_generation', '1') "
                "ON CONFLICT(key) DO UPDATE SET "
                "value=CAST(CAST(meta.value AS INTEGER) + 1 AS TEXT)"
            )
            generation = await _reports_generation(conn)
            await conn.executemany(
                "INSERT INTO reports(client_id, user_id, revision, reported_at, received_at, "
                "applied, errors, failed, cached, generation) VALUES (?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT(client_id) DO UPDATE SET revision=excluded.revision, "
                "reported_at=excluded.reported_at, received_at=excluded.received_at, "
                "applied=excluded.applied, errors=excluded.errors, failed=excluded.failed, "
                "cached=excluded.cached, generation=excluded.generation "
                "WHERE excluded.user_id = reports.user_id "
                "AND (excluded.revision > reports.revision OR (excluded.revision = "
                "reports.revision AND excluded.received_at >= reports.received_at))",
                [(*row, generation) for row in accepted],
            )
        return refused


async def _reports_generation(conn: Conn) -> int:
    cur = await conn.execute("SELECT value FROM meta WHERE key='reports_generation'")
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def _devices(
    conn: Conn, ids: list[str]
) -> dict[str, tuple[str, float | None]]:
    """device id -> (user id, revoked at) of the enrolled devices among `ids`."""
    found: dict[str, tuple[str, float | None]] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        cur = await conn.execute(
            "SELECT device_id, user_id, revoked_at FROM devices WHERE device_id IN "
            f"({','.join('?' * len(chunk))})",
            chunk,
        )
        found.update({str(d): (str(u), r) for d, u, r in await cur.fetchall()})
    return found


def _not_enrolled(device: tuple[str, float | None] | None, user_id: str) -> str | None:
    """Why a report claiming `user_id` from this device is refused; None: it is not."""
    if device is None:
        return "no device is enrolled with that id"
    owner, revoked_at = device
    if revoked_at is not None:
        return "that device is revoked"
    if owner != user_id:
        return f"that device is enrolled to {owner!r}"
    return None

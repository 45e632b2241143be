"""The PostgreSQL backend of `server_stub.db.Database` (psycopg 3 and its async pool).

Why psycopg and not asyncpg: docs/server.md ("PostgreSQL and several servers"). In short, psycopg's async
cursor has the DB-API shape aiosqlite has (``execute`` / ``fetchone`` / ``rowcount``), so the
services run the same code on both engines, and its pool checks and resets connections.

Transactions: the server's writes are serialized as on SQLite. Each write transaction first
takes a transaction-level advisory lock (`WRITE_LOCK`), so writers of one database, in
every replica, run one at a time: the tenant revision is read and bumped by one writer,
and outbox ids (a sequence, taken inside that lock) are in commit order, which the
publisher relies on. Statements in READ COMMITTED then see every change committed before
the lock was granted. Read transactions are REPEATABLE READ READ ONLY: one snapshot.

`LEADER_LOCK` is the session-level advisory lock the replica that drains the outbox holds
(`server_stub/replicas.py`); `MIGRATION_LOCK` orders replicas migrating a new database.
Advisory locks are per database, so tenants on one PostgreSQL server never contend.

Every write transaction also queues a notification on `OUTBOX_CHANNEL`, delivered at its
commit: the leader listens, so a change committed on any replica (or by a CLI) is published
at once instead of at the leader's next poll.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from typing import Any

import psycopg
from psycopg.rows import RowMaker
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from addin_runtime.tasks import to_completion
from server_stub.db_target import describe
from server_stub.sql import TransientError, to_postgresql

_NAMESPACE = 0x41444450  # "ADDP": the first half of every advisory lock key of ours
WRITE_LOCK = (_NAMESPACE, 1)
LEADER_LOCK = (_NAMESPACE, 2)
MIGRATION_LOCK = (_NAMESPACE, 3)
OUTBOX_CHANNEL = "addin_outbox"

CONNECT_TIMEOUT = 10.0
"""Seconds to reach PostgreSQL at open before saying it cannot be reached."""


class PgRow(tuple[Any, ...]):
    """A row readable by position and by column name, like sqlite3.Row."""

    _index: dict[str, int]

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return tuple.__getitem__(self, self._index[key])
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._index)


def _row_factory(cursor: psycopg.AsyncCursor[Any]) -> RowMaker[PgRow]:
    names = [c.name for c in cursor.description or ()]
    index = {n: i for i, n in enumerate(names)}

    def make(values: Sequence[Any]) -> PgRow:
        row = PgRow(values)
        row._index = index
        return row

    return make


class PgConn:
    """A psycopg connection that speaks the server's SQL dialect (`server_stub/sql.py`)."""

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self._conn = conn

    async def execute(self, sql: str, parameters: Sequence[Any] = ()) -> psycopg.AsyncCursor[PgRow]:
        cur = self._conn.cursor(row_factory=_row_factory)
        with _transient():
            await cur.execute(to_postgresql(sql), tuple(parameters))
        return cur

    async def executemany(self, sql: str, parameters: Iterable[Iterable[Any]]) -> None:
        rows = [tuple(p) for p in parameters]
        if rows:
            with _transient():
                async with self._conn.cursor() as cur:
                    await cur.executemany(to_postgresql(sql), rows)


@contextmanager
def _transient() -> Iterator[None]:
    """The driver's "not now" errors as the server's `TransientError` (`db.TRANSIENT_ERRORS`
    names no driver class, so commands on SQLite never import psycopg)."""
    try:
        yield
    except psycopg.OperationalError as e:
        raise TransientError(_cause(e)) from e


class PgBackend:
    """A pool of connections to one PostgreSQL database."""

    def __init__(self, url: str, pool: AsyncConnectionPool[Any]) -> None:
        self.url = url
        self.pool = pool

    @classmethod
    async def open(cls, url: str, max_size: int = 8) -> PgBackend:
        # One connection first: its error is the one line to show, where the pool would
        # log each of its retries and then time out.
        try:
            first = await psycopg.AsyncConnection.connect(
                url, connect_timeout=int(CONNECT_TIMEOUT)
            )
        except psycopg.Error as e:
            raise ConnectionError(f"cannot connect to {describe(url)}: {_cause(e)}") from None
        await first.close()
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            url,
            min_size=1,
            max_size=max_size,
            open=False,
            kwargs={"autocommit": True, "connect_timeout": int(CONNECT_TIMEOUT)},
            # A connection PostgreSQL dropped while idle (a restart, a failover) is found
            # and replaced when taken, not by the request that would use it.
            check=AsyncConnectionPool.check_connection,
        )
        try:
            await pool.open(wait=True, timeout=CONNECT_TIMEOUT)
        except (PoolTimeout, psycopg.Error) as e:
            await pool.close()
            raise ConnectionError(f"cannot connect to {describe(url)}: {_cause(e)}") from None
        return cls(url, pool)

    async def close(self) -> None:
        await self.pool.close()

    @asynccontextmanager
    async def transaction(
        self, *, write: bool, lock: tuple[int, int] = WRITE_LOCK
    ) -> AsyncIterator[PgConn]:
        # Autocommit connections with BEGIN/COMMIT of our own: a cancelled or failed
        # transaction is rolled back here, and the pool discards a connection left in any
        # other state (a statement still running when the task was cancelled).
        with _transient():
            async with self.pool.connection() as raw:
                try:
                    if write:
                        # One round trip (no parameters: one simple query of three
                        # statements). The NOTIFY is delivered only if the transaction
                        # commits; a write without messages costs the leader one empty read.
                        await raw.execute(
                            "BEGIN ISOLATION LEVEL READ COMMITTED; "
                            f"SELECT pg_advisory_xact_lock({int(lock[0])}, {int(lock[1])}); "
                            f"NOTIFY {OUTBOX_CHANNEL}"
                        )
                    else:
                        await raw.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    yield PgConn(raw)
                    await to_completion(raw.execute("COMMIT"))
                except BaseException:
                    with suppress(Exception):
                        await to_completion(raw.execute("ROLLBACK"))
                    raise

    @asynccontextmanager
    async def autocommit(self) -> AsyncIterator[PgConn]:
        with _transient():
            async with self.pool.connection() as raw:
                yield PgConn(raw)

    async def has_column(self, conn: PgConn, table: str, column: str) -> bool:
        cur = await conn.execute(
            "SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema() "
            "AND table_name=? AND column_name=?",
            (table, column),
        )
        return await cur.fetchone() is not None

    async def leader_held(self) -> bool:
        """Whether a replica holds the outbox leader lock (a `serve` is publishing)."""
        async with self.autocommit() as conn:
            cur = await conn.execute(
                "SELECT 1 FROM pg_locks WHERE locktype='advisory' AND granted "
                "AND database=(SELECT oid FROM pg_database WHERE datname=current_database()) "
                "AND classid=? AND objid=? AND objsubid=2",
                (LEADER_LOCK[0], LEADER_LOCK[1]),
            )
            return await cur.fetchone() is not None


def _cause(e: Exception) -> str:
    """The first line of a driver error (the rest is a hint or a repeat)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0].strip()

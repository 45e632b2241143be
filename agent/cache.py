"""The agent's SQLite cache: the durable copy of everything the daemon knows.

The daemon keeps its working model in memory and writes every state transition through
`Cache.commit` as ONE transaction, so `kill -9` at any instant leaves either the state
before or the state after. WAL mode: readers (the troubleshooting commands, through
`open_readonly`) never block the writer and never see half a transition.

A file cache goes through aiosqlite (one worker thread, so the event loop never waits on
the disk). ``cache_path=":memory:"`` runs sqlite3 inline instead: an in-memory database
never waits on I/O, and the simulator runs thousands of agents in one process, where a
thread per agent would cost far more than the queries.

Tables (documented for helpdesk use in docs/agent.md):

received      one row per retained topic held: latest payload and its revision
entitlements  resolved add-ins with mode and provenance (JSON) and a readable `via`
manifests     manifests by sha256: verified or refused (with the reason)
installed     what each host app has, as of its last launch
pending       changes per host waiting for the next launch, with the reason they wait
choices       the user's own install/remove decisions for optional/available add-ins
events        log of what happened, in order; bounded (`Retention`): old rows are pruned
sync          key/value: connection, subscriptions, revision, first-connect marker

A file cache belongs to one process: `Cache.open` takes `<cache>.lock`
(addin_core/instance_lock.py) and a second agent on the same file is refused with the
holder's pid (`CacheInUse`).
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosqlite

from addin_runtime.instance_lock import AlreadyLocked, InstanceLock
from addin_runtime.sqlite_tx import transaction
from agent.cache_read import CacheError as CacheError  # re-exported, as before
from agent.cache_read import CacheInUse as CacheInUse
from agent.cache_read import open_readonly as open_readonly
from agent.cache_rows import SCHEMA, SCHEMA_VERSION, Row

Statement = tuple[str, Sequence[Any]]

PAGE_CACHE_KIB = 512
"""SQLite's page cache for the daemon's connection (its default is 2,000 KiB). The daemon's
queries touch a few dozen rows; what fills a larger cache is the events table (up to
`events_keep_rows`) read by retention and `why`, and it stayed resident for the daemon's life.
The file's pages remain in the system's page cache, shared, for the next read."""

MANIFEST_FIELDS = "sha256, addin_id, version, status, reason, permissions, hosts, fetched_at"
"""What the model loads of a cached manifest (agent/cache_rows.py `manifest_record`)."""


@dataclass(slots=True)
class Tx:
    """The statements of one state transition, committed together by `Cache.commit`."""

    statements: list[Statement] = field(default_factory=list)
    now: float = field(default_factory=time.time)
    sync_values: dict[str, str] = field(default_factory=dict)
    """The sync keys written (also in `statements`), for caches that keep no tables."""
    xml: dict[str, bytes] = field(default_factory=dict)
    """Manifest bytes stored by sha256 (also in `statements`)."""
    rows: bool = True
    """False for a cache that keeps no tables (`VolatileCache.keeps_rows`): no statement is
    kept, and callers may skip building rows nobody will write."""

    def __bool__(self) -> bool:
        return bool(self.statements)

    def add(self, sql: str, params: Sequence[Any] = ()) -> None:
        if self.rows:
            self.statements.append((sql, params))

    def upsert(self, table: str, row: dict[str, Any]) -> None:
        if table == "manifests" and row.get("xml") is not None:
            self.xml[row["sha256"]] = row["xml"]
        self.add(_upsert_sql(table, tuple(row)), tuple(row.values()))

    def delete(self, table: str, **where: Any) -> None:
        self.add(_delete_sql(table, tuple(where)), tuple(where.values()))

    def event(
        self,
        kind: str,
        detail: str = "",
        *,
        addin_id: str | None = None,
        host: str | None = None,
        revision: int | None = None,
    ) -> None:
        self.add(
            "INSERT INTO events (at, kind, addin_id, host, revision, detail) VALUES (?,?,?,?,?,?)",
            (self.now, kind, addin_id, host, revision, detail),
        )

    def sync(self, key: str, value: Any) -> None:
        # repr() of an int or a finite float is its JSON text, at a fraction of json.dumps.
        text = (
            value
            if isinstance(value, str)
            else repr(value)
            if type(value) is int or (type(value) is float and math.isfinite(value))
            else json.dumps(value)
        )
        self.sync_values[key] = text
        self.add("INSERT OR REPLACE INTO sync (key, value) VALUES (?, ?)", (key, text))


@functools.cache
def _upsert_sql(table: str, cols: tuple[str, ...]) -> str:
    # The same few statements are written by every transition: build each text once.
    return (
        f"INSERT OR REPLACE INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
    )


@functools.cache
def _delete_sql(table: str, cols: tuple[str, ...]) -> str:
    return f"DELETE FROM {table} WHERE {' AND '.join(f'{k} = ?' for k in cols)}"


@dataclass(frozen=True, slots=True)
class CachedRows:
    """Everything the daemon loads back when it opens the cache (`Cache.cached_rows`)."""

    received: Iterable[Row] = ()
    manifests: Iterable[Row] = ()
    installed: Iterable[Row] = ()
    pending: Iterable[Row] = ()
    choices: Iterable[Row] = ()
    entitled_ids: Iterable[str] = ()


@dataclass(frozen=True, slots=True)
class Retention:
    """How much of the event log a cache keeps: `days` of history and at most `rows` rows.

    Pruned when the cache opens and then every `every` transitions or `interval` seconds,
    whichever comes first, inside the transition's own transaction (no extra write).
    """

    days: float = 30.0
    rows: int = 10_000
    every: int = 1000
    interval: float = 3600.0

    def statement(self, now: float) -> Statement:
        return (
            "DELETE FROM events WHERE at < ? OR id <= (SELECT max(id) FROM events) - ?",
            (now - self.days * 86400, self.rows),
        )


def _run_transaction(conn: sqlite3.Connection, statements: Sequence[Statement]) -> None:
    """One transaction, on the connection's own thread (`Cache.commit`)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        for sql, params in statements:
            conn.execute(sql, params)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # a failed COMMIT may have ended it already (SQLITE_FULL)
            conn.execute("ROLLBACK")
        raise


def _init_sync(conn: sqlite3.Connection, memory: bool) -> None:
    if memory:
        # An agent's cache holds a few dozen rows per table; with 512-byte pages an in-memory
        # database costs ~65 KB instead of ~125 KB (measured), which counts at 10,000 agents.
        conn.execute("PRAGMA page_size=512")
    else:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise CacheError(f"could not switch the cache to WAL mode (got {mode})")
        conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(SCHEMA)
    conn.execute(
        "INSERT OR IGNORE INTO sync (key, value) VALUES ('schema_version', ?)", (SCHEMA_VERSION,)
    )
    conn.commit()


class Cache:
    """Writable cache used by the daemon (and by `launch`/`install`/`remove` when it is down)."""

    def __init__(
        self,
        path: str,
        sync_conn: sqlite3.Connection | None,
        async_conn: aiosqlite.Connection | None,
        retention: Retention | None = None,
        lock: InstanceLock | None = None,
    ) -> None:
        self.path = path
        self._sync = sync_conn
        self._async = async_conn
        self.retention = retention or Retention()
        self._instance_lock = lock
        self._commits_since_prune = 0
        self._pruned_at = time.monotonic()
        # Transitions are committed from several tasks (messages, launches, connection
        # events). On the aiosqlite path every statement is an await, so two commits could
        # interleave: the second BEGIN fails and its ROLLBACK undoes the first one's
        # half-written transaction. One commit at a time.
        self._commit_lock = asyncio.Lock()

    keeps_rows = True

    @property
    def memory(self) -> bool:
        return self._sync is not None

    @classmethod
    async def open(cls, path: str | Path, retention: Retention | None = None) -> Cache:
        retention = retention or Retention()
        spath = str(path)
        if spath == ":memory:":
            # 8 prepared statements, not Python's 128: each costs ~3 KB per connection, and
            # keeping the hottest 8 of an agent's ~16 took 40 KB off each in-memory cache
            # for ~3 % more CPU per transition (measured with 2,000 agents in one process).
            conn = sqlite3.connect(
                ":memory:", isolation_level=None, check_same_thread=False, cached_statements=8
            )
            _init_sync(conn, memory=True)
            conn.execute(*retention.statement(time.time()))
            return cls(spath, conn, None, retention)
        await asyncio.to_thread(_check_openable, spath)
        lock = InstanceLock(spath)
        try:
            lock.acquire()
        except AlreadyLocked as e:
            raise CacheInUse(spath, e.holder.pid) from None
        except OSError as e:
            raise CacheError(f"cannot lock {lock.path}: {e.strerror or e}") from e
        try:
            return await cls._open_file(spath, retention, lock)
        except BaseException:
            lock.release()
            raise

    @classmethod
    async def _open_file(cls, spath: str, retention: Retention, lock: InstanceLock) -> Cache:
        # autocommit mode: transactions are explicit BEGIN IMMEDIATE ... COMMIT in `commit`.
        db = await aiosqlite.connect(spath, isolation_level=None, timeout=30)
        try:
            await db.execute("PRAGMA busy_timeout=30000")
            cur = await db.execute("PRAGMA journal_mode=WAL")
            row = await cur.fetchone()
            if not row or str(row[0]).lower() != "wal":
                raise CacheError(f"could not switch {spath} to WAL mode")
            await db.execute("PRAGMA synchronous=NORMAL")
            await db.execute(f"PRAGMA cache_size=-{PAGE_CACHE_KIB}")
            await db.executescript(SCHEMA)
            await db.execute(
                "INSERT OR IGNORE INTO sync (key, value) VALUES ('schema_version', ?)",
                (SCHEMA_VERSION,),
            )
            await db.execute(*retention.statement(time.time()))
        except sqlite3.DatabaseError as e:
            await db.close()
            raise CacheError(f"{spath} is not a usable agent cache: {e}") from e
        except BaseException:
            await db.close()
            raise
        return cls(spath, None, db, retention, lock)

    async def close(self) -> None:
        if self._sync is not None:
            self._sync.close()
            self._sync = None
        if self._async is not None:
            try:
                await self._async.close()
            finally:
                self._async = None
                if self._instance_lock is not None:
                    self._instance_lock.release()
                    self._instance_lock = None

    def _statements(self, tx: Tx) -> list[Statement]:
        """`tx`'s statements, plus pruning the event log when it is due."""
        self._commits_since_prune += 1
        r = self.retention
        if self._commits_since_prune < r.every and time.monotonic() - self._pruned_at < r.interval:
            return tx.statements
        self._commits_since_prune = 0
        self._pruned_at = time.monotonic()
        return [*tx.statements, r.statement(tx.now)]

    async def commit(self, tx: Tx) -> None:
        """Run every statement of `tx` in one transaction (all or nothing)."""
        if not tx.statements:
            return
        statements = self._statements(tx)
        if self._sync is not None:
            _run_transaction(self._sync, statements)
            return
        async with self._commit_lock:
            db = self._async
            if db is None:
                raise CacheError("cache is closed")
            if db.in_transaction:
                # Not left by a commit (they finish on the thread): undo it, as
                # `addin_runtime.sqlite_tx.transaction` does.
                async with transaction(db):
                    pass
            # The whole transaction in ONE call on aiosqlite's thread (its `_execute`, which
            # every public method goes through): a statement per await was five thread hops
            # per launch, each waiting for the other thread to be scheduled on a busy machine.
            # A caller cancelled meanwhile does not stop it: the transaction commits whole,
            # or rolls back whole on an error, before the next one queued on that thread.
            await db._execute(_run_transaction, db._conn, statements)

    async def sync_value(self, key: str) -> str | None:
        rows = await self.fetchall("SELECT value FROM sync WHERE key = ?", (key,))
        return str(rows[0]["value"]) if rows else None

    async def cached_rows(self) -> CachedRows:
        entitled = await self.fetchall("SELECT addin_id FROM entitlements")
        return CachedRows(
            received=await self.fetchall("SELECT topic, payload FROM received"),
            # Not the XML: the model keeps none of it, and reading 50 manifests' blobs at
            # every start filled the page cache with them.
            manifests=await self.fetchall(f"SELECT {MANIFEST_FIELDS} FROM manifests"),
            installed=await self.fetchall("SELECT * FROM installed"),
            pending=await self.fetchall("SELECT * FROM pending"),
            choices=await self.fetchall("SELECT addin_id, choice FROM choices"),
            entitled_ids=[r["addin_id"] for r in entitled],
        )

    async def manifest_xml(self, sha256: str) -> bytes | None:
        rows = await self.fetchall("SELECT xml FROM manifests WHERE sha256 = ?", (sha256,))
        return bytes(rows[0]["xml"]) if rows and rows[0]["xml"] is not None else None

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        if self._sync is not None:
            self._sync.row_factory = sqlite3.Row
            return list(self._sync.execute(sql, params).fetchall())
        db = self._async
        if db is None:
            raise CacheError("cache is closed")
        db.row_factory = sqlite3.Row
        async with db.execute(sql, params) as cur:
            return list(await cur.fetchall())


class VolatileCache:
    """``cache_path=":none:"``: no tables at all — the agent runs from its in-memory model.

    For fleet simulation at scale only: an in-memory SQLite database costs ~250 KB per agent
    (connection, lookaside, pages), the agent's own model ~40 KB. Nothing is queryable
    (`why`, `events` have nothing to read); the transitions are computed exactly as with a
    real cache, only not written. Keeps the sync keys and manifest bytes the agent reads back.
    """

    path = ":none:"
    memory = True
    keeps_rows = False

    def __init__(self) -> None:
        self._sync: dict[str, str] = {}
        self._xml: dict[str, bytes] = {}

    async def commit(self, tx: Tx) -> None:
        self._sync.update(tx.sync_values)
        self._xml.update(tx.xml)

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        return []

    async def cached_rows(self) -> CachedRows:
        return CachedRows()

    async def sync_value(self, key: str) -> str | None:
        return self._sync.get(key)

    async def manifest_xml(self, sha256: str) -> bytes | None:
        return self._xml.get(sha256)

    async def close(self) -> None:
        pass


def _check_openable(path: str) -> None:
    """Raise CacheError unless SQLite can open `path` (making its folder if need be).

    Checked in plain sqlite3 first: when aiosqlite's own connect fails, its worker thread is
    stopped without being waited for and can outlive the event loop, printing a traceback
    after the error line at exit."""
    if Path(path).is_dir():
        raise CacheError(f"cache_path {path} is a directory, not a cache file")
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        sqlite3.connect(path).close()
    except (OSError, sqlite3.Error) as e:
        raise CacheError(f"cache {path} cannot be opened: {e}") from e


async def open_cache(path: str | Path, retention: Retention | None = None) -> Cache | VolatileCache:
    """Open the cache named by `cache_path`: a file, ``:memory:`` (SQLite in memory) or
    ``:none:`` (no tables; see `VolatileCache`)."""
    if str(path) == ":none:":
        return VolatileCache()
    return await Cache.open(path, retention)

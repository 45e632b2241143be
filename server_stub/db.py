"""The server's state in one SQLite file: schema, migrations, connection settings.

Everything the deployment service knows lives here: directory (users, groups,
memberships, nesting), catalog (add-ins, their versions, manifest bytes by sha256),
assignments, policy, the tenant revision counter, the audit log, the outbox of messages
still to publish, the latest retained payload per topic, and the agents' reports.

WAL mode lets the HTTP server, the publisher and CLI commands run by other processes read
while one of them writes; writers take the lock up front (``BEGIN IMMEDIATE``) so two
writers never deadlock on a lock upgrade.

`Database` is the one owner of a connection: the API, the CLI, anti-entropy and the
publisher call its methods (or the service's), never the connection. The SQL of the
domain operations lives in `server_stub/service/`; this module and that package are the
whole of the server's SQL, so another database backend replaces them and nothing else.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite

from addin_runtime.sqlite_tx import transaction

SCHEMA_VERSION = 1

TRANSIENT_ERRORS: tuple[type[Exception], ...] = (sqlite3.OperationalError,)
"""The backend's errors that mean "not now": locked by another writer past the busy
timeout, disk full, I/O error. The transaction was rolled back; a retry may work."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS users (
    id   TEXT PRIMARY KEY,
    name TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS groups (
    id   TEXT PRIMARY KEY,
    name TEXT NOT NULL
);
-- Direct user -> group membership.
CREATE TABLE IF NOT EXISTS memberships (
    user_id  TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    group_id TEXT NOT NULL REFERENCES groups(id) ON DELETE CASCADE,
    PRIMARY KEY (user_id, group_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS memberships_by_group ON memberships(group_id);
-- Group nesting: `child` is a member of `parent`.
CREATE TABLE IF NOT EXISTS nesting (
    child  TEXT NOT NULL REFERENCES groups(id) ON DELETE CASCADE,
    parent TEXT NOT NULL REFERENCES groups(id) ON DELETE CASCADE,
    PRIMARY KEY (child, parent)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS nesting_by_parent ON nesting(parent);
-- Manifest bytes by content hash; immutable, kept even after an add-in is removed so a
-- URL once published never breaks for an agent still fetching it.
CREATE TABLE IF NOT EXISTS manifests (
    sha256  TEXT PRIMARY KEY,
    content BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS addins (
    id              TEXT PRIMARY KEY,
    source          TEXT NOT NULL CHECK (source IN ('lob', 'store')),
    store_asset_id  TEXT,
    enabled         INTEGER NOT NULL DEFAULT 1,
    current_version TEXT NOT NULL,
    -- A newer version whose hosts or permissions differ: waits for `consent`.
    pending_version TEXT,
    created_revision INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS addin_versions (
    addin_id     TEXT NOT NULL REFERENCES addins(id) ON DELETE CASCADE,
    version      TEXT NOT NULL,
    sha256       TEXT NOT NULL REFERENCES manifests(sha256),
    display_name TEXT NOT NULL,
    hosts        TEXT NOT NULL,      -- JSON list of Host values
    permissions  TEXT NOT NULL,
    added_revision INTEGER NOT NULL,
    PRIMARY KEY (addin_id, version)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS assignments (
    addin_id  TEXT NOT NULL REFERENCES addins(id) ON DELETE CASCADE,
    target    TEXT NOT NULL CHECK (target IN ('everyone', 'user', 'group')),
    target_id TEXT NOT NULL,         -- '' for everyone
    mode      TEXT NOT NULL CHECK (mode IN ('fixed', 'optional', 'available')),
    PRIMARY KEY (addin_id, target, target_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS assignments_by_target ON assignments(target, target_id);
-- Which store versions the (simulated) Store has published, per asset id.
CREATE TABLE IF NOT EXISTS store_published (
    asset_id TEXT PRIMARY KEY,
    version  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    revision  INTEGER NOT NULL,
    at        REAL NOT NULL,
    actor     TEXT NOT NULL,         -- the token's name (API, console) or OS user (CLI)
    operation TEXT NOT NULL,
    detail    TEXT NOT NULL,         -- JSON
    role      TEXT NOT NULL DEFAULT 'admin',
    via       TEXT NOT NULL DEFAULT ''   -- api, console, cli
);
CREATE INDEX IF NOT EXISTS audit_by_at ON audit(at);
-- Messages committed with their change and not yet acknowledged by the broker.
CREATE TABLE IF NOT EXISTS outbox (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    revision     INTEGER NOT NULL,
    topic        TEXT NOT NULL,
    payload      BLOB NOT NULL,
    created_at   REAL NOT NULL,
    published_at REAL
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox(id) WHERE published_at IS NULL;
-- The latest retained payload per topic (tombstones included): what a broker that lost
-- its state must be given again.
CREATE TABLE IF NOT EXISTS retained (
    topic    TEXT PRIMARY KEY,
    revision INTEGER NOT NULL,
    payload  BLOB NOT NULL
);
-- Latest report per agent client.
CREATE TABLE IF NOT EXISTS reports (
    client_id   TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL,
    revision    INTEGER NOT NULL,
    reported_at REAL NOT NULL,
    received_at REAL NOT NULL,
    applied     TEXT NOT NULL,       -- JSON list of {addin_id, version, host}
    errors      TEXT NOT NULL,       -- JSON list of strings
    failed      TEXT NOT NULL DEFAULT '[]', -- JSON list of {addin_id, version, host, reason}
    cached      TEXT NOT NULL DEFAULT '[]'  -- JSON: downloaded, waiting for the host
);
CREATE INDEX IF NOT EXISTS reports_by_user ON reports(user_id);
-- Groups and users an assignment excludes (`assign --except`): an exclusion wins over
-- every assignment of the add-in that reaches the user.
CREATE TABLE IF NOT EXISTS assignment_exceptions (
    addin_id  TEXT NOT NULL,
    target    TEXT NOT NULL,
    target_id TEXT NOT NULL,
    kind      TEXT NOT NULL CHECK (kind IN ('group', 'user')),
    id        TEXT NOT NULL,
    PRIMARY KEY (addin_id, target, target_id, kind, id),
    FOREIGN KEY (addin_id, target, target_id)
        REFERENCES assignments(addin_id, target, target_id) ON DELETE CASCADE
) WITHOUT ROWID;
-- Rollouts (`addin-server rollout start`, `rollback`): rings reached in order, each at the
-- rollout's version, with a gate computed from the agents' reports before the next ring.
CREATE TABLE IF NOT EXISTS rollouts (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    addin_id         TEXT NOT NULL REFERENCES addins(id) ON DELETE CASCADE,
    version          TEXT NOT NULL,
    from_version     TEXT NOT NULL,
    rollback         INTEGER NOT NULL DEFAULT 0,
    state            TEXT NOT NULL
        CHECK (state IN ('running', 'paused', 'completed', 'aborted', 'superseded')),
    rings            TEXT NOT NULL,  -- JSON list of {name, targets}
    gate             TEXT,           -- the gate as typed, or NULL: advanced by hand only
    reached          INTEGER NOT NULL,  -- rings reached so far (1 at start)
    ring_since       REAL NOT NULL,     -- when the last reached ring was reached
    started_revision INTEGER NOT NULL,
    updated_revision INTEGER NOT NULL,
    history          TEXT NOT NULL   -- JSON list of {at, revision, event, ring, actor}
);
CREATE INDEX IF NOT EXISTS rollouts_by_addin ON rollouts(addin_id, state);
-- Enrolled devices (`addin-server enroll`): one client certificate and one HTTP token each,
-- only the token's sha256 kept. A revoked device keeps its row (revoked_at set).
CREATE TABLE IF NOT EXISTS devices (
    device_id    TEXT PRIMARY KEY,
    user_id      TEXT NOT NULL,
    cert_serial  TEXT NOT NULL,
    token_sha256 TEXT NOT NULL,
    enrolled_at  REAL NOT NULL,
    revoked_at   REAL
);
CREATE INDEX IF NOT EXISTS devices_by_token ON devices(token_sha256);
-- Every certificate serial ever revoked (a revoked device's, and the one a re-enrollment
-- with --replace superseded): what crl.pem lists.
CREATE TABLE IF NOT EXISTS revoked_certs (
    cert_serial TEXT PRIMARY KEY,
    device_id   TEXT NOT NULL,
    revoked_at  REAL NOT NULL
);
"""


async def _note_published(conn: aiosqlite.Connection, last_id: int) -> None:
    """Raise the published revision to that of outbox row `last_id` (rows are in commit
    order, so it is the highest one up to there); what the broker's marker is checked
    against after a reconnect."""
    await conn.execute(
        "INSERT INTO meta(key, value) SELECT 'published_revision', r FROM "
        "(SELECT revision AS r FROM outbox WHERE id<=? ORDER BY id DESC LIMIT 1) WHERE true "
        "ON CONFLICT(key) DO UPDATE SET "
        "value=max(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER))",
        (last_id,),
    )


class DatabaseError(RuntimeError):
    """The database file belongs to another tenant or has an unknown schema."""


async def connect(path: str | Path) -> aiosqlite.Connection:
    """Open the database (creating the schema if needed) with the settings every user needs."""
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
        await _migrate(conn)
    except BaseException:
        # An open aiosqlite connection keeps a non-daemon thread: without this close, a
        # CLI command facing a locked database printed nothing and never exited.
        await conn.close()
        raise
    return conn


_ADDED_COLUMNS = (
    ("audit", "role", "TEXT NOT NULL DEFAULT 'admin'"),
    ("audit", "via", "TEXT NOT NULL DEFAULT ''"),
    ("reports", "cached", "TEXT NOT NULL DEFAULT '[]'"),
    ("reports", "failed", "TEXT NOT NULL DEFAULT '[]'"),
)
"""Columns added after schema 1 was released: a database made before them gets them on
open (its old audit rows were all written by admins; old reports said nothing cached and
named no per-add-in failure)."""


async def _migrate(conn: aiosqlite.Connection) -> None:
    async with transaction(conn):
        for table, column, decl in _ADDED_COLUMNS:
            cur = await conn.execute("SELECT name FROM pragma_table_info(?)", (table,))
            present = {str(r[0]) for r in await cur.fetchall()}
            if present and column not in present:
                await conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
        for statement in _split(_SCHEMA):
            await conn.execute(statement)
        row = await (await conn.execute("SELECT value FROM meta WHERE key='schema'")).fetchone()
        if row is None:
            await conn.executemany(
                "INSERT INTO meta(key, value) VALUES (?, ?)",
                [("schema", str(SCHEMA_VERSION)), ("revision", "0"), ("nested_groups", "0")],
            )
        elif int(row[0]) > SCHEMA_VERSION:
            raise DatabaseError(
                f"database schema {row[0]} is newer than this server ({SCHEMA_VERSION})"
            )



def _split(script: str) -> list[str]:
    lines = [line for line in script.splitlines() if not line.strip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


async def bind_tenant(conn: aiosqlite.Connection, tenant: str) -> None:
    """Record the tenant on first use; refuse a file that belongs to another tenant."""
    async with transaction(conn):
        row = await (await conn.execute("SELECT value FROM meta WHERE key='tenant'")).fetchone()
        if row is None:
            await conn.execute("INSERT INTO meta(key, value) VALUES ('tenant', ?)", (tenant,))
        elif row[0] != tenant:
            raise DatabaseError(
                f"database belongs to tenant {row[0]!r}, not {tenant!r}; one tenant per server"
            )


async def stored_tenant(conn: aiosqlite.Connection) -> str | None:
    row = await (await conn.execute("SELECT value FROM meta WHERE key='tenant'")).fetchone()
    return None if row is None else str(row[0])


async def read_revision(conn: aiosqlite.Connection) -> int:
    """The tenant revision: the number of the last committed change."""
    row = await (await conn.execute("SELECT value FROM meta WHERE key='revision'")).fetchone()
    return int(row[0]) if row else 0


Row = aiosqlite.Row


class Database:
    """One connection to the server's database, and the lock that orders its transactions.

    One aiosqlite connection runs one transaction at a time; concurrent API requests
    queue on the lock instead of failing with "cannot start a transaction within a
    transaction"."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self.conn = conn
        """For the service layer and tests of this backend only."""
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: str | Path) -> Database:
        return cls(await connect(path))

    async def close(self) -> None:
        await self.conn.close()

    async def bind_tenant(self, tenant: str) -> None:
        await bind_tenant(self.conn, tenant)

    async def stored_tenant(self) -> str | None:
        return await stored_tenant(self.conn)

    @asynccontextmanager
    async def write(self) -> AsyncIterator[aiosqlite.Connection]:
        """A write transaction (``BEGIN IMMEDIATE``): committed on exit, rolled back on error."""
        async with self._lock, transaction(self.conn) as conn:
            yield conn

    @asynccontextmanager
    async def snapshot(self) -> AsyncIterator[aiosqlite.Connection]:
        """A read transaction: every SELECT inside sees one commit. Under the lock because
        the connection is shared with the writes, and a BEGIN must not interleave with theirs."""
        async with self._lock, transaction(self.conn, immediate=False) as conn:
            yield conn

    async def rows(self, sql: str, args: Iterable[Any] = ()) -> list[Row]:
        return list(await (await self.conn.execute(sql, tuple(args))).fetchall())

    async def revision(self) -> int:
        return await read_revision(self.conn)

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
        self, newer_than: int = 0
    ) -> tuple[int, bool, list[tuple[str, bytes]]]:
        """(last outbox id, whether any message waits, every retained topic and payload of a
        revision above `newer_than`), read in one transaction: the outbox rows up to that
        id are exactly the ones the retained payloads cover."""
        async with self.snapshot():
            max_id = await self.rows("SELECT max(id) FROM outbox")
            pending = await self.rows("SELECT 1 FROM outbox WHERE published_at IS NULL LIMIT 1")
            retained = await self.rows(
                "SELECT topic, payload FROM retained WHERE revision > ?", (newer_than,)
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
        await self.conn.execute("DELETE FROM outbox WHERE published_at < ?", (before,))

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
            await conn.executemany(
                "INSERT INTO reports(client_id, user_id, revision, reported_at, received_at, "
                "applied, errors, failed, cached) VALUES (?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT(client_id) DO UPDATE SET revision=excluded.revision, "
                "reported_at=excluded.reported_at, received_at=excluded.received_at, "
                "applied=excluded.applied, errors=excluded.errors, failed=excluded.failed, "
                "cached=excluded.cached "
                "WHERE excluded.user_id = reports.user_id "
                "AND (excluded.revision > reports.revision OR (excluded.revision = "
                "reports.revision AND excluded.received_at >= reports.received_at))",
                accepted,
            )
        return refused


async def _devices(
    conn: aiosqlite.Connection, ids: list[str]
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

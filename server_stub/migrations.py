"""The server's schema as numbered migrations, for SQLite and PostgreSQL alike.

Each migration is one step, applied once, in number order, inside one transaction with
the others still to apply; `schema_migrations` records which ran. The SQL is written once,
in SQLite's dialect, and `server_stub/sql.py` turns its types into PostgreSQL's.

A database made before this table existed (the schema shipped at commit 6543017, and the
ones made by later code that added columns on open) has the tables of migration 1: it is
recorded as at 1 and the later steps run on it. Every later step can meet its change already
made by that code (``IF NOT EXISTS``, a column added only when missing), so such a database
upgrades like any other. A new migration is a new number at the end; a released one never
changes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from server_stub.sql import Conn, Dialect, ddl


@dataclass(frozen=True)
class AddColumn:
    table: str
    column: str
    decl: str


@dataclass(frozen=True)
class Migration:
    number: int
    what: str
    steps: tuple[str | AddColumn, ...]


_BASELINE = """
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
    actor     TEXT NOT NULL,
    operation TEXT NOT NULL,
    detail    TEXT NOT NULL          -- JSON
);
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
    errors      TEXT NOT NULL        -- JSON list of strings
);
CREATE INDEX IF NOT EXISTS reports_by_user ON reports(user_id);
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
INSERT INTO meta(key, value) VALUES ('revision', '0'), ('nested_groups', '0')
    ON CONFLICT(key) DO NOTHING
"""

_EXCEPTIONS = """
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
) WITHOUT ROWID
"""

_ROLLOUTS = """
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
CREATE INDEX IF NOT EXISTS rollouts_by_addin ON rollouts(addin_id, state)
"""


def split(script: str) -> tuple[str, ...]:
    """The statements of a script (full-line comments dropped)."""
    lines = [line for line in script.splitlines() if not line.strip().startswith("--")]
    return tuple(s.strip() for s in "\n".join(lines).split(";") if s.strip())


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "the schema shipped at commit 6543017", split(_BASELINE)),
    Migration(2, "audit: role and way in of each change", (
        # Old audit rows were all written by admins.
        AddColumn("audit", "role", "TEXT NOT NULL DEFAULT 'admin'"),
        AddColumn("audit", "via", "TEXT NOT NULL DEFAULT ''"),
        "CREATE INDEX IF NOT EXISTS audit_by_at ON audit(at)",
    )),
    Migration(3, "reports: per add-in failures, and what waits for the host", (
        # Old reports named no per-add-in failure and said nothing cached.
        AddColumn("reports", "failed", "TEXT NOT NULL DEFAULT '[]'"),
        AddColumn("reports", "cached", "TEXT NOT NULL DEFAULT '[]'"),
    )),
    Migration(4, "assignment exclusions", split(_EXCEPTIONS)),
    Migration(5, "rollouts", split(_ROLLOUTS)),
    Migration(6, "reports: the reports generation of the write that stored each", (
        # What `status` catches up from (server_stub/service/report_summary.py). Old rows:
        # 0, older than any generation a summary starts from.
        AddColumn("reports", "generation", "INTEGER NOT NULL DEFAULT 0"),
        "CREATE INDEX IF NOT EXISTS reports_by_generation ON reports(generation)",
    )),
)  # fmt: skip

LATEST = MIGRATIONS[-1].number


class SchemaTooNew(RuntimeError):
    """The database was migrated by a newer server than this one."""


async def migrate(
    conn: Conn, dialect: Dialect, has_column: Callable[[str, str], Awaitable[bool]]
) -> list[int]:
    """Apply the migrations `conn`'s database lacks, inside the caller's transaction; the
    numbers applied."""
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations "
        "(number INTEGER PRIMARY KEY, what TEXT NOT NULL, applied_at REAL NOT NULL)"
    )
    done = {int(r[0]) for r in await (await conn.execute(
        "SELECT number FROM schema_migrations")).fetchall()}  # fmt: skip
    if not done and await has_column("meta", "key"):
        # Made before migrations were numbered: it has migration 1's tables.
        done = {1}
        await _record(conn, MIGRATIONS[0])
    if done and max(done) > LATEST:
        raise SchemaTooNew(
            f"database schema {max(done)} is newer than this server ({LATEST}); "
            "upgrade the server"
        )
    applied: list[int] = []
    for m in MIGRATIONS:
        if m.number in done:
            continue
        for step in m.steps:
            if isinstance(step, AddColumn):
                if not await has_column(step.table, step.column):
                    add = f"ALTER TABLE {step.table} ADD COLUMN {step.column} {step.decl}"
                    await conn.execute(ddl(add, dialect))
            else:
                await conn.execute(ddl(step, dialect))
        await _record(conn, m)
        applied.append(m.number)
    # What a server from before numbered migrations compares with its own version (1): a
    # newer schema makes it refuse the database instead of misreading it.
    await conn.execute(
        "INSERT INTO meta(key, value) VALUES ('schema', ?) ON CONFLICT(key) DO UPDATE "
        "SET value=excluded.value",
        (str(LATEST),),
    )
    return applied


async def _record(conn: Conn, m: Migration) -> None:
    import time

    await conn.execute(
        "INSERT INTO schema_migrations(number, what, applied_at) VALUES (?, ?, ?)",
        (m.number, m.what, time.time()),
    )

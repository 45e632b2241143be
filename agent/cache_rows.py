"""The agent cache's tables, and the one mapping between their rows and the agent's
records (entitlements, manifests, installed add-ins, pending changes, received messages).

The daemon writes rows made here (through `agent.cache.Tx`); the daemon's load and the
read-only commands (agent/readmodel.py) turn rows back into records here. What each table
holds: agent/cache.py's module doc and docs/agent.md.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from addin_core.topics import Host, ProtocolError, Topic
from agent.pending import InstalledAddin, ManifestRecord, PendingChange
from agent.resolver import Entitlement

if TYPE_CHECKING:
    from agent.losses import Loss
    from agent.state import Held, ReceivedState

log = logging.getLogger("addin_agent.cache")

Row = sqlite3.Row | Mapping[str, Any]

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS received (
    topic        TEXT PRIMARY KEY,
    kind         TEXT NOT NULL,
    addin_id     TEXT,
    group_id     TEXT,
    revision     INTEGER NOT NULL,
    committed_at REAL,
    received_at  REAL NOT NULL,
    deleted      INTEGER NOT NULL DEFAULT 0,
    payload      TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS entitlements (
    addin_id    TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    mode        TEXT NOT NULL,
    version     TEXT NOT NULL,
    sha256      TEXT NOT NULL,
    hosts       TEXT NOT NULL,
    permissions TEXT NOT NULL,
    via         TEXT NOT NULL,
    provenance  TEXT NOT NULL,
    resolved_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS manifests (
    sha256      TEXT PRIMARY KEY,
    addin_id    TEXT NOT NULL,
    version     TEXT NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('verified', 'refused')),
    reason      TEXT,
    permissions TEXT,
    hosts       TEXT,
    size        INTEGER,
    fetched_at  REAL NOT NULL,
    xml         BLOB
);
CREATE TABLE IF NOT EXISTS installed (
    host         TEXT NOT NULL,
    addin_id     TEXT NOT NULL,
    name         TEXT NOT NULL,
    version      TEXT NOT NULL,
    sha256       TEXT NOT NULL,
    permissions  TEXT NOT NULL,
    hosts        TEXT NOT NULL,
    installed_at REAL NOT NULL,
    revision     INTEGER NOT NULL,
    PRIMARY KEY (host, addin_id)
);
CREATE TABLE IF NOT EXISTS pending (
    host         TEXT NOT NULL,
    addin_id     TEXT NOT NULL,
    name         TEXT NOT NULL,
    action       TEXT NOT NULL CHECK (action IN ('install', 'update', 'remove')),
    from_version TEXT,
    to_version   TEXT,
    sha256       TEXT,
    state        TEXT NOT NULL CHECK (state IN ('ready', 'waiting', 'needs_consent')),
    reason       TEXT NOT NULL,
    since        REAL NOT NULL,
    revision     INTEGER NOT NULL,
    committed_at REAL,
    PRIMARY KEY (host, addin_id)
);
CREATE TABLE IF NOT EXISTS choices (
    addin_id TEXT PRIMARY KEY,
    choice   TEXT NOT NULL CHECK (choice IN ('install', 'remove')),
    at       REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    at       REAL NOT NULL,
    kind     TEXT NOT NULL,
    addin_id TEXT,
    host     TEXT,
    revision INTEGER,
    detail   TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS events_at ON events (at);
CREATE TABLE IF NOT EXISTS lost (
    addin_id TEXT PRIMARY KEY,
    cause    TEXT NOT NULL,
    target   TEXT,
    group_id TEXT,
    path     TEXT,
    link     TEXT,
    revision INTEGER,
    at       REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS former_names (
    addin_id TEXT NOT NULL,
    name     TEXT NOT NULL,
    until    REAL NOT NULL,
    revision INTEGER NOT NULL,
    PRIMARY KEY (addin_id, name)
);
CREATE TABLE IF NOT EXISTS sync (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

TABLES = (
    "received",
    "entitlements",
    "manifests",
    "installed",
    "pending",
    "choices",
    "events",
    "sync",
)
"""The tables every agent cache has (`open_readonly` refuses a file without them). Not
``lost`` and ``former_names``, added later: a cache written by an older agent lacks them until
its daemon opens it again, and `why` reads them as empty meanwhile."""


# -- rows <-> records: the one place that knows how each record is stored -----------------------
def hosts_text(hosts: Iterable[Host]) -> str:
    return ",".join(h.value for h in hosts)


def hosts_parse(text: str | None) -> tuple[Host, ...]:
    return tuple(Host(h) for h in (text or "").split(",") if h)


def received_row(topic: Topic, held: Held, now: float) -> dict[str, Any]:
    return {
        "topic": str(topic),
        "kind": topic.kind.value,
        "addin_id": topic.addin_id,
        "group_id": topic.group_id,
        "revision": held.revision,
        "committed_at": held.committed_at,
        "received_at": now,
        "deleted": int(getattr(held.payload, "deleted", False) is True),
        "payload": held.payload.model_dump_json(exclude_none=True),
    }


def lost_row(addin_id: str, loss: Loss, revision: int, at: float) -> dict[str, Any]:
    g = loss.grant
    return {
        "addin_id": addin_id,
        "cause": loss.cause,
        "target": g.target,
        "group_id": g.group_id,
        "path": json.dumps(list(g.path)),
        "link": json.dumps(list(loss.link)) if loss.link else None,
        "revision": revision,
        "at": at,
    }


def former_name_row(addin_id: str, name: str, revision: int, at: float) -> dict[str, Any]:
    return {"addin_id": addin_id, "name": name, "until": at, "revision": revision}


def entitlement_row(e: Entitlement, now: float) -> dict[str, Any]:
    return {
        "addin_id": e.addin_id,
        "name": e.name,
        "mode": e.mode.value,
        "version": e.version,
        "sha256": e.sha256,
        "hosts": hosts_text(e.hosts),
        "permissions": e.permissions,
        "via": "; ".join(g.describe() for g in e.grants),
        "provenance": json.dumps([g.to_json() for g in e.grants]),
        "resolved_at": now,
    }


def manifest_row(m: ManifestRecord, xml: bytes | None, keep_xml: bool) -> dict[str, Any]:
    return {
        "sha256": m.sha256,
        "addin_id": m.addin_id,
        "version": m.version,
        "status": m.status,
        "reason": m.reason,
        "permissions": m.permissions,
        "hosts": hosts_text(m.hosts),
        "size": len(xml) if xml is not None else None,
        "fetched_at": m.fetched_at,
        "xml": xml if keep_xml else None,
    }


def manifest_record(r: Row) -> ManifestRecord:
    return ManifestRecord(
        r["sha256"],
        r["addin_id"],
        r["version"],
        r["status"],
        r["reason"],
        r["permissions"],
        hosts_parse(r["hosts"]),
        r["fetched_at"],
    )


def installed_row(i: InstalledAddin) -> dict[str, Any]:
    return {
        "host": i.host.value,
        "addin_id": i.addin_id,
        "name": i.name,
        "version": i.version,
        "sha256": i.sha256,
        "permissions": i.permissions,
        "hosts": hosts_text(i.hosts),
        "installed_at": i.installed_at,
        "revision": i.revision,
    }


def installed_record(r: Row) -> InstalledAddin:
    return InstalledAddin(
        Host(r["host"]),
        r["addin_id"],
        r["name"],
        r["version"],
        r["sha256"],
        r["permissions"],
        hosts_parse(r["hosts"]),
        r["installed_at"],
        r["revision"],
    )


def pending_row(p: PendingChange) -> dict[str, Any]:
    return {
        "host": p.host.value,
        "addin_id": p.addin_id,
        "name": p.name,
        "action": p.action,
        "from_version": p.from_version,
        "to_version": p.to_version,
        "sha256": p.sha256,
        "state": p.state,
        "reason": p.reason,
        "since": p.since,
        "revision": p.revision,
        "committed_at": p.committed_at,
    }


def pending_record(r: Row) -> PendingChange:
    return PendingChange(
        Host(r["host"]),
        r["addin_id"],
        r["name"],
        r["action"],
        r["from_version"],
        r["to_version"],
        r["sha256"],
        r["state"],
        r["reason"],
        r["since"],
        r["revision"],
        r["committed_at"],
    )


def received_state(
    rows: Iterable[Row], tenant: str, *, quiet: bool = False, revalidate: bool = True
) -> ReceivedState:
    """The state held, rebuilt from the ``received`` rows; an unreadable row (only a hand
    edit makes one) is skipped, and logged unless `quiet` (the read-only commands).

    `revalidate` runs each row through the protocol's models again (the daemon, on opening
    its cache); without it the rows are rebuilt as `agent.cache_payloads` dataclasses, which
    the read-only commands use because they cannot afford pydantic's import."""
    from agent.state import ReceivedState

    if revalidate:
        # Here, not at the top: the models (pydantic) are imported only when used.
        from addin_core.protocol import decode
    else:
        from agent.cache_payloads import from_cache as decode  # type: ignore[assignment]

    state = ReceivedState(tenant)
    for r in rows:
        try:
            topic = Topic.parse(r["topic"])
            payload = decode(topic, r["payload"])
        except ProtocolError as e:
            if not quiet:
                log.error("ignoring unreadable cached message %s: %s", r["topic"], e)
            continue
        state.apply(topic, payload)
    return state

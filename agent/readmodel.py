"""What the read-only commands (`status`, `list`, `why`, `events`, `query`, `doctor`, `wait`)
see of the cache: typed records read from a read-only connection (`agent.cache.open_readonly`).

The only SQL those commands run is here; records come from the rows through
agent/cache_rows.py, the mapping the daemon writes with.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from addin_core.topics import Host
from agent.cache_rows import (
    hosts_parse,
    installed_record,
    manifest_record,
    pending_record,
    received_state,
)
from agent.pending import InstalledAddin, ManifestRecord, PendingChange

if TYPE_CHECKING:  # `status` and `list` never decode payloads: no pydantic for them
    from agent.state import ReceivedState

COUNTED = ("received", "entitlements", "manifests", "installed", "pending", "events")
"""The tables `status` counts."""


@dataclass(frozen=True, slots=True)
class EntitlementRecord:
    """An entitlement as the daemon last resolved it (without its provenance JSON)."""

    addin_id: str
    name: str
    mode: str
    version: str
    sha256: str
    hosts: tuple[Host, ...]
    permissions: str
    via: str
    resolved_at: float


@dataclass(frozen=True, slots=True)
class EventRecord:
    id: int
    at: float
    kind: str
    addin_id: str | None
    host: str | None
    revision: int | None
    detail: str


@dataclass(frozen=True, slots=True)
class SignatureRefusal:
    """A state message the daemon refused for its signature (an event ``signature_refused``)."""

    at: float
    topic: str
    reason: str
    """``unsigned`` or ``bad signature``."""
    detail: str


def _refusal(at: float, detail: str) -> SignatureRefusal:
    # The event's detail is `SignatureRefused`'s text: "<topic>: <reason>: <why>".
    topic, _, rest = detail.partition(": ")
    reason, _, why = rest.partition(": ")
    return SignatureRefusal(at, topic, reason, why)


@dataclass(frozen=True, slots=True)
class LostRecord:
    """How the last assignment of an add-in that reached the user went away (table ``lost``,
    written by the daemon when it happened: agent/losses.py)."""

    addin_id: str
    cause: str
    target: str | None
    group_id: str | None
    path: tuple[str, ...]
    link: tuple[str, ...]
    revision: int | None
    at: float


@dataclass(frozen=True, slots=True)
class HeldRow:
    """When the message held on a topic was committed by the admin and received here."""

    revision: int
    committed_at: float | None
    received_at: float

    @property
    def at(self) -> float:
        return self.committed_at or self.received_at


def _json_list(text: str | None) -> tuple[str, ...]:
    try:
        v = json.loads(text) if text else []
    except json.JSONDecodeError:
        return ()
    return tuple(str(x) for x in v) if isinstance(v, list) else ()


class QueryRefused(Exception):
    """`query` SQL that failed or tried more than reading; the message says why."""


class ReadModel:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        conn.row_factory = sqlite3.Row

    # -- sync state ------------------------------------------------------------------------------
    def sync(self) -> dict[str, Any]:
        """Every sync key, its value decoded from JSON where it is JSON."""
        out: dict[str, Any] = {}
        for r in self.conn.execute("SELECT key, value FROM sync"):
            try:
                out[r["key"]] = json.loads(r["value"])
            except (json.JSONDecodeError, TypeError):
                out[r["key"]] = r["value"]
        return out

    def sync_text(self) -> dict[str, str]:
        """Every sync key with its stored text, undecoded."""
        return {r["key"]: r["value"] for r in self.conn.execute("SELECT key, value FROM sync")}

    def sync_value(self, key: str) -> Any:
        """One sync value decoded from JSON; None when absent or not JSON."""
        row = self.conn.execute("SELECT value FROM sync WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        try:
            return json.loads(row["value"])
        except (json.JSONDecodeError, TypeError):
            return None

    def client(self) -> dict[str, Any]:
        """Tenant, user, client id and hosts of the agent that wrote this cache ({} if none)."""
        info = self.sync_value("client")
        return info if isinstance(info, dict) else {}

    # -- state held ------------------------------------------------------------------------------
    def received_state(self, tenant: str) -> ReceivedState:
        rows = self.conn.execute("SELECT topic, payload FROM received")
        return received_state(rows, tenant, quiet=True, revalidate=False)

    def highest_revision(self) -> int:
        row = self.conn.execute("SELECT coalesce(max(revision), 0) FROM received").fetchone()
        return int(row[0])

    def addin_id_named(self, low: str) -> str | None:
        """An add-in id whose id or name is `low` (lower case) in what this computer has,
        waits for or is entitled to, or whose catalog entry it received (even deleted)."""
        for table in ("installed", "pending", "entitlements"):
            r = self.conn.execute(
                f"SELECT addin_id FROM {table} WHERE lower(addin_id) = ? OR lower(name) = ? "
                "LIMIT 1",
                (low, low),
            ).fetchone()
            if r:
                return str(r["addin_id"])
        r = self.conn.execute(
            "SELECT addin_id FROM received WHERE kind = 'catalog' AND lower(addin_id) = ?", (low,)
        ).fetchone()
        return str(r["addin_id"]) if r else None

    def _history(self, sql: str, params: tuple[Any, ...]) -> sqlite3.Row | None:
        """One row of a history table; None when absent, or when the table is (a cache last
        opened by an older agent: its daemon creates them when it opens it again)."""
        try:
            row: sqlite3.Row | None = self.conn.execute(sql, params).fetchone()
        except sqlite3.OperationalError as e:
            if "no such table" in str(e):
                return None
            raise
        return row

    def addin_id_formerly_named(self, low: str) -> str | None:
        """An add-in whose catalog entry was called `low` (lower case) before a rename or its
        removal: the most recent one."""
        r = self._history(
            "SELECT addin_id FROM former_names WHERE lower(name) = ? ORDER BY until DESC LIMIT 1",
            (low,),
        )
        return str(r["addin_id"]) if r else None

    def former_name(self, addin_id: str) -> str | None:
        """The last name `addin_id` had before its entry was renamed or removed."""
        r = self._history(
            "SELECT name FROM former_names WHERE addin_id = ? ORDER BY until DESC LIMIT 1",
            (addin_id,),
        )
        return str(r["name"]) if r else None

    def installed_name(self, addin_id: str) -> str | None:
        """The name `addin_id` has in what this computer has or waits for."""
        for table in ("installed", "pending"):
            r = self.conn.execute(
                f"SELECT name FROM {table} WHERE addin_id = ? LIMIT 1", (addin_id,)
            ).fetchone()
            if r:
                return str(r["name"])
        return None

    def lost(self, addin_id: str) -> LostRecord | None:
        r = self._history("SELECT * FROM lost WHERE addin_id = ?", (addin_id,))
        if r is None:
            return None
        return LostRecord(
            r["addin_id"],
            r["cause"],
            r["target"],
            r["group_id"],
            _json_list(r["path"]),
            _json_list(r["link"]),
            r["revision"],
            float(r["at"]),
        )

    def held(self, topic: str) -> HeldRow | None:
        r = self.conn.execute(
            "SELECT revision, committed_at, received_at FROM received WHERE topic = ?", (topic,)
        ).fetchone()
        return (
            HeldRow(int(r["revision"]), r["committed_at"], float(r["received_at"])) if r else None
        )

    def entitlements(self) -> list[EntitlementRecord]:
        return [
            EntitlementRecord(
                r["addin_id"],
                r["name"],
                r["mode"],
                r["version"],
                r["sha256"],
                hosts_parse(r["hosts"]),
                r["permissions"],
                r["via"],
                r["resolved_at"],
            )
            for r in self.conn.execute("SELECT * FROM entitlements")
        ]

    def choice(self, addin_id: str) -> str | None:
        r = self.conn.execute(
            "SELECT choice FROM choices WHERE addin_id = ?", (addin_id,)
        ).fetchone()
        return str(r["choice"]) if r else None

    # -- manifests, installed, pending ---------------------------------------------------------------
    def manifest(self, sha256: str) -> ManifestRecord | None:
        r = self.conn.execute("SELECT * FROM manifests WHERE sha256 = ?", (sha256,)).fetchone()
        return manifest_record(r) if r else None

    def verified_manifest_bytes(self) -> Iterator[tuple[str, str, bytes]]:
        """(sha256, add-in id, stored bytes) of each verified manifest whose bytes are kept."""
        for r in self.conn.execute(
            "SELECT sha256, addin_id, xml FROM manifests WHERE status='verified'"
        ):
            if r["xml"] is not None:
                yield r["sha256"], r["addin_id"], bytes(r["xml"])

    def installed(self) -> list[InstalledAddin]:
        return [installed_record(r) for r in self.conn.execute("SELECT * FROM installed")]

    def installed_in(self, host: Host, addin_id: str) -> InstalledAddin | None:
        r = self.conn.execute(
            "SELECT * FROM installed WHERE host = ? AND addin_id = ?", (host.value, addin_id)
        ).fetchone()
        return installed_record(r) if r else None

    def hosts_with(self, addin_id: str) -> list[str]:
        """The host apps `addin_id` is installed in, sorted."""
        return [
            r["host"]
            for r in self.conn.execute(
                "SELECT host FROM installed WHERE addin_id = ? ORDER BY host", (addin_id,)
            )
        ]

    def detected_launch(self, host: Host, at: float) -> bool:
        """Whether the launch of `host` at `at` (an add-in's `installed_at`) was noticed by
        the host watcher rather than run by `addin-agent launch`."""
        r = self.conn.execute(
            "SELECT detail FROM events WHERE kind = 'launch' AND host = ? AND at = ? LIMIT 1",
            (host.value, at),
        ).fetchone()
        return r is not None and "(detected" in str(r["detail"])

    def hosts_running(self) -> list[str]:
        """The host apps the watcher last saw running (none without watch_hosts)."""
        running = self.sync_value("hosts_running")
        return sorted(running) if isinstance(running, dict) else []

    def pending(self) -> list[PendingChange]:
        return [pending_record(r) for r in self.conn.execute("SELECT * FROM pending")]

    def pending_in(self, host: Host, addin_id: str) -> PendingChange | None:
        r = self.conn.execute(
            "SELECT * FROM pending WHERE host = ? AND addin_id = ?", (host.value, addin_id)
        ).fetchone()
        return pending_record(r) if r else None

    def downloads_waited_for(self) -> tuple[int, str | None]:
        """(manifests some change waits to download, one such reason)."""
        row = self.conn.execute(
            "SELECT count(DISTINCT sha256), min(reason) FROM pending "
            "WHERE state = 'waiting' AND reason LIKE 'manifest not downloaded%'"
        ).fetchone()
        return int(row[0]), row[1]

    # -- counts for `status` -----------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        return {
            t: int(self.conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]) for t in COUNTED
        }

    def pending_per_host(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for r in self.conn.execute(
            "SELECT host, state, count(*) n FROM pending GROUP BY host, state"
        ):
            out.setdefault(r["host"], {})[r["state"]] = r["n"]
        return out

    def installed_per_host(self) -> dict[str, int]:
        return {
            r["host"]: r["n"]
            for r in self.conn.execute("SELECT host, count(*) n FROM installed GROUP BY host")
        }

    def manifests_refused(self) -> int:
        q = "SELECT count(*) FROM manifests WHERE status='refused'"
        return int(self.conn.execute(q).fetchone()[0])

    # -- events ------------------------------------------------------------------------------------
    def events(self, since: float, limit: int) -> list[EventRecord]:
        """The most recent `limit` events at or after `since`, oldest first."""
        return [
            EventRecord(**dict(r))
            for r in self.conn.execute(
                "SELECT * FROM (SELECT * FROM events WHERE at >= ? ORDER BY id DESC LIMIT ?) "
                "ORDER BY id",
                (since, limit),
            )
        ]

    def event_counts(self, kinds: tuple[str, ...], since: float) -> dict[str, tuple[int, float]]:
        """{kind: (how many, time of the last)} for events of `kinds` at or after `since`."""
        marks = ",".join("?" * len(kinds))
        return {
            r["kind"]: (int(r["n"]), float(r["last"]))
            for r in self.conn.execute(
                f"SELECT kind, count(*) n, max(at) last FROM events WHERE at >= ? "
                f"AND kind IN ({marks}) GROUP BY kind",
                (since, *kinds),
            )
        }

    def signature_refusals(self, addin_id: str, limit: int = 200) -> list[SignatureRefusal]:
        """The latest refusal per topic of messages about `addin_id` refused for their
        signature that no message accepted later on the same topic has superseded; latest
        first."""
        out: dict[str, SignatureRefusal] = {}
        for r in self.conn.execute(
            "SELECT at, detail FROM events WHERE kind = 'signature_refused' AND addin_id = ? "
            "ORDER BY id DESC LIMIT ?",
            (addin_id, limit),
        ):
            ref = _refusal(float(r["at"]), str(r["detail"]))
            if ref.topic in out:
                continue
            got = self.conn.execute(
                "SELECT received_at FROM received WHERE topic = ?", (ref.topic,)
            ).fetchone()
            if got is None or float(got["received_at"]) < ref.at:
                out[ref.topic] = ref
        return sorted(out.values(), key=lambda x: -x.at)

    def last_signature_refusal(self) -> SignatureRefusal | None:
        r = self.conn.execute(
            "SELECT at, detail FROM events WHERE kind = 'signature_refused' ORDER BY id DESC "
            "LIMIT 1"
        ).fetchone()
        return _refusal(float(r["at"]), str(r["detail"])) if r else None

    # -- the file itself ---------------------------------------------------------------------------
    def integrity_problems(self) -> list[str]:
        """``PRAGMA integrity_check``'s lines (``["ok"]`` for a sound file)."""
        return [str(r[0]) for r in self.conn.execute("PRAGMA integrity_check")]

    def query(self, sql: str) -> tuple[list[str], list[list[Any]]]:
        """(column names, rows) of a helpdesk's own SQL, allowed to read only."""
        # mode=ro stops writes to the cache, not ATTACH / VACUUM INTO / temp tables, which
        # write other files: allow reading only.
        self.conn.set_authorizer(_read_only)
        try:
            cur = self.conn.execute(sql)
            cols = [d[0] for d in cur.description or []]
            return cols, [list(r) for r in cur.fetchall()]
        except sqlite3.DatabaseError as e:
            if str(e) in ("not authorized", "authorization denied"):
                raise QueryRefused(
                    f"query failed: {e}: the cache is opened readonly, and query runs only "
                    "SELECT and read-only PRAGMA statements"
                ) from None
            raise QueryRefused(f"query failed: {e}") from None
        except sqlite3.Error as e:
            raise QueryRefused(f"query failed: {e}") from None
        finally:
            self.conn.set_authorizer(None)


_READ_ACTIONS = frozenset(
    {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}
)
_READ_PRAGMAS = frozenset(
    {
        "table_info", "table_xinfo", "table_list", "index_list", "index_info", "index_xinfo",
        "foreign_key_list", "integrity_check", "quick_check", "journal_mode", "user_version",
        "schema_version", "page_count", "page_size", "freelist_count", "database_list",
        "compile_options", "data_version", "encoding", "application_id",
    }
)  # fmt: skip
_SETTER_PRAGMAS = frozenset({"journal_mode", "user_version", "schema_version", "application_id"})


def _read_only(action: int, arg1: str | None, arg2: str | None, *_: Any) -> int:
    """SQLite authorizer for `query`: SELECTs and read-only PRAGMAs, nothing else."""
    if action in _READ_ACTIONS:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_PRAGMA and (arg1 or "").lower() in _READ_PRAGMAS:
        if arg2 is None or (arg1 or "").lower() not in _SETTER_PRAGMAS:
            return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


def describe_last(last: dict[str, Any] | None) -> str:
    """The daemon's last anti-entropy check (its ``anti_entropy`` sync record) in words."""
    if last is None:
        return "never checked"
    at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(last.get("at", 0))))
    text = f"last check {at}: {last.get('result')}"
    if last.get("server_revision") is not None:
        text += f" (server revision {last['server_revision']})"
    return text

"""Admin operations: the service layer behind the HTTP API and the CLI.

Each write is ONE SQLite transaction that changes the state, bumps the tenant revision,
appends to the audit log and writes its outgoing MQTT messages to the outbox (and the
latest retained payload per topic to `retained`). Publishing happens later, in
`publisher.py`, so a crash at any point loses nothing and publishes nothing uncommitted.

A change for a group or for Everyone is one message; nothing here loops over users to
notify them (the broker fans out). Errors are `OperationError`s carrying an HTTP status and
a message that says what to do; a failed operation changes nothing (rollback).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiosqlite
from pydantic import BaseModel, ConfigDict, ValidationError

from addin_core.manifest import hosts_or_permissions_changed, parse_manifest, read_manifest
from addin_core.protocol import (
    Assignment,
    CatalogEntry,
    GroupParents,
    Host,
    InvalidTopic,
    Membership,
    Mode,
    Policy,
    Source,
    Tombstone,
    Topic,
    check_id,
)
from addin_core.version import compare_versions
from addin_runtime.cli_support import did_you_mean
from addin_runtime.sqlite_tx import transaction
from server_stub.entitlement import (
    AssignmentRow,
    effective_mode,
    entitled_users,
    grants_for_user,
)
from server_stub.store import StoreCatalog, StoreError

MAX_MANIFEST_BYTES = 512 * 1024
DEFAULT_MAX_ADDINS = 200


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OrgUser(_Doc):
    id: str
    name: str | None = None


class OrgGroup(_Doc):
    id: str
    name: str | None = None
    members: list[str] = []
    parents: list[str] = []


class OrgAddin(_Doc):
    manifest: str | None = None
    manifest_xml: str | None = None
    store: str | None = None


class OrgAssignment(_Doc):
    addin: str
    target: str
    mode: str = "fixed"


class OrgPolicy(_Doc):
    nested_groups: bool = False


class OrgDocument(_Doc):
    """The ORG document of `addin-server load` and ``POST /v1/org`` (shape check only)."""

    tenant: str | None = None
    policy: OrgPolicy | None = None
    users: list[OrgUser] = []
    groups: list[OrgGroup] = []
    addins: list[OrgAddin] = []
    assignments: list[OrgAssignment] = []


def _describe(err: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'document'}: {e['msg']}"
        for e in err.errors(include_url=False)
    )


class OperationError(Exception):
    """A refused operation. `status` is the HTTP status the API answers with."""

    status = 400

    def __init__(self, message: str, findings: list[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.findings = findings or []


class BadRequest(OperationError):
    status = 400


class NotFound(OperationError):
    status = 404


class Conflict(OperationError):
    status = 409


class InvalidManifest(OperationError):
    status = 422


@dataclass
class _Tx:
    """The transaction in progress: its revision, commit time and collected messages."""

    conn: aiosqlite.Connection
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

    async def rows(self, sql: str, args: Iterable[Any] = ()) -> list[aiosqlite.Row]:
        return list(await (await self.conn.execute(sql, tuple(args))).fetchall())

    async def row(self, sql: str, args: Iterable[Any] = ()) -> aiosqlite.Row | None:
        return await (await self.conn.execute(sql, tuple(args))).fetchone()


def _check(value: Any, what: str) -> str:
    try:
        return check_id(value, what)
    except InvalidTopic as e:
        raise BadRequest(str(e)) from None


def _mode(value: Any) -> Mode:
    try:
        return Mode(value)
    except ValueError:
        raise BadRequest(
            f"invalid mode {value!r}: use one of {', '.join(m.value for m in Mode)}"
        ) from None


class Service:
    """All admin operations and reads of one tenant, over one database connection."""

    def __init__(
        self,
        conn: aiosqlite.Connection,
        tenant: str,
        *,
        store: StoreCatalog | None = None,
        max_addins: int = DEFAULT_MAX_ADDINS,
        admin_user: str | None = None,
        actor: str = "admin",
        on_commit: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.conn = conn
        self.tenant = check_id(tenant, "tenant id")
        self.store = store or StoreCatalog()
        self.max_addins = max_addins
        self.admin_user = admin_user
        self.actor = actor
        self.on_commit = on_commit
        self.clock = clock
        # One aiosqlite connection runs one transaction at a time; concurrent API requests
        # queue here instead of failing with "cannot start a transaction within a transaction".
        self._lock = asyncio.Lock()

    # -- transactions ---------------------------------------------------------------------

    @asynccontextmanager
    async def _write(self, operation: str, detail: Mapping[str, Any]) -> AsyncIterator[_Tx]:
        async with self._lock, transaction(self.conn) as conn:
            row = await (
                await conn.execute("SELECT value FROM meta WHERE key='revision'")
            ).fetchone()
            assert row is not None
            tx = _Tx(conn, self.tenant, int(row[0]) + 1, self.clock())
            yield tx
            await conn.execute("UPDATE meta SET value=? WHERE key='revision'", (str(tx.revision),))
            await conn.execute(
                "INSERT INTO audit(revision, at, actor, operation, detail) VALUES (?,?,?,?,?)",
                (tx.revision, tx.now, self.actor, operation, json.dumps(detail, default=str)),
            )
            msgs = [(tx.revision, t, p, tx.now) for t, p in tx.messages.items()]
            await conn.executemany(
                "INSERT INTO outbox(revision, topic, payload, created_at) VALUES (?,?,?,?)",
                msgs,
            )
            await conn.executemany(
                "INSERT INTO retained(topic, revision, payload) VALUES (?,?,?) "
                "ON CONFLICT(topic) DO UPDATE SET revision=excluded.revision, "
                "payload=excluded.payload",
                [(t, r, p) for r, t, p, _ in msgs],
            )
        if self.on_commit is not None:
            self.on_commit(tx.revision)

    async def revision(self) -> int:
        row = await (
            await self.conn.execute("SELECT value FROM meta WHERE key='revision'")
        ).fetchone()
        return int(row[0]) if row else 0

    # -- payload builders (read the state inside the transaction) ---------------------------

    async def _emit_membership(self, tx: _Tx, user_id: str) -> None:
        rows = await tx.rows(
            "SELECT group_id FROM memberships WHERE user_id=? ORDER BY group_id", (user_id,)
        )
        tx.emit(
            Topic.member(self.tenant, user_id),
            Membership(groups=[r[0] for r in rows], revision=tx.revision, committed_at=tx.now),
        )

    async def _emit_parents(self, tx: _Tx, group_id: str) -> None:
        rows = await tx.rows(
            "SELECT parent FROM nesting WHERE child=? ORDER BY parent", (group_id,)
        )
        tx.emit(
            Topic.group_parents(self.tenant, group_id),
            GroupParents(parents=[r[0] for r in rows], revision=tx.revision, committed_at=tx.now),
        )

    async def _emit_catalog(self, tx: _Tx, addin_id: str) -> None:
        r = await tx.row(
            "SELECT a.id, a.source, a.store_asset_id, a.enabled, v.version, v.sha256, "
            "v.display_name, v.hosts, v.permissions FROM addins a JOIN addin_versions v "
            "ON v.addin_id=a.id AND v.version=a.current_version WHERE a.id=?",
            (addin_id,),
        )
        assert r is not None
        tx.emit(
            Topic.catalog(self.tenant, addin_id),
            CatalogEntry(
                addin_id=r["id"],
                name=r["display_name"],
                source=Source(r["source"]),
                version=r["version"],
                manifest_sha256=r["sha256"],
                manifest_url=f"/v1/manifests/{r['sha256']}",
                hosts=[Host(h) for h in json.loads(r["hosts"])],
                permissions=r["permissions"],
                enabled=bool(r["enabled"]),
                store_asset_id=r["store_asset_id"],
                revision=tx.revision,
                committed_at=tx.now,
            ),
        )

    def _assign_topic(self, addin_id: str, target: str, target_id: str) -> Topic:
        if target == "everyone":
            return Topic.assign_everyone(self.tenant, addin_id)
        if target == "group":
            return Topic.assign_group(self.tenant, target_id, addin_id)
        return Topic.assign_user(self.tenant, target_id, addin_id)

    # -- existence checks -------------------------------------------------------------------

    async def _need(self, tx: _Tx, table: str, key: str, what: str) -> aiosqlite.Row:
        r = await tx.row(f"SELECT * FROM {table} WHERE id=?", (key,))
        if r is None:
            raise await self._unknown(table, key, what)
        return r

    async def _unknown(self, table: str, key: str, what: str) -> NotFound:
        """`unknown user 'an'; did you mean 'ann'?`: ids (and add-in names) close to `key`."""
        names = [str(r[0]) for r in await self._rows(f"SELECT id FROM {table}")]
        if table == "addins":
            names += [n for n in (await self._addin_names()).values()]
        return NotFound(f"unknown {what} {key!r}" + did_you_mean(key, names))

    async def _addin_names(self) -> dict[str, str]:
        """Display name of each add-in's current version, by id."""
        return {
            str(r[0]): str(r[1])
            for r in await self._rows(
                "SELECT a.id, v.display_name FROM addins a JOIN addin_versions v "
                "ON v.addin_id = a.id AND v.version = a.current_version"
            )
        }

    async def find_addin(self, name_or_id: str) -> str:
        """An add-in id from what an admin typed: its id, or its display name (any case)."""
        if await self._rows("SELECT 1 FROM addins WHERE id=?", (name_or_id,)):
            return name_or_id
        low = name_or_id.lower()
        names = await self._addin_names()
        found = sorted(a for a, n in names.items() if low in (a.lower(), n.lower()))
        if len(found) > 1:
            raise BadRequest(
                f"{len(found)} add-ins are called {name_or_id!r}: give the id ({', '.join(found)})"
            )
        if not found:
            raise await self._unknown("addins", name_or_id, "add-in")
        return found[0]

    async def outbox_waiting(self, revision: int | None = None) -> int:
        """Messages committed and not yet acknowledged by the broker (of one revision)."""
        sql = "SELECT count(*) FROM outbox WHERE published_at IS NULL"
        rows = await self._rows(sql + (" AND revision=?" if revision is not None else ""),
                                () if revision is None else (revision,))  # fmt: skip
        return int(rows[0][0])

    async def outbox_backlog(self) -> dict[str, Any]:
        """What waits to be published: how many messages, since when."""
        rows = await self._rows(
            "SELECT count(*), min(created_at) FROM outbox WHERE published_at IS NULL"
        )
        n, oldest = rows[0]
        return {"waiting": int(n), "oldest_created_at": oldest}

    # -- users and groups -------------------------------------------------------------------

    async def create_user(self, user_id: str, name: str | None = None) -> dict[str, Any]:
        user_id = _check(user_id, "user id")
        async with self._write("create_user", {"id": user_id, "name": name}) as tx:
            if await tx.row("SELECT 1 FROM users WHERE id=?", (user_id,)):
                raise Conflict(f"user {user_id!r} already exists")
            await tx.conn.execute(
                "INSERT INTO users(id, name) VALUES (?, ?)", (user_id, name or user_id)
            )
            await self._emit_membership(tx, user_id)
        return {"id": user_id, "name": name or user_id, "revision": tx.revision}

    async def delete_user(self, user_id: str) -> dict[str, Any]:
        async with self._write("delete_user", {"id": user_id}) as tx:
            await self._need(tx, "users", user_id, "user")
            for r in await tx.rows(
                "SELECT addin_id FROM assignments WHERE target='user' AND target_id=?", (user_id,)
            ):
                tx.tombstone(Topic.assign_user(self.tenant, user_id, r[0]))
            await tx.conn.execute(
                "DELETE FROM assignments WHERE target='user' AND target_id=?", (user_id,)
            )
            await tx.conn.execute("DELETE FROM users WHERE id=?", (user_id,))
            tx.tombstone(Topic.member(self.tenant, user_id))
        return {"id": user_id, "deleted": True, "revision": tx.revision}

    async def create_group(self, group_id: str, name: str | None = None) -> dict[str, Any]:
        group_id = _check(group_id, "group id")
        async with self._write("create_group", {"id": group_id, "name": name}) as tx:
            if await tx.row("SELECT 1 FROM groups WHERE id=?", (group_id,)):
                raise Conflict(f"group {group_id!r} already exists")
            await tx.conn.execute(
                "INSERT INTO groups(id, name) VALUES (?, ?)", (group_id, name or group_id)
            )
            await self._emit_parents(tx, group_id)
        return {"id": group_id, "name": name or group_id, "revision": tx.revision}

    async def delete_group(self, group_id: str) -> dict[str, Any]:
        async with self._write("delete_group", {"id": group_id}) as tx:
            await self._need(tx, "groups", group_id, "group")
            members = [
                r[0]
                for r in await tx.rows(
                    "SELECT user_id FROM memberships WHERE group_id=?", (group_id,)
                )
            ]
            children = [
                r[0] for r in await tx.rows("SELECT child FROM nesting WHERE parent=?", (group_id,))
            ]
            for r in await tx.rows(
                "SELECT addin_id FROM assignments WHERE target='group' AND target_id=?",
                (group_id,),
            ):
                tx.tombstone(Topic.assign_group(self.tenant, group_id, r[0]))
            await tx.conn.execute(
                "DELETE FROM assignments WHERE target='group' AND target_id=?", (group_id,)
            )
            await tx.conn.execute("DELETE FROM groups WHERE id=?", (group_id,))
            # Deleting a group changes its members' and sub-groups' lists: republish those.
            for u in members:
                await self._emit_membership(tx, u)
            for c in children:
                await self._emit_parents(tx, c)
            tx.tombstone(Topic.group_parents(self.tenant, group_id))
        return {"id": group_id, "deleted": True, "revision": tx.revision}

    async def add_member(self, group_id: str, user_id: str) -> dict[str, Any]:
        async with self._write("add_member", {"group": group_id, "user": user_id}) as tx:
            await self._need(tx, "groups", group_id, "group")
            await self._need(tx, "users", user_id, "user")
            await tx.conn.execute(
                "INSERT OR IGNORE INTO memberships(user_id, group_id) VALUES (?, ?)",
                (user_id, group_id),
            )
            await self._emit_membership(tx, user_id)
        return {"group": group_id, "user": user_id, "revision": tx.revision}

    async def remove_member(self, group_id: str, user_id: str) -> dict[str, Any]:
        async with self._write("remove_member", {"group": group_id, "user": user_id}) as tx:
            await self._need(tx, "groups", group_id, "group")
            await self._need(tx, "users", user_id, "user")
            cur = await tx.conn.execute(
                "DELETE FROM memberships WHERE user_id=? AND group_id=?", (user_id, group_id)
            )
            if cur.rowcount == 0:
                raise NotFound(f"user {user_id!r} is not a direct member of group {group_id!r}")
            await self._emit_membership(tx, user_id)
        return {"group": group_id, "user": user_id, "revision": tx.revision}

    async def _nesting_edges(self, tx: _Tx) -> dict[str, list[str]]:
        edges: dict[str, list[str]] = defaultdict(list)
        for r in await tx.rows("SELECT child, parent FROM nesting"):
            edges[r[0]].append(r[1])
        return edges

    async def _cycle_path(
        self, tx: _Tx, child: str, parent: str, edges: dict[str, list[str]] | None = None
    ) -> list[str] | None:
        """If nesting `child` in `parent` closes a loop, the loop: child -> parent -> ... -> child."""
        if child == parent:
            return [child, child]
        if edges is None:
            edges = await self._nesting_edges(tx)
        prev: dict[str, str] = {parent: ""}
        queue = [parent]
        while queue:
            g = queue.pop(0)
            for p in edges.get(g, ()):
                if p in prev:
                    continue
                prev[p] = g
                if p == child:
                    path = [child]
                    node = g
                    while node:
                        path.append(node)
                        node = prev[node]
                    return [child, *reversed(path[1:]), child]
                queue.append(p)
        return None

    async def nest(self, child: str, parent: str) -> dict[str, Any]:
        async with self._write("nest", {"child": child, "parent": parent}) as tx:
            await self._need(tx, "groups", child, "group")
            await self._need(tx, "groups", parent, "group")
            cycle = await self._cycle_path(tx, child, parent)
            if cycle:
                raise Conflict(
                    f"nesting group {child!r} in {parent!r} would make a cycle: "
                    + " -> ".join(cycle),
                    findings=cycle,
                )
            await tx.conn.execute(
                "INSERT OR IGNORE INTO nesting(child, parent) VALUES (?, ?)", (child, parent)
            )
            await self._emit_parents(tx, child)
        return {"child": child, "parent": parent, "revision": tx.revision}

    async def unnest(self, child: str, parent: str) -> dict[str, Any]:
        async with self._write("unnest", {"child": child, "parent": parent}) as tx:
            await self._need(tx, "groups", child, "group")
            await self._need(tx, "groups", parent, "group")
            cur = await tx.conn.execute(
                "DELETE FROM nesting WHERE child=? AND parent=?", (child, parent)
            )
            if cur.rowcount == 0:
                raise NotFound(f"group {child!r} is not nested in {parent!r}")
            await self._emit_parents(tx, child)
        return {"child": child, "parent": parent, "revision": tx.revision}

    async def set_policy(self, nested_groups: bool) -> dict[str, Any]:
        if not isinstance(nested_groups, bool):
            raise BadRequest("nested_groups must be true or false")
        async with self._write("set_policy", {"nested_groups": nested_groups}) as tx:
            await tx.conn.execute(
                "UPDATE meta SET value=? WHERE key='nested_groups'", (str(int(nested_groups)),)
            )
            tx.emit(
                Topic.policy(self.tenant),
                Policy(nested_groups=nested_groups, revision=tx.revision, committed_at=tx.now),
            )
        return {"nested_groups": nested_groups, "revision": tx.revision}

    # -- add-ins ----------------------------------------------------------------------------

    def _read(self, content: bytes) -> Any:
        if len(content) > MAX_MANIFEST_BYTES:
            raise InvalidManifest(
                f"manifest is {len(content)} bytes; the limit is {MAX_MANIFEST_BYTES} bytes (512 KB)"
            )
        report = read_manifest(content)
        if not report.valid or report.manifest is None:
            findings = [str(e) for e in report.errors]
            raise InvalidManifest(
                "invalid manifest: " + ("; ".join(findings) or "unreadable"), findings=findings
            )
        return report.manifest

    async def _store_version(self, tx: _Tx, addin_id: str, manifest: Any, content: bytes) -> str:
        sha = hashlib.sha256(content).hexdigest()
        await tx.conn.execute(
            "INSERT OR IGNORE INTO manifests(sha256, content) VALUES (?, ?)", (sha, content)
        )
        await tx.conn.execute(
            "INSERT OR REPLACE INTO addin_versions(addin_id, version, sha256, display_name, "
            "hosts, permissions, added_revision) VALUES (?,?,?,?,?,?,?)",
            (
                addin_id,
                manifest.version,
                sha,
                (manifest.display_name or addin_id)[:250],
                json.dumps([str(Host(h)) for h in manifest.hosts]),
                str(getattr(manifest.permissions, "value", manifest.permissions)),
                tx.revision,
            ),
        )
        return sha

    async def _add_or_update(
        self,
        tx: _Tx,
        manifest: Any,
        content: bytes,
        source: Source,
        asset_id: str | None,
    ) -> dict[str, Any]:
        addin_id = manifest.id
        existing = await tx.row("SELECT * FROM addins WHERE id=?", (addin_id,))
        if existing is None:
            (count,) = await tx.row("SELECT count(*) FROM addins") or (0,)
            if count >= self.max_addins:
                raise Conflict(
                    f"the tenant already holds {count} add-ins, the limit is {self.max_addins}; "
                    "remove one first"
                )
            await tx.conn.execute(
                "INSERT INTO addins(id, source, store_asset_id, enabled, current_version, "
                "created_revision) VALUES (?,?,?,1,?,?)",
                (addin_id, source.value, asset_id, manifest.version, tx.revision),
            )
            await self._store_version(tx, addin_id, manifest, content)
            await self._emit_catalog(tx, addin_id)
            return {"addin_id": addin_id, "version": manifest.version, "state": "current"}
        if existing["source"] != source.value:
            raise Conflict(
                f"add-in {addin_id} is already in the catalog as a {existing['source']} add-in"
            )
        deployed = existing["pending_version"] or existing["current_version"]
        if compare_versions(manifest.version, deployed) <= 0:
            which = (
                "version waiting for consent" if existing["pending_version"] else "deployed version"
            )
            raise Conflict(
                f"add-in {addin_id}: version {manifest.version} is not greater than the {which} "
                f"{deployed}; an update needs a strictly greater <Version>"
            )
        cur = await tx.row(
            "SELECT m.content FROM addin_versions v JOIN manifests m ON m.sha256=v.sha256 "
            "WHERE v.addin_id=? AND v.version=?",
            (addin_id, existing["current_version"]),
        )
        assert cur is not None
        old = parse_manifest(bytes(cur[0]))
        await self._store_version(tx, addin_id, manifest, content)
        if hosts_or_permissions_changed(old, manifest):
            # Escalation path: keep serving the consented version until `consent`.
            await tx.conn.execute(
                "UPDATE addins SET pending_version=? WHERE id=?", (manifest.version, addin_id)
            )
            return {"addin_id": addin_id, "version": manifest.version, "state": "needs_consent"}
        await tx.conn.execute(
            "UPDATE addins SET current_version=?, pending_version=NULL WHERE id=?",
            (manifest.version, addin_id),
        )
        await self._emit_catalog(tx, addin_id)
        return {"addin_id": addin_id, "version": manifest.version, "state": "current"}

    async def add_lob(self, content: bytes) -> dict[str, Any]:
        manifest = self._read(content)
        async with self._write("add_lob", {"id": manifest.id, "version": manifest.version}) as tx:
            result = await self._add_or_update(tx, manifest, content, Source.LOB, None)
        return {**result, "revision": tx.revision}

    def _store_addin(self, asset_id: str) -> Any:
        try:
            return self.store.get(asset_id)
        except StoreError as e:
            raise NotFound(str(e)) from None

    async def _published_version(self, tx: _Tx, asset: Any) -> str:
        r = await tx.row("SELECT version FROM store_published WHERE asset_id=?", (asset.asset_id,))
        return str(r[0]) if r else str(asset.published)

    async def add_store(self, asset_id: str) -> dict[str, Any]:
        asset = self._store_addin(asset_id)
        async with self._write("add_store", {"asset_id": asset_id}) as tx:
            if await tx.row("SELECT id FROM addins WHERE store_asset_id=?", (asset_id,)):
                raise Conflict(f"store add-in {asset_id} is already in the catalog")
            version = await self._published_version(tx, asset)
            content = asset.manifest(version)
            manifest = self._read(content)
            result = await self._add_or_update(tx, manifest, content, Source.STORE, asset_id)
        return {**result, "store_asset_id": asset_id, "revision": tx.revision}

    async def store_publish(self, asset_id: str, version: str | None = None) -> dict[str, Any]:
        """The Store releases `version` (default: the newest in the catalog folder).

        A tenant that has the add-in gets it as current automatically, unless its hosts or
        permissions changed (then it waits for consent like any update)."""
        asset = self._store_addin(asset_id)
        versions = asset.versions()
        version = version or versions[-1]
        if version not in versions:
            raise NotFound(
                f"store add-in {asset_id} has no version {version!r}; available: "
                + ", ".join(versions)
            )
        async with self._write("store_publish", {"asset_id": asset_id, "version": version}) as tx:
            current = await self._published_version(tx, asset)
            if compare_versions(version, current) <= 0:
                raise Conflict(
                    f"store add-in {asset_id}: version {version} is not greater than the "
                    f"published version {current}"
                )
            await tx.conn.execute(
                "INSERT OR REPLACE INTO store_published(asset_id, version) VALUES (?, ?)",
                (asset_id, version),
            )
            result: dict[str, Any] = {"asset_id": asset_id, "version": version, "state": None}
            r = await tx.row("SELECT id FROM addins WHERE store_asset_id=?", (asset_id,))
            if r is not None:
                content = asset.manifest(version)
                manifest = self._read(content)
                upd = await self._add_or_update(tx, manifest, content, Source.STORE, asset_id)
                result.update(addin_id=upd["addin_id"], state=upd["state"])
        return {**result, "revision": tx.revision}

    async def consent(self, addin_id: str) -> dict[str, Any]:
        async with self._write("consent", {"id": addin_id}) as tx:
            a = await self._need(tx, "addins", addin_id, "add-in")
            if not a["pending_version"]:
                raise Conflict(f"add-in {addin_id} has no version waiting for consent")
            await tx.conn.execute(
                "UPDATE addins SET current_version=pending_version, pending_version=NULL "
                "WHERE id=?",
                (addin_id,),
            )
            await self._emit_catalog(tx, addin_id)
        return {
            "addin_id": addin_id,
            "version": a["pending_version"],
            "state": "current",
            "revision": tx.revision,
        }

    async def set_enabled(self, addin_id: str, enabled: bool) -> dict[str, Any]:
        async with self._write("enable" if enabled else "disable", {"id": addin_id}) as tx:
            await self._need(tx, "addins", addin_id, "add-in")
            await tx.conn.execute(
                "UPDATE addins SET enabled=? WHERE id=?", (int(enabled), addin_id)
            )
            await self._emit_catalog(tx, addin_id)
        return {"addin_id": addin_id, "enabled": enabled, "revision": tx.revision}

    async def remove_addin(self, addin_id: str) -> dict[str, Any]:
        async with self._write("remove", {"id": addin_id}) as tx:
            await self._need(tx, "addins", addin_id, "add-in")
            for r in await tx.rows(
                "SELECT target, target_id FROM assignments WHERE addin_id=?", (addin_id,)
            ):
                tx.tombstone(self._assign_topic(addin_id, r[0], r[1]))
            tx.tombstone(Topic.catalog(self.tenant, addin_id))
            await tx.conn.execute("DELETE FROM addins WHERE id=?", (addin_id,))
        return {"addin_id": addin_id, "deleted": True, "revision": tx.revision}

    # -- assignments ------------------------------------------------------------------------

    def _target(self, target: str, target_id: str | None) -> tuple[str, str]:
        if target == "me":
            if not self.admin_user:
                raise BadRequest(
                    "target 'me' needs the admin's own user: start the server with --admin-user"
                )
            return "user", self.admin_user
        if target == "everyone":
            if target_id:
                raise BadRequest("target 'everyone' takes no target_id")
            return "everyone", ""
        if target in ("user", "group"):
            if not target_id:
                raise BadRequest(f"target {target!r} needs a target_id")
            return target, _check(target_id, f"{target} id")
        raise BadRequest(f"invalid target {target!r}: use everyone, user, group or me")

    async def assign(
        self, addin_id: str, target: str, target_id: str | None, mode: str
    ) -> dict[str, Any]:
        kind, tid = self._target(target, target_id)
        m = _mode(mode)
        detail = {"addin": addin_id, "target": kind, "target_id": tid, "mode": m.value}
        async with self._write("assign", detail) as tx:
            await self._need(tx, "addins", addin_id, "add-in")
            if kind == "user":
                await self._need(tx, "users", tid, "user")
            elif kind == "group":
                await self._need(tx, "groups", tid, "group")
            await tx.conn.execute(
                "INSERT INTO assignments(addin_id, target, target_id, mode) VALUES (?,?,?,?) "
                "ON CONFLICT(addin_id, target, target_id) DO UPDATE SET mode=excluded.mode",
                (addin_id, kind, tid, m.value),
            )
            tx.emit(
                self._assign_topic(addin_id, kind, tid),
                Assignment(mode=m, revision=tx.revision, committed_at=tx.now),
            )
        return {**detail, "target_id": tid or None, "revision": tx.revision}

    async def unassign(self, addin_id: str, target: str, target_id: str | None) -> dict[str, Any]:
        kind, tid = self._target(target, target_id)
        detail = {"addin": addin_id, "target": kind, "target_id": tid}
        async with self._write("unassign", detail) as tx:
            await self._need(tx, "addins", addin_id, "add-in")
            cur = await tx.conn.execute(
                "DELETE FROM assignments WHERE addin_id=? AND target=? AND target_id=?",
                (addin_id, kind, tid),
            )
            if cur.rowcount == 0:
                who = "everyone" if kind == "everyone" else f"{kind} {tid!r}"
                raise NotFound(f"add-in {addin_id} is not assigned to {who}")
            tx.tombstone(self._assign_topic(addin_id, kind, tid))
        return {**detail, "target_id": tid or None, "deleted": True, "revision": tx.revision}

    # -- bulk load --------------------------------------------------------------------------

    async def load_org(
        self, org: Mapping[str, Any], read_file: Callable[[str], bytes] | None = None
    ) -> dict[str, Any]:
        """Load users, groups, nesting, add-ins and assignments in ONE transaction.

        Additive and idempotent: existing users/groups/members are kept, an add-in already
        present at the same version is left alone. `read_file` resolves ``{manifest: path}``
        entries (the YAML form); the JSON form carries ``manifest_xml`` inline.
        """
        if not isinstance(org, Mapping):
            raise BadRequest("the org document must be a mapping")
        try:
            OrgDocument.model_validate(org)
        except ValidationError as e:
            raise BadRequest("invalid org document: " + _describe(e)) from None
        if org.get("tenant") not in (None, self.tenant):
            raise BadRequest(
                f"org document is for tenant {org['tenant']!r}, this server is {self.tenant!r}"
            )
        users = _list(org, "users")
        groups = _list(org, "groups")
        addins = _list(org, "addins")
        assignments = _list(org, "assignments")
        # Read and validate every manifest before taking the write lock.
        manifests: list[tuple[Any, bytes, Source, str | None]] = []
        for i, a in enumerate(addins):
            if not isinstance(a, Mapping):
                raise BadRequest(f"addins[{i}] must be a mapping")
            if "store" in a:
                asset = self._store_addin(str(a["store"]))
                manifests.append((None, b"", Source.STORE, asset.asset_id))
                continue
            if "manifest_xml" in a:
                content = str(a["manifest_xml"]).encode()
            elif "manifest" in a and read_file is not None:
                try:
                    content = read_file(str(a["manifest"]))
                except OSError as e:
                    raise BadRequest(f"addins[{i}]: cannot read {a['manifest']}: {e}") from None
            else:
                raise BadRequest(f"addins[{i}] needs manifest, manifest_xml or store")
            try:
                manifests.append((self._read(content), content, Source.LOB, None))
            except InvalidManifest as e:
                raise InvalidManifest(f"addins[{i}]: {e.message}", e.findings) from None

        counts = {"users": len(users), "groups": len(groups), "addins": len(addins)}
        async with self._write("load_org", counts) as tx:
            conn = tx.conn
            user_rows = []
            for i, u in enumerate(users):
                if not isinstance(u, Mapping) or "id" not in u:
                    raise BadRequest(f"users[{i}] must be a mapping with an id")
                uid = _check(str(u["id"]), "user id")
                user_rows.append((uid, str(u.get("name") or uid)))
            await conn.executemany("INSERT OR IGNORE INTO users(id, name) VALUES (?,?)", user_rows)
            group_rows, member_rows, nest_rows = [], [], []
            for i, g in enumerate(groups):
                if not isinstance(g, Mapping) or "id" not in g:
                    raise BadRequest(f"groups[{i}] must be a mapping with an id")
                gid = _check(str(g["id"]), "group id")
                group_rows.append((gid, str(g.get("name") or gid)))
                for m in g.get("members") or []:
                    member_rows.append((_check(str(m), "user id"), gid))
                for p in g.get("parents") or []:
                    nest_rows.append((gid, _check(str(p), "group id")))
            await conn.executemany(
                "INSERT OR IGNORE INTO groups(id, name) VALUES (?,?)", group_rows
            )
            known_users = {r[0] for r in await tx.rows("SELECT id FROM users")}
            known_groups = {r[0] for r in await tx.rows("SELECT id FROM groups")}
            for uid, gid in member_rows:
                if uid not in known_users:
                    raise NotFound(f"group {gid!r} lists unknown member {uid!r}")
            for child, parent in nest_rows:
                if parent not in known_groups:
                    raise NotFound(f"group {child!r} lists unknown parent {parent!r}")
            await conn.executemany(
                "INSERT OR IGNORE INTO memberships(user_id, group_id) VALUES (?,?)", member_rows
            )
            # One in-memory graph for the whole document: a query per nesting would be O(n^2).
            edges = await self._nesting_edges(tx)
            for child, parent in nest_rows:
                if parent in edges.get(child, ()):
                    continue
                cycle = await self._cycle_path(tx, child, parent, edges)
                if cycle:
                    raise Conflict(
                        f"nesting group {child!r} in {parent!r} would make a cycle: "
                        + " -> ".join(cycle),
                        findings=cycle,
                    )
                edges[child].append(parent)
            await conn.executemany(
                "INSERT OR IGNORE INTO nesting(child, parent) VALUES (?,?)", nest_rows
            )
            policy = org.get("policy")
            if policy is not None:
                if not isinstance(policy, Mapping) or not isinstance(
                    policy.get("nested_groups", False), bool
                ):
                    raise BadRequest("policy must be {nested_groups: true|false}")
                nested = bool(policy.get("nested_groups", False))
                await conn.execute(
                    "UPDATE meta SET value=? WHERE key='nested_groups'", (str(int(nested)),)
                )
                tx.emit(
                    Topic.policy(self.tenant),
                    Policy(nested_groups=nested, revision=tx.revision, committed_at=tx.now),
                )
            added: list[dict[str, Any]] = []
            for manifest, content, source, asset_id in manifests:
                if source is Source.STORE:
                    assert asset_id is not None
                    if await tx.row("SELECT 1 FROM addins WHERE store_asset_id=?", (asset_id,)):
                        continue
                    asset = self._store_addin(asset_id)
                    content = asset.manifest(await self._published_version(tx, asset))
                    manifest = self._read(content)
                else:
                    same = await tx.row(
                        "SELECT 1 FROM addins WHERE id=? AND (current_version=? OR "
                        "pending_version=?)",
                        (manifest.id, manifest.version, manifest.version),
                    )
                    if same:
                        continue
                added.append(await self._add_or_update(tx, manifest, content, source, asset_id))
            assign_rows = []
            for i, a in enumerate(assignments):
                if not isinstance(a, Mapping):
                    raise BadRequest(f"assignments[{i}] must be a mapping")
                addin_id = str(a.get("addin", ""))
                if not await tx.row("SELECT 1 FROM addins WHERE id=?", (addin_id,)):
                    raise NotFound(f"assignments[{i}]: unknown add-in {addin_id!r}")
                raw = str(a.get("target", ""))
                kind, _, tid = raw.partition(":")
                kind, tid = self._target(kind, tid or None)
                if kind == "user" and tid not in known_users:
                    raise NotFound(f"assignments[{i}]: unknown user {tid!r}")
                if kind == "group" and tid not in known_groups:
                    raise NotFound(f"assignments[{i}]: unknown group {tid!r}")
                m = _mode(a.get("mode", "fixed"))
                assign_rows.append((addin_id, kind, tid, m.value))
                tx.emit(
                    self._assign_topic(addin_id, kind, tid),
                    Assignment(mode=m, revision=tx.revision, committed_at=tx.now),
                )
            await conn.executemany(
                "INSERT INTO assignments(addin_id, target, target_id, mode) VALUES (?,?,?,?) "
                "ON CONFLICT(addin_id, target, target_id) DO UPDATE SET mode=excluded.mode",
                assign_rows,
            )
            # Full-state messages for everything the document touched, built in bulk.
            touched_users = {u for u, _ in user_rows} | {u for u, _ in member_rows}
            memberships: dict[str, list[str]] = defaultdict(list)
            for r in await tx.rows(
                "SELECT user_id, group_id FROM memberships ORDER BY user_id, group_id"
            ):
                if r[0] in touched_users:
                    memberships[r[0]].append(r[1])
            for uid in touched_users:
                tx.emit(
                    Topic.member(self.tenant, uid),
                    Membership(
                        groups=memberships.get(uid, []), revision=tx.revision, committed_at=tx.now
                    ),
                )
            touched_groups = {g for g, _ in group_rows}
            parents: dict[str, list[str]] = defaultdict(list)
            for r in await tx.rows("SELECT child, parent FROM nesting ORDER BY child, parent"):
                if r[0] in touched_groups:
                    parents[r[0]].append(r[1])
            for gid in touched_groups:
                tx.emit(
                    Topic.group_parents(self.tenant, gid),
                    GroupParents(
                        parents=parents.get(gid, []), revision=tx.revision, committed_at=tx.now
                    ),
                )
        return {
            **counts,
            "memberships": len(member_rows),
            "nestings": len(nest_rows),
            "assignments": len(assign_rows),
            "addins_added_or_updated": added,
            "messages": len(tx.messages),
            "revision": tx.revision,
        }

    # -- reports ----------------------------------------------------------------------------

    async def record_report(self, report: Any) -> None:
        """Store the latest report of one agent client (from `report/{client_id}`)."""
        await self.record_reports([report])

    async def record_reports(self, reports: Sequence[Any]) -> None:
        """Store a batch of reports in one transaction. After a rollout thousands of agents
        report within a second; one commit each kept the server busy while the next change
        was fanning out. An older report never replaces a newer one."""
        if not reports:
            return
        now = self.clock()
        rows = [
            (
                r.client_id,
                r.user_id,
                r.revision,
                r.reported_at,
                now,
                json.dumps([a.model_dump(mode="json") for a in r.applied]),
                json.dumps(list(r.errors)),
            )
            for r in reports
        ]
        async with self._lock, transaction(self.conn) as conn:
            await conn.executemany(
                "INSERT INTO reports(client_id, user_id, revision, reported_at, received_at, "
                "applied, errors) VALUES (?,?,?,?,?,?,?) ON CONFLICT(client_id) DO UPDATE SET "
                "user_id=excluded.user_id, revision=excluded.revision, "
                "reported_at=excluded.reported_at, received_at=excluded.received_at, "
                "applied=excluded.applied, errors=excluded.errors "
                "WHERE excluded.reported_at >= reports.reported_at",
                rows,
            )

    # -- reads ------------------------------------------------------------------------------

    async def _rows(self, sql: str, args: Iterable[Any] = ()) -> list[aiosqlite.Row]:
        return list(await (await self.conn.execute(sql, tuple(args))).fetchall())

    async def _addin_view(self, r: aiosqlite.Row) -> dict[str, Any]:
        versions = await self._rows(
            "SELECT version, sha256, display_name, hosts, permissions, added_revision "
            "FROM addin_versions WHERE addin_id=?",
            (r["id"],),
        )
        by_version = {v["version"]: v for v in versions}
        cur = by_version[r["current_version"]]
        assigns = await self._rows(
            "SELECT target, target_id, mode FROM assignments WHERE addin_id=? "
            "ORDER BY target, target_id",
            (r["id"],),
        )
        return {
            "addin_id": r["id"],
            "name": cur["display_name"],
            "source": r["source"],
            "store_asset_id": r["store_asset_id"],
            "version": r["current_version"],
            "state": "needs_consent" if r["pending_version"] else "current",
            "pending_version": r["pending_version"],
            "enabled": bool(r["enabled"]),
            "hosts": json.loads(cur["hosts"]),
            "permissions": cur["permissions"],
            "manifest_sha256": cur["sha256"],
            "manifest_url": f"/v1/manifests/{cur['sha256']}",
            "assignments": [
                {"target": a["target"], "target_id": a["target_id"] or None, "mode": a["mode"]}
                for a in assigns
            ],
        }

    async def list_addins(self) -> list[dict[str, Any]]:
        rows = await self._rows("SELECT * FROM addins ORDER BY id")
        return [await self._addin_view(r) for r in rows]

    async def get_addin(self, addin_id: str) -> dict[str, Any]:
        """One add-in, by id or display name."""
        addin_id = await self.find_addin(addin_id)
        rows = await self._rows("SELECT * FROM addins WHERE id=?", (addin_id,))
        return await self._addin_view(rows[0])

    async def get_user(self, user_id: str) -> dict[str, Any]:
        rows = await self._rows("SELECT id, name FROM users WHERE id=?", (user_id,))
        if not rows:
            raise await self._unknown("users", user_id, "user")
        groups = await self._rows(
            "SELECT group_id FROM memberships WHERE user_id=? ORDER BY group_id", (user_id,)
        )
        assigns = await self._rows(
            "SELECT addin_id, mode FROM assignments WHERE target='user' AND target_id=?",
            (user_id,),
        )
        return {
            "id": rows[0]["id"],
            "name": rows[0]["name"],
            "groups": [g[0] for g in groups],
            "assignments": [{"addin_id": a[0], "mode": a[1]} for a in assigns],
        }

    async def get_group(self, group_id: str) -> dict[str, Any]:
        rows = await self._rows("SELECT id, name FROM groups WHERE id=?", (group_id,))
        if not rows:
            raise await self._unknown("groups", group_id, "group")
        members = await self._rows(
            "SELECT user_id FROM memberships WHERE group_id=? ORDER BY user_id", (group_id,)
        )
        parents = await self._rows(
            "SELECT parent FROM nesting WHERE child=? ORDER BY parent", (group_id,)
        )
        children = await self._rows(
            "SELECT child FROM nesting WHERE parent=? ORDER BY child", (group_id,)
        )
        assigns = await self._rows(
            "SELECT addin_id, mode FROM assignments WHERE target='group' AND target_id=?",
            (group_id,),
        )
        return {
            "id": rows[0]["id"],
            "name": rows[0]["name"],
            "members": [m[0] for m in members],
            "parents": [p[0] for p in parents],
            "children": [c[0] for c in children],
            "assignments": [{"addin_id": a[0], "mode": a[1]} for a in assigns],
        }

    async def nested_groups(self) -> bool:
        rows = await self._rows("SELECT value FROM meta WHERE key='nested_groups'")
        return bool(rows and rows[0][0] == "1")

    async def _parents_map(self) -> dict[str, list[str]]:
        parents: dict[str, list[str]] = defaultdict(list)
        for r in await self._rows("SELECT child, parent FROM nesting ORDER BY child, parent"):
            parents[r[0]].append(r[1])
        return parents

    async def _assignment_rows(self, addin_id: str) -> list[AssignmentRow]:
        return [
            AssignmentRow(r[0], r[1], Mode(r[2]))
            for r in await self._rows(
                "SELECT target, target_id, mode FROM assignments WHERE addin_id=?", (addin_id,)
            )
        ]

    async def explain(self, user_id: str, addin_id: str) -> dict[str, Any]:
        """Is `user_id` entitled to `addin_id`, through what, and what did its agents report."""
        user = await self.get_user(user_id)
        addin = await self.get_addin(addin_id)
        addin_id = addin["addin_id"]  # an admin may have typed its name
        nested = await self.nested_groups()
        grants = grants_for_user(
            user_id,
            user["groups"],
            await self._parents_map(),
            await self._assignment_rows(addin_id),
            nested,
        )
        mode = effective_mode(grants)
        reports = await self._rows(
            "SELECT * FROM reports WHERE user_id=? ORDER BY client_id", (user_id,)
        )
        agent_reports = []
        for r in reports:
            applied = [a for a in json.loads(r["applied"]) if a["addin_id"] == addin_id]
            agent_reports.append(
                {
                    "client_id": r["client_id"],
                    "revision": r["revision"],
                    "reported_at": r["reported_at"],
                    "applied": applied,
                    "errors": json.loads(r["errors"]),
                }
            )
        return {
            "user": user_id,
            "addin_id": addin_id,
            "addin_name": addin["name"],
            "version": addin["version"],
            "enabled": addin["enabled"],
            "state": addin["state"],
            "nested_groups": nested,
            "entitled": mode is not None,
            "mode": mode.value if mode else None,
            "grants": [
                {
                    "target": g.assignment.target,
                    "target_id": g.assignment.target_id or None,
                    "mode": g.assignment.mode.value,
                    "group_path": list(g.group_path),
                    "counts": g.counts,
                    "why": g.describe(user_id),
                }
                for g in grants
            ],
            "reports": agent_reports,
            "revision": await self.revision(),
        }

    async def status(self, addin_id: str | None = None) -> dict[str, Any]:
        """Per add-in: entitled users and how many of them have an agent reporting the
        current version applied."""
        addins = [await self.get_addin(addin_id)] if addin_id else await self.list_addins()
        nested = await self.nested_groups()
        all_users = [r[0] for r in await self._rows("SELECT id FROM users")]
        members: dict[str, list[str]] = defaultdict(list)
        for r in await self._rows("SELECT group_id, user_id FROM memberships"):
            members[r[0]].append(r[1])
        children: dict[str, list[str]] = defaultdict(list)
        for r in await self._rows("SELECT child, parent FROM nesting"):
            children[r[1]].append(r[0])
        applied: dict[tuple[str, str], set[str]] = defaultdict(set)
        reporting_users: set[str] = set()
        for r in await self._rows("SELECT user_id, applied FROM reports"):
            reporting_users.add(r[0])
            for a in json.loads(r[1]):
                applied[(a["addin_id"], a["version"])].add(r[0])
        out = []
        for a in addins:
            rows = [
                AssignmentRow(x["target"], x["target_id"] or "", Mode(x["mode"]))
                for x in a["assignments"]
            ]
            ent = entitled_users(rows, all_users, members, children, nested)
            installing = {u for u, m in ent.items() if m is not Mode.AVAILABLE}
            done = installing & applied.get((a["addin_id"], a["version"]), set())
            out.append(
                {
                    "addin_id": a["addin_id"],
                    "name": a["name"],
                    "version": a["version"],
                    "enabled": a["enabled"],
                    "state": a["state"],
                    "entitled_users": len(ent),
                    "to_install": len(installing),
                    "available_only": len(ent) - len(installing),
                    "reported_current": len(done),
                    "reporting": len(installing & reporting_users),
                }
            )
        return {
            "nested_groups": nested,
            "addins": out,
            "revision": await self.revision(),
            "outbox": await self.outbox_backlog(),
        }


def _list(org: Mapping[str, Any], key: str) -> list[Any]:
    value = org.get(key) or []
    if not isinstance(value, list):
        raise BadRequest(f"{key} must be a list")
    return value

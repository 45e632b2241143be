"""Bulk load: a whole organisation (users, groups, nesting, policy, add-ins, assignments)
from one ORG document, in ONE unit of work.

Additive and idempotent: existing users, groups and members are kept, an add-in already
present at the same version is left alone. The document's shape is checked by the
pydantic models below; the load then works in phases on the parsed document: manifests
are read and checked before the write lock is taken, then the directory, the policy, the
add-ins and the assignments are written, and one full-state message per touched user
and group is built in bulk.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

from addin_core.manifest import Manifest
from addin_core.protocol import GroupParents, Membership, Source, Topic
from addin_core.validation import validation_problems
from server_stub.service.assignments import (
    assignment_payload,
    parse_exceptions,
    resolve_target,
    write_exceptions,
)
from server_stub.service.catalog import Catalog, checked_manifest
from server_stub.service.directory import nesting_edges, refuse_cycle, store_policy
from server_stub.service.errors import (
    BadRequest,
    InvalidManifest,
    NotFound,
    checked_id,
    checked_user_id,
    parse_mode,
)
from server_stub.service.messages import assign_topic
from server_stub.service.unit_of_work import Tx, UnitOfWork


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
    except_: list[str] = Field(default=[], alias="except")
    """``group:G`` / ``user:U``: excluded from this assignment (exclusion wins)."""


class OrgPolicy(_Doc):
    nested_groups: StrictBool = False


class OrgDocument(_Doc):
    """The ORG document of `addin-server load` and ``POST /v1/org``."""

    tenant: str | None = None
    policy: OrgPolicy | None = None
    users: list[OrgUser] = []
    groups: list[OrgGroup] = []
    addins: list[OrgAddin] = []
    assignments: list[OrgAssignment] = []


@dataclass
class AddinToAdd:
    """One add-in of the document, read before the transaction (a Store one is read inside,
    where the version the Store published is known)."""

    source: Source
    manifest: Manifest | None = None
    content: bytes = b""
    asset_id: str | None = None


@dataclass
class _Directory:
    """The rows the document's directory part wrote."""

    users: list[tuple[str, str]]
    groups: list[tuple[str, str]]
    members: list[tuple[str, str]]
    nestings: list[tuple[str, str]]
    known_users: set[str]
    known_groups: set[str]


class OrgLoader:
    def __init__(self, uow: UnitOfWork, catalog: Catalog, admin_user: str | None = None) -> None:
        self.uow = uow
        self.catalog = catalog
        self.admin_user = admin_user

    async def load_org(
        self, org: Mapping[str, Any], read_file: Callable[[str], bytes] | None = None
    ) -> dict[str, Any]:
        """Load the document. `read_file` resolves ``{manifest: path}`` entries (the YAML
        form); the JSON form carries ``manifest_xml`` inline."""
        doc = self.parse(org)
        to_add = [self.read_addin(i, a, read_file) for i, a in enumerate(doc.addins)]
        counts = {"users": len(doc.users), "groups": len(doc.groups), "addins": len(doc.addins)}
        async with self.uow.write("load_org", counts) as tx:
            d = await _load_directory(tx, doc)
            if doc.policy is not None:
                await store_policy(tx, doc.policy.nested_groups)
            added = [r for r in [await self.load_addin(tx, a) for a in to_add] if r]
            assigned = await self._load_assignments(tx, doc.assignments, d)
            await _emit_touched(
                tx, {u for u, _ in d.users} | {u for u, _ in d.members}, {g for g, _ in d.groups}
            )
        return {
            **counts,
            "memberships": len(d.members),
            "nestings": len(d.nestings),
            "assignments": assigned,
            "addins_added_or_updated": added,
            "messages": len(tx.messages),
            "revision": tx.revision,
        }

    def parse(self, org: Mapping[str, Any]) -> OrgDocument:
        if not isinstance(org, Mapping):
            raise BadRequest("the org document must be a mapping")
        try:
            doc = OrgDocument.model_validate(org)
        except ValidationError as e:
            problems = validation_problems(e.errors(include_url=False), "document")
            raise BadRequest("invalid org document: " + problems) from None
        if doc.tenant not in (None, self.uow.tenant):
            raise BadRequest(
                f"org document is for tenant {doc.tenant!r}, this server is {self.uow.tenant!r}"
            )
        return doc

    def read_addin(self, i: int, a: OrgAddin, read_file: Callable[[str], bytes] | None) -> AddinToAdd:
        if a.store is not None:
            return AddinToAdd(Source.STORE, asset_id=self.catalog.store_addin(a.store).asset_id)
        if a.manifest_xml is not None:
            content = a.manifest_xml.encode()
        elif a.manifest is not None and read_file is not None:
            try:
                content = read_file(a.manifest)
            except OSError as e:
                raise BadRequest(f"addins[{i}]: cannot read {a.manifest}: {e}") from None
        else:
            raise BadRequest(f"addins[{i}] needs manifest, manifest_xml or store")
        try:
            return AddinToAdd(Source.LOB, checked_manifest(content), content)
        except InvalidManifest as e:
            raise InvalidManifest(f"addins[{i}]: {e.message}", e.findings) from None

    async def load_addin(self, tx: Tx, a: AddinToAdd) -> dict[str, Any] | None:
        """Add or update one add-in; None when it is already there at that version."""
        if a.source is Source.STORE:
            assert a.asset_id is not None
            if await tx.row("SELECT 1 FROM addins WHERE store_asset_id=?", (a.asset_id,)):
                return None
            asset = self.catalog.store_addin(a.asset_id)
            content = asset.manifest(await self.catalog.published_version(tx, asset))
            manifest = checked_manifest(content)
        else:
            assert a.manifest is not None
            manifest, content = a.manifest, a.content
            same = await tx.row(
                "SELECT 1 FROM addins WHERE id=? AND (current_version=? OR pending_version=?)",
                (manifest.id, manifest.version, manifest.version),
            )
            if same:
                return None
        return await self.catalog.add_or_update(tx, manifest, content, a.source, a.asset_id)

    async def _load_assignments(
        self, tx: Tx, assignments: list[OrgAssignment], d: _Directory
    ) -> int:
        rows = []
        exceptions: list[tuple[str, str, str, list[str], list[str]]] = []
        for i, a in enumerate(assignments):
            if not await tx.row("SELECT 1 FROM addins WHERE id=?", (a.addin,)):
                raise NotFound(f"assignments[{i}]: unknown add-in {a.addin!r}")
            kind, _, tid = a.target.partition(":")
            kind, tid = resolve_target(kind, tid or None, self.admin_user)
            if kind == "user" and tid not in d.known_users:
                raise NotFound(f"assignments[{i}]: unknown user {tid!r}")
            if kind == "group" and tid not in d.known_groups:
                raise NotFound(f"assignments[{i}]: unknown group {tid!r}")
            m = parse_mode(a.mode)
            try:
                groups, users = parse_exceptions(a.except_)
            except BadRequest as e:
                raise BadRequest(f"assignments[{i}]: {e.message}") from None
            rows.append((a.addin, kind, tid, m.value))
            exceptions.append((a.addin, kind, tid, groups, users))
            tx.emit(assign_topic(tx.tenant, a.addin, kind, tid),
                    assignment_payload(tx, m, groups, users))  # fmt: skip
        await tx.executemany(
            "INSERT INTO assignments(addin_id, target, target_id, mode) VALUES (?,?,?,?) "
            "ON CONFLICT(addin_id, target, target_id) DO UPDATE SET mode=excluded.mode",
            rows,
        )
        for addin_id, kind, tid, groups, users in exceptions:
            await write_exceptions(tx, addin_id, kind, tid, groups, users, d.known_groups,
                                   d.known_users)  # fmt: skip
        return len(rows)


async def _load_directory(tx: Tx, doc: OrgDocument) -> _Directory:
    users = [(checked_user_id(u.id), u.name or u.id) for u in doc.users]
    await tx.executemany("INSERT INTO users(id, name) VALUES (?,?) ON CONFLICT DO NOTHING", users)
    groups, members, nestings = [], [], []
    for g in doc.groups:
        gid = checked_id(g.id, "group id")
        groups.append((gid, g.name or gid))
        members += [(checked_id(m, "user id"), gid) for m in g.members]
        nestings += [(gid, checked_id(p, "group id")) for p in g.parents]
    await tx.executemany("INSERT INTO groups(id, name) VALUES (?,?) ON CONFLICT DO NOTHING", groups)
    known_users = {r[0] for r in await tx.rows("SELECT id FROM users")}
    known_groups = {r[0] for r in await tx.rows("SELECT id FROM groups")}
    for uid, gid in members:
        if uid not in known_users:
            raise NotFound(f"group {gid!r} lists unknown member {uid!r}")
    for child, parent in nestings:
        if parent not in known_groups:
            raise NotFound(f"group {child!r} lists unknown parent {parent!r}")
    await tx.executemany(
        "INSERT INTO memberships(user_id, group_id) VALUES (?,?) ON CONFLICT DO NOTHING", members
    )
    # One in-memory graph for the whole document: a query per nesting would be O(n^2).
    edges = await nesting_edges(tx)
    for child, parent in nestings:
        if parent not in edges.get(child, ()):
            refuse_cycle(child, parent, edges)
            edges[child].append(parent)
    await tx.executemany("INSERT INTO nesting(child, parent) VALUES (?,?) ON CONFLICT DO NOTHING", nestings)
    return _Directory(users, groups, members, nestings, known_users, known_groups)


async def _emit_touched(tx: Tx, users: set[str], groups: set[str]) -> None:
    """Full-state messages for every user and group the document touched, built in bulk."""
    memberships: dict[str, list[str]] = defaultdict(list)
    for r in await tx.rows("SELECT user_id, group_id FROM memberships ORDER BY user_id, group_id"):
        if r[0] in users:
            memberships[r[0]].append(r[1])
    for uid in users:
        tx.emit(
            Topic.member(tx.tenant, uid),
            Membership(groups=memberships.get(uid, []), revision=tx.revision, committed_at=tx.now),
        )
    parents: dict[str, list[str]] = defaultdict(list)
    for r in await tx.rows("SELECT child, parent FROM nesting ORDER BY child, parent"):
        if r[0] in groups:
            parents[r[0]].append(r[1])
    for gid in groups:
        tx.emit(
            Topic.group_parents(tx.tenant, gid),
            GroupParents(parents=parents.get(gid, []), revision=tx.revision, committed_at=tx.now),
        )

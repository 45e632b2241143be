"""Declarative configuration: make the tenant's users, groups, memberships, nesting, policy,
add-ins and assignments equal to an ORG document (`addin-server apply`), and write the
current state in that same format (`addin-server export`).

`plan` compares the document with the state and lists every difference as an add, a change
or a removal; `apply` makes them in ONE unit of work (one revision, one audit line), after
computing the plan again inside its transaction so nothing changed in between is missed.
Removals are made only with `prune`; without it they are listed and kept, so a partial file
never deletes what it does not mention. The messages are those the single operations emit:
a user's membership when its groups change, a group's parents, an add-in's catalog entry,
one message per assignment, tombstones for what is removed.

The document is the one `load` takes (`org_load.OrgDocument`); `export` writes LOB manifests
inline (``manifest_xml``) so its output applies as it is.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from addin_core.protocol import Source, Topic
from server_stub.db import Database, Row
from server_stub.ldap_directory import DirectoryData
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
    Conflict,
    NotFound,
    checked_id,
    checked_user_id,
    parse_mode,
)
from server_stub.service.messages import assign_topic, emit_membership, emit_parents
from server_stub.service.org_load import AddinToAdd, OrgDocument, OrgLoader
from server_stub.service.unit_of_work import Tx, UnitOfWork

Action = Literal["add", "change", "remove"]
Rows = Callable[[str], Awaitable[list[Row]]]
AssignKey = tuple[str, str, str]
"""(addin, target, target_id)"""
Excluded = tuple[tuple[str, ...], tuple[str, ...]]
"""An assignment's exclusions: (groups, users), each sorted; ((), ()) for none."""
NONE_EXCLUDED: Excluded = ((), ())


@dataclass(frozen=True)
class Change:
    action: Action
    kind: str
    """user, group, member, nesting, policy, addin, assignment"""
    key: str
    detail: str = ""

    def as_json(self) -> dict[str, str]:
        return {"action": self.action, "kind": self.kind, "key": self.key, "detail": self.detail}


@dataclass
class Plan:
    changes: list[Change]
    prune: bool

    def count(self, action: Action) -> int:
        return sum(1 for c in self.changes if c.action == action)

    @property
    def effective(self) -> list[Change]:
        """What applying makes: removals only with prune."""
        return [c for c in self.changes if c.action != "remove" or self.prune]

    def as_json(self) -> dict[str, Any]:
        return {
            "prune": self.prune,
            "add": self.count("add"),
            "change": self.count("change"),
            "remove": self.count("remove"),
            "changes": [c.as_json() for c in self.changes],
        }


@dataclass
class _Desired:
    """The document, resolved: ids checked, targets resolved, add-ins keyed by id."""

    policy: bool | None
    users: dict[str, str]
    groups: dict[str, str]
    members: set[tuple[str, str]]
    """(group, user)"""
    nesting: set[tuple[str, str]]
    """(child, parent)"""
    addins: dict[str, AddinToAdd]
    versions: dict[str, str]
    assignments: dict[AssignKey, str]
    """(addin, target, target_id) -> mode"""
    excluded: dict[AssignKey, Excluded]
    """The exclusions of the assignments that have some (``except:`` in the document): a
    part of the assignment as much as its mode, so compared, written and published with it."""


@dataclass
class _Current:
    policy: bool
    users: dict[str, str]
    groups: dict[str, str]
    members: set[tuple[str, str]]
    nesting: set[tuple[str, str]]
    addins: dict[str, tuple[str, str | None, str | None]]
    """id -> (current version, pending version, store asset id)"""
    assignments: dict[AssignKey, str]
    excluded: dict[AssignKey, Excluded]


async def _current(rows: Rows) -> _Current:
    policy = await rows("SELECT value FROM meta WHERE key='nested_groups'")
    addins = {
        str(r[0]): (str(r[1]), r[2], r[3])
        for r in await rows(
            "SELECT id, current_version, pending_version, store_asset_id FROM addins"
        )
    }
    groups_of: dict[AssignKey, list[str]] = defaultdict(list)
    users_of: dict[AssignKey, list[str]] = defaultdict(list)
    for r in await rows(
        "SELECT addin_id, target, target_id, kind, id FROM assignment_exceptions "
        "ORDER BY addin_id, target, target_id, kind, id"
    ):
        key = (str(r[0]), str(r[1]), str(r[2]))
        (groups_of if r[3] == "group" else users_of)[key].append(str(r[4]))
    excluded = {
        k: (tuple(groups_of.get(k, ())), tuple(users_of.get(k, ())))
        for k in set(groups_of) | set(users_of)
    }
    return _Current(
        policy=bool(policy) and policy[0][0] == "1",
        users={str(r[0]): str(r[1]) for r in await rows("SELECT id, name FROM users")},
        groups={str(r[0]): str(r[1]) for r in await rows("SELECT id, name FROM groups")},
        members={
            (str(r[0]), str(r[1])) for r in await rows("SELECT group_id, user_id FROM memberships")
        },
        nesting={(str(r[0]), str(r[1])) for r in await rows("SELECT child, parent FROM nesting")},
        addins=addins,
        assignments={
            (str(r[0]), str(r[1]), str(r[2])): str(r[3])
            for r in await rows("SELECT addin_id, target, target_id, mode FROM assignments")
        },
        excluded=excluded,
    )


def _target_text(kind: str, tid: str) -> str:
    return "everyone" if kind == "everyone" else f"{kind}:{tid}"


def _except_items(excluded: Excluded) -> list[str]:
    """``group:G`` / ``user:U`` items, as the document and `assign --except` write them."""
    return [f"group:{g}" for g in excluded[0]] + [f"user:{u}" for u in excluded[1]]


def _except_text(excluded: Excluded) -> str:
    return " ".join(_except_items(excluded)) or "none"


def _diff(want: _Desired, have: _Current) -> list[Change]:
    out: list[Change] = []

    def named(kind: str, desired: dict[str, str], current: dict[str, str]) -> None:
        for i, name in sorted(desired.items()):
            if i not in current:
                out.append(Change("add", kind, i, f"name {name!r}" if name != i else ""))
            elif current[i] != name:
                out.append(Change("change", kind, i, f"name {current[i]!r} -> {name!r}"))
        out.extend(Change("remove", kind, i) for i in sorted(set(current) - set(desired)))

    if want.policy is not None and want.policy != have.policy:
        out.append(
            Change("change", "policy", "nested_groups", f"{have.policy} -> {want.policy}".lower())
        )
    named("user", want.users, have.users)
    named("group", want.groups, have.groups)
    for g, u in sorted(want.members - have.members):
        out.append(Change("add", "member", f"{u} in {g}"))
    for g, u in sorted(have.members - want.members):
        out.append(Change("remove", "member", f"{u} in {g}"))
    for c, p in sorted(want.nesting - have.nesting):
        out.append(Change("add", "nesting", f"{c} in {p}"))
    for c, p in sorted(have.nesting - want.nesting):
        out.append(Change("remove", "nesting", f"{c} in {p}"))
    for a, version in sorted(want.versions.items()):
        if a not in have.addins:
            out.append(Change("add", "addin", a, f"version {version}"))
        elif version not in have.addins[a][:2]:
            out.append(Change("change", "addin", a, f"version {have.addins[a][0]} -> {version}"))
    out.extend(Change("remove", "addin", a) for a in sorted(set(have.addins) - set(want.versions)))
    for (a, kind, tid), mode in sorted(want.assignments.items()):
        key = f"{a} -> {_target_text(kind, tid)}"
        before = have.assignments.get((a, kind, tid))
        excluded = want.excluded.get((a, kind, tid), NONE_EXCLUDED)
        was = have.excluded.get((a, kind, tid), NONE_EXCLUDED)
        if before is None:
            extra = f", except {_except_text(excluded)}" if excluded != NONE_EXCLUDED else ""
            out.append(Change("add", "assignment", key, f"mode {mode}{extra}"))
        elif before != mode or was != excluded:
            what = [f"mode {before} -> {mode}"] if before != mode else []
            if was != excluded:
                what.append(f"except {_except_text(was)} -> {_except_text(excluded)}")
            out.append(Change("change", "assignment", key, ", ".join(what)))
    for a, kind, tid in sorted(set(have.assignments) - set(want.assignments)):
        out.append(Change("remove", "assignment", f"{a} -> {_target_text(kind, tid)}"))
    return out


class Declarative:
    """`apply` and `export` of one tenant."""

    def __init__(
        self, uow: UnitOfWork, catalog: Catalog, org: OrgLoader, admin_user: str | None
    ) -> None:
        self.uow = uow
        self.database: Database = uow.database
        self.catalog = catalog
        self.org = org
        self.admin_user = admin_user

    def _desired(self, doc: OrgDocument, read_file: Callable[[str], bytes] | None) -> _Desired:
        users = {checked_user_id(u.id): u.name or u.id for u in doc.users}
        groups: dict[str, str] = {}
        members: set[tuple[str, str]] = set()
        nesting: set[tuple[str, str]] = set()
        for g in doc.groups:
            gid = checked_id(g.id, "group id")
            groups[gid] = g.name or gid
            members |= {(gid, checked_id(m, "user id")) for m in g.members}
            nesting |= {(gid, checked_id(p, "group id")) for p in g.parents}
        addins: dict[str, AddinToAdd] = {}
        versions: dict[str, str] = {}
        for i, a in enumerate(doc.addins):
            read = self.org.read_addin(i, a, read_file)
            if read.source is Source.STORE:
                assert read.asset_id is not None
                asset = self.catalog.store_addin(read.asset_id)
                manifest = checked_manifest(asset.manifest(str(asset.published)))
                # A Store add-in follows the Store's versions: the file names it, not a version.
                versions[manifest.id] = "(store)"
                addins[manifest.id] = read
            else:
                assert read.manifest is not None
                versions[read.manifest.id] = read.manifest.version
                addins[read.manifest.id] = read
        assignments: dict[AssignKey, str] = {}
        excluded: dict[AssignKey, Excluded] = {}
        for i, x in enumerate(doc.assignments):
            kind, _, tid = x.target.partition(":")
            kind, tid = resolve_target(kind, tid or None, self.admin_user)
            assignments[(x.addin, kind, tid)] = parse_mode(x.mode).value
            try:
                except_groups, except_users = parse_exceptions(x.except_)
            except BadRequest as e:
                raise BadRequest(f"assignments[{i}]: {e.message}") from None
            if except_groups or except_users:
                excluded[(x.addin, kind, tid)] = (tuple(except_groups), tuple(except_users))
        return _Desired(
            doc.policy.nested_groups if doc.policy is not None else None,
            users, groups, members, nesting, addins, versions, assignments, excluded,
        )  # fmt: skip

    def _against(self, want: _Desired, have: _Current) -> _Desired:
        """Store add-ins present keep their current version: no change to show."""
        for a, v in list(want.versions.items()):
            if v == "(store)" and a in have.addins:
                want.versions[a] = have.addins[a][0]
        return want

    async def plan(
        self,
        org: Mapping[str, Any],
        read_file: Callable[[str], bytes] | None = None,
        *,
        prune: bool = False,
    ) -> Plan:
        want = self._desired(self.org.parse(org), read_file)
        have = await _current(self.database.rows)
        return Plan(_diff(self._against(want, have), have), prune)

    async def apply(
        self,
        org: Mapping[str, Any],
        read_file: Callable[[str], bytes] | None = None,
        *,
        prune: bool = False,
    ) -> dict[str, Any]:
        """Make the state equal to the document (removals only with `prune`) in one
        revision; nothing is written when there is nothing to do."""
        want = self._desired(self.org.parse(org), read_file)
        return await self._apply("apply", lambda have: self._against(want, have), prune)

    async def _apply(
        self, operation: str, desire: Callable[[_Current], _Desired], prune: bool
    ) -> dict[str, Any]:
        before = await _current(self.database.rows)
        first = Plan(_diff(desire(before), before), prune)
        if not first.effective:
            return {**first.as_json(), "revision": None}
        counts = {"add": first.count("add"), "change": first.count("change"),
                  "remove": first.count("remove") if prune else 0, "prune": prune}  # fmt: skip
        async with self.uow.write(operation, counts) as tx:
            # Again inside the transaction: what another writer changed meanwhile counts.
            have = await _current(tx.rows)
            want = desire(have)
            plan = Plan(_diff(want, have), prune)
            await self._make(tx, want, have, prune)
        return {**plan.as_json(), "revision": tx.revision, "messages": len(tx.messages)}

    # -- directory sync (server_stub/ldap_directory.py reads the directory) ----------------

    async def plan_directory(self, d: DirectoryData) -> Plan:
        have = await _current(self.database.rows)
        return Plan(_diff(_directory_desired(d, have), have), True)

    async def sync_directory(
        self, d: DirectoryData, *, max_removal_share: float, force: bool = False
    ) -> dict[str, Any]:
        """Make users, groups, memberships and nesting equal to the directory's, in one
        revision. Assignments to users and groups that left go with them; everything else
        (add-ins, assignments, policy) is kept. Refused, unless `force`, when it would
        remove more than `max_removal_share` of the users or of the groups: a wrong base DN
        or filter, or a directory answering half its tree, must not empty the tenant (a
        wrong group filter alone would remove every group and, for good, every assignment
        to one)."""
        have = await _current(self.database.rows)
        if not force:
            for kind, had, kept in (
                ("users", have.users, d.users),
                ("groups", have.groups, d.groups),
            ):
                removed = len(set(had) - set(kept))
                if had and removed / len(had) > max_removal_share:
                    raise Conflict(
                        f"the sync would remove {removed} of {len(had)} {kind} "
                        f"({removed / len(had):.0%}), more than the {max_removal_share:.0%} "
                        "allowed: check the directory, --base and the filters, then run it "
                        "again with --force"
                    )
        return await self._apply(
            "directory_sync", lambda have: _directory_desired(d, have), prune=True
        )

    async def _make(self, tx: Tx, want: _Desired, have: _Current, prune: bool) -> None:
        if want.policy is not None and want.policy != have.policy:
            await store_policy(tx, want.policy)
        touched_users: set[str] = set()
        touched_groups: set[str] = set()
        # Directory: additions and renames first, so new members and parents exist.
        await tx.executemany(
            "INSERT INTO users(id, name) VALUES (?,?) ON CONFLICT(id) DO UPDATE SET "
            "name=excluded.name WHERE users.name IS NOT excluded.name",
            [(u, n) for u, n in want.users.items() if have.users.get(u) != n],
        )
        touched_users |= set(want.users) - set(have.users)
        await tx.executemany(
            "INSERT INTO groups(id, name) VALUES (?,?) ON CONFLICT(id) DO UPDATE SET "
            "name=excluded.name WHERE groups.name IS NOT excluded.name",
            [(g, n) for g, n in want.groups.items() if have.groups.get(g) != n],
        )
        touched_groups |= set(want.groups) - set(have.groups)
        final_users = set(want.users) | (set() if prune else set(have.users))
        final_groups = set(want.groups) | (set() if prune else set(have.groups))
        for g, u in sorted(want.members):
            if u not in final_users:
                raise NotFound(f"group {g!r} lists unknown member {u!r}")
        for c, p in sorted(want.nesting):
            if p not in final_groups:
                raise NotFound(f"group {c!r} lists unknown parent {p!r}")
        if prune:
            gone = sorted(have.members - want.members)
            await tx.executemany("DELETE FROM memberships WHERE group_id=? AND user_id=?", gone)
            touched_users |= {u for _, u in gone}
            unnested = sorted(have.nesting - want.nesting)
            await tx.executemany("DELETE FROM nesting WHERE child=? AND parent=?", unnested)
            touched_groups |= {c for c, _ in unnested}
        added = sorted(want.members - have.members)
        await tx.executemany(
            "INSERT INTO memberships(group_id, user_id) VALUES (?,?) ON CONFLICT DO NOTHING", added
        )
        touched_users |= {u for _, u in added}
        edges = await nesting_edges(tx)
        for child, parent in sorted(want.nesting - have.nesting):
            if parent not in edges.get(child, ()):
                refuse_cycle(child, parent, edges)
                edges[child].append(parent)
                await tx.execute(
                    "INSERT INTO nesting(child, parent) VALUES (?,?) ON CONFLICT DO NOTHING",
                    (child, parent),
                )
                touched_groups.add(child)
        # Add-ins: new ones and new versions (a version that widens permissions waits for
        # consent, as with an upload).
        for a, read in want.addins.items():
            if a not in have.addins or want.versions[a] not in have.addins[a][:2]:
                await self.org.load_addin(tx, read)
        final_addins = set(want.addins) | (set() if prune else set(have.addins))
        for a, kind, tid in want.assignments:
            if a not in final_addins:
                raise NotFound(f"assignment of unknown add-in {a!r}")
            if (kind == "user" and tid not in final_users) or (
                kind == "group" and tid not in final_groups
            ):
                raise NotFound(f"assignment of {a} to unknown {kind} {tid!r}")
        if prune:
            await self._prune(tx, want, have)
        for key, mode in want.assignments.items():
            excluded = want.excluded.get(key, NONE_EXCLUDED)
            if (
                have.assignments.get(key) != mode
                or have.excluded.get(key, NONE_EXCLUDED) != excluded
            ):
                a, kind, tid = key
                await tx.execute(
                    "INSERT INTO assignments(addin_id, target, target_id, mode) VALUES "
                    "(?,?,?,?) ON CONFLICT(addin_id, target, target_id) DO UPDATE SET "
                    "mode=excluded.mode",
                    (a, kind, tid, mode),
                )
                # The message is the assignment's whole state: without its exclusions, every
                # agent would drop them and install the add-in for those it excludes.
                await write_exceptions(tx, a, kind, tid, excluded[0], excluded[1],
                                       final_groups, final_users)  # fmt: skip
                tx.emit(
                    assign_topic(tx.tenant, a, kind, tid),
                    assignment_payload(tx, parse_mode(mode), excluded[0], excluded[1]),
                )
        if prune:
            touched_users -= set(have.users) - set(want.users)
            touched_groups -= set(have.groups) - set(want.groups)
        for u in sorted(touched_users):
            await emit_membership(tx, u)
        for g in sorted(touched_groups):
            await emit_parents(tx, g)

    async def _prune(self, tx: Tx, want: _Desired, have: _Current) -> None:
        """Delete what the document does not name, with the tombstones the single
        operations leave."""
        for key in sorted(set(have.assignments) - set(want.assignments)):
            a, kind, tid = key
            await tx.execute(
                "DELETE FROM assignments WHERE addin_id=? AND target=? AND target_id=?", key
            )
            tx.tombstone(assign_topic(tx.tenant, a, kind, tid))
        for a in sorted(set(have.addins) - set(want.addins)):
            tx.tombstone(Topic.catalog(tx.tenant, a))
            await tx.execute("DELETE FROM addins WHERE id=?", (a,))
        for u in sorted(set(have.users) - set(want.users)):
            await tx.execute("DELETE FROM users WHERE id=?", (u,))
            tx.tombstone(Topic.member(tx.tenant, u))
        for g in sorted(set(have.groups) - set(want.groups)):
            # Its memberships and nestings went with the pruned ones (the document lists
            # none for a group it does not name), whose users and children are republished.
            await tx.execute("DELETE FROM groups WHERE id=?", (g,))
            tx.tombstone(Topic.group_parents(tx.tenant, g))

    async def export(self) -> dict[str, Any]:
        """The current state as an ORG document; `apply` of it changes nothing."""
        async with self.database.snapshot():
            have = await _current(self.database.rows)
            xml = {
                str(r[0]): bytes(r[1]).decode()
                for r in await self.database.rows(
                    "SELECT a.id, m.content FROM addins a JOIN addin_versions v ON "
                    "v.addin_id=a.id AND v.version=a.current_version JOIN manifests m ON "
                    "m.sha256=v.sha256 WHERE a.source='lob'"
                )
            }
        members: dict[str, list[str]] = defaultdict(list)
        for g, u in sorted(have.members):
            members[g].append(u)
        parents: dict[str, list[str]] = defaultdict(list)
        for c, p in sorted(have.nesting):
            parents[c].append(p)
        groups = []
        for g, name in sorted(have.groups.items()):
            entry: dict[str, Any] = {"id": g}
            if name != g:
                entry["name"] = name
            if members[g]:
                entry["members"] = members[g]
            if parents[g]:
                entry["parents"] = parents[g]
            groups.append(entry)
        addins: list[dict[str, Any]] = []
        for a, (_, _, asset) in sorted(have.addins.items()):
            addins.append({"store": asset} if asset else {"manifest_xml": xml[a]})
        return {
            "tenant": self.uow.tenant,
            "policy": {"nested_groups": have.policy},
            "users": [
                {"id": u} if n == u else {"id": u, "name": n} for u, n in sorted(have.users.items())
            ],
            "groups": groups,
            "addins": addins,
            "assignments": [
                _exported_assignment(k, mode, have) for k, mode in sorted(have.assignments.items())
            ],
        }


def _exported_assignment(key: AssignKey, mode: str, have: _Current) -> dict[str, Any]:
    a, kind, tid = key
    entry: dict[str, Any] = {"addin": a, "target": _target_text(kind, tid), "mode": mode}
    if key in have.excluded:
        entry["except"] = _except_items(have.excluded[key])
    return entry


def _directory_desired(d: DirectoryData, have: _Current) -> _Desired:
    """The state with the directory's users, groups, memberships and nesting, and the
    catalog, policy and assignments kept (less those to users and groups that left)."""
    kept = {
        k: mode
        for k, mode in have.assignments.items()
        if not (k[1] == "user" and k[2] not in d.users)
        and not (k[1] == "group" and k[2] not in d.groups)
    }
    return _Desired(
        policy=None,
        users=dict(d.users),
        groups=dict(d.groups),
        members=set(d.members),
        nesting=set(d.nesting),
        # Present add-ins at their versions: nothing to load, nothing to prune.
        addins={a: AddinToAdd(Source.LOB) for a in have.addins},
        versions={a: v[0] for a, v in have.addins.items()},
        assignments=kept,
        # Kept as they are, even naming a user or group that left: were it to come back, it
        # stays excluded.
        excluded={k: v for k, v in have.excluded.items() if k in kept},
    )


def plan_lines(plan: Plan) -> list[tuple[str, str]]:
    """(symbol, text) per change, terraform-style: + add, ~ change, - remove."""
    symbol = {"add": "+", "change": "~", "remove": "-"}
    lines = []
    for c in plan.changes:
        text = f"{c.kind} {c.key}" + (f": {c.detail}" if c.detail else "")
        if c.action == "remove" and not plan.prune:
            text += "  (kept: pass --prune to remove)"
        lines.append((symbol[c.action], text))
    return lines


def plan_summary(plan: Plan) -> str:
    removals = plan.count("remove")
    kept = "" if plan.prune or not removals else f" ({removals} kept without --prune)"
    shown = removals if plan.prune else 0
    return (
        f"Plan: {plan.count('add')} to add, {plan.count('change')} to change, "
        f"{shown} to remove{kept}."
    )

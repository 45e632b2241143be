"""Reads of the admin's view: add-ins with their versions and assignments, users, groups,
the nesting policy. Each read is a few SELECTs on the service's connection."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

from addin_core.protocol import Mode
from server_stub.db import Database, Row
from server_stub.entitlement import AssignmentRow
from server_stub.service.lookup import find_addin, unknown


async def exceptions_by_assignment(
    rows_of: Any, addin_id: str | None = None
) -> dict[tuple[str, str, str], tuple[frozenset[str], frozenset[str]]]:
    """(add-in, target, target id) -> (excluded groups, excluded users)."""
    sql = "SELECT addin_id, target, target_id, kind, id FROM assignment_exceptions"
    found: dict[tuple[str, str, str], tuple[set[str], set[str]]] = {}
    for r in await rows_of(sql + (" WHERE addin_id=?" if addin_id else ""),
                           (addin_id,) if addin_id else ()):  # fmt: skip
        groups, users = found.setdefault((r[0], r[1], r[2]), (set(), set()))
        (groups if r[3] == "group" else users).add(r[4])
    return {k: (frozenset(g), frozenset(u)) for k, (g, u) in found.items()}


async def directory_graph(
    rows_of: Any, *, users: bool = True
) -> tuple[list[str], dict[str, list[str]], dict[str, list[str]]]:
    """(every user id, group -> its direct member users, group -> its direct child groups):
    what `entitled_users` walks to find who an assignment reaches. Without `users` the list
    of users is empty: only an assignment to Everyone needs it, and it is a third of the rows
    (10,000 of a 10,000-user directory's ~30,000)."""
    everyone = [r[0] for r in await rows_of("SELECT id FROM users")] if users else []
    members: dict[str, list[str]] = defaultdict(list)
    for r in await rows_of("SELECT group_id, user_id FROM memberships"):
        members[r[0]].append(r[1])
    children: dict[str, list[str]] = defaultdict(list)
    for r in await rows_of("SELECT child, parent FROM nesting"):
        children[r[1]].append(r[0])
    return everyone, members, children


class Reads:
    def __init__(self, database: Database) -> None:
        self.database = database

    async def _addin_view(self, r: Row) -> dict[str, Any]:
        rows = self.database.rows
        versions = await rows(
            "SELECT version, sha256, display_name, hosts, permissions, added_revision "
            "FROM addin_versions WHERE addin_id=?",
            (r["id"],),
        )
        assigns = await rows(
            "SELECT target, target_id, mode FROM assignments WHERE addin_id=? "
            "ORDER BY target, target_id",
            (r["id"],),
        )
        excepted = await exceptions_by_assignment(rows, r["id"])
        return _addin_view(r, versions, assigns, excepted)

    async def list_addins(self) -> list[dict[str, Any]]:
        # Three SELECTs for all of them, not three per add-in (200 add-ins: 600 round
        # trips, most of a cold `status`).
        rows = self.database.rows
        addins = await rows("SELECT * FROM addins ORDER BY id")
        versions: dict[str, list[Row]] = defaultdict(list)
        for v in await rows(
            "SELECT addin_id, version, sha256, display_name, hosts, permissions, "
            "added_revision FROM addin_versions"
        ):
            versions[v["addin_id"]].append(v)
        assigns: dict[str, list[Row]] = defaultdict(list)
        for a in await rows(
            "SELECT addin_id, target, target_id, mode FROM assignments "
            "ORDER BY addin_id, target, target_id"
        ):
            assigns[a["addin_id"]].append(a)
        excepted = await exceptions_by_assignment(rows)
        return [_addin_view(r, versions[r["id"]], assigns[r["id"]], excepted) for r in addins]

    async def get_addin(self, addin_id: str) -> dict[str, Any]:
        """One add-in, by id or display name."""
        addin_id = await find_addin(self.database, addin_id)
        rows = await self.database.rows("SELECT * FROM addins WHERE id=?", (addin_id,))
        return await self._addin_view(rows[0])

    async def get_user(self, user_id: str) -> dict[str, Any]:
        rows = self.database.rows
        found = await rows("SELECT id, name FROM users WHERE id=?", (user_id,))
        if not found:
            raise await unknown(self.database, "users", user_id, "user")
        groups = await rows(
            "SELECT group_id FROM memberships WHERE user_id=? ORDER BY group_id", (user_id,)
        )
        assigns = await rows(
            "SELECT addin_id, mode FROM assignments WHERE target='user' AND target_id=?",
            (user_id,),
        )
        return {
            "id": found[0]["id"],
            "name": found[0]["name"],
            "groups": [g[0] for g in groups],
            "assignments": [{"addin_id": a[0], "mode": a[1]} for a in assigns],
        }

    async def get_group(self, group_id: str) -> dict[str, Any]:
        rows = self.database.rows
        found = await rows("SELECT id, name FROM groups WHERE id=?", (group_id,))
        if not found:
            raise await unknown(self.database, "groups", group_id, "group")
        members = await rows(
            "SELECT user_id FROM memberships WHERE group_id=? ORDER BY user_id", (group_id,)
        )
        parents = await rows(
            "SELECT parent FROM nesting WHERE child=? ORDER BY parent", (group_id,)
        )
        children = await rows(
            "SELECT child FROM nesting WHERE parent=? ORDER BY child", (group_id,)
        )
        assigns = await rows(
            "SELECT addin_id, mode FROM assignments WHERE target='group' AND target_id=?",
            (group_id,),
        )
        return {
            "id": found[0]["id"],
            "name": found[0]["name"],
            "members": [m[0] for m in members],
            "parents": [p[0] for p in parents],
            "children": [c[0] for c in children],
            "assignments": [{"addin_id": a[0], "mode": a[1]} for a in assigns],
        }

    async def nested_groups(self) -> bool:
        rows = await self.database.rows("SELECT value FROM meta WHERE key='nested_groups'")
        return bool(rows and rows[0][0] == "1")

    async def parents_map(self) -> dict[str, list[str]]:
        parents: dict[str, list[str]] = defaultdict(list)
        for r in await self.database.rows(
            "SELECT child, parent FROM nesting ORDER BY child, parent"
        ):
            parents[r[0]].append(r[1])
        return parents

    async def assignment_rows(self, addin_id: str) -> list[AssignmentRow]:
        excepted = await exceptions_by_assignment(self.database.rows, addin_id)
        none: tuple[frozenset[str], frozenset[str]] = (frozenset(), frozenset())
        return [
            AssignmentRow(r[0], r[1], Mode(r[2]), *excepted.get((addin_id, r[0], r[1]), none))
            for r in await self.database.rows(
                "SELECT target, target_id, mode FROM assignments WHERE addin_id=?", (addin_id,)
            )
        ]


def _addin_view(
    r: Row,
    versions: list[Row],
    assigns: list[Row],
    excepted: dict[tuple[str, str, str], tuple[frozenset[str], frozenset[str]]],
) -> dict[str, Any]:
    """The admin's view of add-in row `r`, from its versions, assignments and exclusions."""
    by_version = {v["version"]: v for v in versions}
    cur = by_version[r["current_version"]]
    waiting = by_version.get(r["pending_version"]) if r["pending_version"] else None
    return {
        "addin_id": r["id"],
        "name": cur["display_name"],
        "source": r["source"],
        "store_asset_id": r["store_asset_id"],
        "version": r["current_version"],
        "state": "needs_consent" if r["pending_version"] else "current",
        "pending_version": r["pending_version"],
        # What agents see of it (the catalog entry's `withheld`): it is never deployed.
        "withheld": {
            "version": waiting["version"],
            "permissions": waiting["permissions"],
            "hosts": json.loads(waiting["hosts"]),
        }
        if waiting
        else None,
        "enabled": bool(r["enabled"]),
        "hosts": json.loads(cur["hosts"]),
        "permissions": cur["permissions"],
        "manifest_sha256": cur["sha256"],
        "manifest_url": f"/v1/manifests/{cur['sha256']}",
        "assignments": [
            {
                "target": a["target"],
                "target_id": a["target_id"] or None,
                "mode": a["mode"],
                "except": _except_list(excepted.get((r["id"], a["target"], a["target_id"]))),
            }
            for a in assigns
        ],
    }


def _except_list(pair: tuple[frozenset[str], frozenset[str]] | None) -> list[str]:
    if pair is None:
        return []
    return [f"group:{g}" for g in sorted(pair[0])] + [f"user:{u}" for u in sorted(pair[1])]

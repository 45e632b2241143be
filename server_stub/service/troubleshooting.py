"""`explain` and `status` as data: why a user is (not) entitled to an add-in and what its
agents reported; per add-in, how far a rollout got. The text forms are in
`server_stub/explain.py`."""

from __future__ import annotations

import json
from typing import Any

from addin_core.protocol import Mode
from server_stub.db import Database
from server_stub.entitlement import (
    AssignmentPath,
    AssignmentRow,
    effective_mode,
    entitled_users,
    exclusion,
    group_paths,
    paths_for_user,
)
from server_stub.rollout_rules import catalog_rings, version_for
from server_stub.service.assignments import parse_exceptions
from server_stub.service.lookup import find_addin
from server_stub.service.reads import Reads, directory_graph
from server_stub.service.report_summary import ReportSummaries


def _path_view(p: AssignmentPath, user_id: str) -> dict[str, Any]:
    return {
        "target": p.assignment.target,
        "target_id": p.assignment.target_id or None,
        "mode": p.assignment.mode.value,
        "group_path": list(p.group_path),
        "counts": p.counts,
        "why": p.describe(user_id),
    }


def _assignment_row(view: dict[str, Any]) -> AssignmentRow:
    """An assignment of the admin's view of an add-in, with its exclusions (an excluded user
    is not entitled, as `explain` says)."""
    groups, users = parse_exceptions(view["except"])
    return AssignmentRow(view["target"], view["target_id"] or "", Mode(view["mode"]),
                         frozenset(groups), frozenset(users))  # fmt: skip


class Troubleshooting:
    def __init__(self, database: Database, reads: Reads) -> None:
        self.database = database
        self.reads = reads
        self.reports = ReportSummaries(database)
        """The agents' reports summed up, kept current as they are stored."""
        self._entitled_cache: (
            tuple[int, bool, list[tuple[dict[str, Any], int, set[str]]]] | None
        ) = None

    async def _reports_of(self, user_id: str, addin_id: str) -> list[dict[str, Any]]:
        reports = await self.database.rows(
            "SELECT * FROM reports WHERE user_id=? ORDER BY client_id", (user_id,)
        )
        return [
            {
                "client_id": r["client_id"],
                "revision": r["revision"],
                "reported_at": r["reported_at"],
                "applied": [a for a in json.loads(r["applied"]) if a["addin_id"] == addin_id],
                "errors": json.loads(r["errors"]),
            }
            for r in reports
        ]

    async def explain(self, user_id: str, addin_id: str) -> dict[str, Any]:
        """Is `user_id` entitled to `addin_id`, through what, and what did its agents report."""
        user = await self.reads.get_user(user_id)
        addin = await self.reads.get_addin(addin_id)
        addin_id = addin["addin_id"]  # an admin may have typed its name
        nested = await self.reads.nested_groups()
        parents = await self.reads.parents_map()
        paths = paths_for_user(
            user_id, user["groups"], parents, await self.reads.assignment_rows(addin_id), nested
        )
        excluded = exclusion(user_id, paths, user["groups"], parents, nested)
        mode = effective_mode(paths) if excluded is None else None
        groups = set(group_paths(user["groups"], parents)) if nested else set(user["groups"])
        from server_stub.service.rollouts import open_rollout

        opened = [
            open_rollout(r)
            for r in await self.database.rows(
                "SELECT * FROM rollouts WHERE addin_id=? AND state IN "
                "('running','paused','aborted')",
                (addin_id,),
            )
        ]
        rings = catalog_rings(opened)
        version, ring = version_for(addin["version"], rings, user_id, groups)
        rollout = next((r for g, r in rings if g.name == ring and g.reaches(user_id, groups)), None)
        back = await self.database.rows(
            "SELECT id, started_revision FROM rollouts WHERE addin_id=? AND state='completed' "
            "AND rollback=1 AND version=? ORDER BY id DESC LIMIT 1",
            (addin_id, addin["version"]),
        )
        return {
            "user": user_id,
            "addin_id": addin_id,
            "addin_name": addin["name"],
            "version": addin["version"],
            "enabled": addin["enabled"],
            "state": addin["state"],
            "permissions": addin["permissions"],
            "hosts": addin["hosts"],
            "withheld": addin["withheld"],
            "nested_groups": nested,
            "entitled": mode is not None,
            "mode": mode.value if mode else None,
            "excluded": excluded.describe() if excluded else None,
            "user_version": version,
            "ring": ring,
            "rollout_id": rollout.rollout_id if rollout else None,
            "rollback": rollout.rollback_revision is not None if rollout else None,
            # The add-in's own version is an admin's rollback: agents apply it as a downgrade.
            "rolled_back": {"rollout_id": back[0][0], "revision": back[0][1]} if back else None,
            "grants": [_path_view(p, user_id) for p in paths],
            "reports": await self._reports_of(user_id, addin_id),
            "revision": await self.database.revision(),
        }

    async def _entitled(
        self, revision: int, addin_id: str | None
    ) -> tuple[bool, list[tuple[dict[str, Any], int, set[str]]]]:
        """(nested groups, per add-in: its view, entitled users, users to install it); for
        every add-in, computed once per revision; one add-in's taken from there when it is
        current (computing it alone reads the whole directory all the same)."""
        cache = self._entitled_cache
        if cache is not None and cache[0] == revision:
            if addin_id is None:
                return cache[1], cache[2]
            wanted = await find_addin(self.database, addin_id)
            one = [x for x in cache[2] if x[0]["addin_id"] == wanted]
            if one:
                return cache[1], one
        reads = self.reads
        addins = [await reads.get_addin(addin_id)] if addin_id else await reads.list_addins()
        nested = await reads.nested_groups()
        # The users' list only when an add-in is assigned to Everyone (PostgreSQL: the first
        # status after an admin write spent most of its 111 ms turning directory rows into
        # Python objects).
        everyone = any(x["target"] == "everyone" for a in addins for x in a["assignments"])
        all_users, members, children = await directory_graph(self.database.rows, users=everyone)
        out = []
        # Add-ins assigned alike (the same groups, Everyone, in the same modes) reach the
        # same users: computed once each (200 add-ins on 20 groups: 20 computations).
        seen: dict[tuple[AssignmentRow, ...], tuple[int, set[str]]] = {}
        for a in addins:
            assigned = tuple(_assignment_row(x) for x in a["assignments"])
            found = seen.get(assigned)
            if found is None:
                ent = entitled_users(assigned, all_users, members, children, nested)
                if all(x.mode is not Mode.AVAILABLE for x in assigned):
                    installing = set(ent)
                else:
                    installing = {u for u, m in ent.items() if m is not Mode.AVAILABLE}
                found = seen[assigned] = (len(ent), installing)
            out.append((a, *found))
        if addin_id is None:
            # Keyed on the revision read before the reads: a write in between makes the
            # next call compute again, never serve an older state.
            self._entitled_cache = (revision, nested, out)
        return nested, out

    async def status(self, addin_id: str | None = None) -> dict[str, Any]:
        """Per add-in: entitled users and how many of them have an agent reporting the
        current version applied."""
        revision = await self.database.revision()
        nested, addins = await self._entitled(revision, addin_id)
        summary = await self.reports.current()
        reporting = summary.reporting_users()
        # Add-ins assigned alike share their set of users to install (`_entitled`): how many
        # of those report is counted once per set.
        reporting_of: dict[int, int] = {}
        out = []
        # No await from here to the end of the loop: the summary is not changed under it.
        for a, entitled, installing in addins:
            done = installing & summary.applied_users(a["addin_id"], a["version"])
            if id(installing) not in reporting_of:
                reporting_of[id(installing)] = len(installing & reporting)
            out.append(
                {
                    "addin_id": a["addin_id"],
                    "name": a["name"],
                    "version": a["version"],
                    "enabled": a["enabled"],
                    "state": a["state"],
                    "entitled_users": entitled,
                    "to_install": len(installing),
                    "available_only": entitled - len(installing),
                    "reported_current": len(done),
                    "reporting": reporting_of[id(installing)],
                }
            )
        return {
            "nested_groups": nested,
            "addins": out,
            "revision": revision,
            "outbox": await self.database.outbox_backlog(),
        }

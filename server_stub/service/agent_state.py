"""The reads anti-entropy makes for one user, inside one read transaction (`snapshot`), so
every answer is computed at the one revision it reports. The logic (digest, topic
filters) is in `server_stub/antientropy.py`; the SQL is here."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from addin_core.protocol import Mode
from server_stub.db import Conn, Database, Row, read_revision
from server_stub.entitlement import AssignmentRow
from server_stub.rollout_rules import OpenRollout
from server_stub.service.reads import exceptions_by_assignment
from server_stub.sql import prefix_range


class AgentStateReader:
    """Reads on one snapshot of the database."""

    def __init__(self, conn: Conn) -> None:
        self._conn = conn

    async def _rows(self, sql: str, args: Sequence[object] = ()) -> list[Row]:
        return list(await (await self._conn.execute(sql, tuple(args))).fetchall())

    async def revision(self) -> int:
        return await read_revision(self._conn)

    async def nested_groups(self) -> bool:
        rows = await self._rows("SELECT value FROM meta WHERE key='nested_groups'")
        return bool(rows and rows[0][0] == "1")

    async def user_exists(self, user_id: str) -> bool:
        return bool(await self._rows("SELECT 1 FROM users WHERE id=?", (user_id,)))

    async def direct_groups(self, user_id: str) -> list[str]:
        return [
            r[0]
            for r in await self._rows(
                "SELECT group_id FROM memberships WHERE user_id=? ORDER BY group_id", (user_id,)
            )
        ]

    async def parents(self) -> dict[str, list[str]]:
        """child -> parents, for every nesting."""
        parents: dict[str, list[str]] = defaultdict(list)
        for r in await self._rows("SELECT child, parent FROM nesting ORDER BY child, parent"):
            parents[r[0]].append(r[1])
        return parents

    async def enabled_current_versions(self) -> dict[str, tuple[str, list[str]]]:
        """add-in id -> (current version, its hosts), for add-ins that are turned on."""
        return {
            r["id"]: (r["version"], json.loads(r["hosts"]))
            for r in await self._rows(
                "SELECT a.id, v.version, v.hosts FROM addins a JOIN addin_versions v "
                "ON v.addin_id=a.id AND v.version=a.current_version WHERE a.enabled=1"
            )
        }

    async def open_rollouts(self) -> dict[str, list[OpenRollout]]:
        """add-in id -> its rollouts whose reached rings the catalog entry lists."""
        from server_stub.service.rollouts import open_rollout

        out: dict[str, list[OpenRollout]] = defaultdict(list)
        for r in await self._rows(
            "SELECT * FROM rollouts WHERE state IN ('running','paused','aborted') ORDER BY id"
        ):
            out[r["addin_id"]].append(open_rollout(r))
        return out

    async def assignments_reaching(
        self, user_id: str, groups: Sequence[str]
    ) -> dict[str, list[AssignmentRow]]:
        """add-in id -> its assignments to Everyone, to `user_id` or to one of `groups`."""
        by_addin: dict[str, list[AssignmentRow]] = defaultdict(list)
        excepted = await exceptions_by_assignment(self._rows)
        none: tuple[frozenset[str], frozenset[str]] = (frozenset(), frozenset())
        marks = ",".join("?" * len(groups))
        for r in await self._rows(
            "SELECT addin_id, target, target_id, mode FROM assignments WHERE target='everyone' "
            "OR (target='user' AND target_id=?) "
            f"OR (target='group' AND target_id IN ({marks}))",
            (user_id, *groups),
        ):
            exc = excepted.get((r[0], r[1], r[2]), none)
            by_addin[r[0]].append(AssignmentRow(r[1], r[2], Mode(r[3]), *exc))
        return by_addin

    async def retained(
        self, exact: Sequence[str], prefixes: Sequence[str]
    ) -> list[tuple[str, int, bytes]]:
        """(topic, revision, payload) of retained topics in `exact` or starting with a prefix."""
        # A prefix as a range of the primary key: served by its index on both engines.
        where = " OR ".join(
            ["topic IN (" + ",".join("?" * len(exact)) + ")"]
            + ["(topic >= ? AND topic < ?)"] * len(prefixes)
        )
        rows = await self._rows(
            f"SELECT topic, revision, payload FROM retained WHERE {where} ORDER BY topic",
            (*exact, *(bound for p in prefixes for bound in prefix_range(p))),
        )
        return [(str(r[0]), int(r[1]), bytes(r[2])) for r in rows]


@asynccontextmanager
async def agent_snapshot(database: Database) -> AsyncIterator[AgentStateReader]:
    async with database.snapshot() as conn:
        yield AgentStateReader(conn)

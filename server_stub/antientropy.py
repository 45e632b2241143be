"""The server's side of anti-entropy (DESIGN §3.1): one user's digest and retained state.

An agent periodically asks ``GET /v1/agents/{user}/digest`` and compares the answer with
the digest of what it resolved itself; on a mismatch it asks ``GET /v1/agents/{user}/state``
for the retained messages it should hold and feeds them through its normal,
revision-ordered message path.

The digest is computed from the DATABASE with the server's own resolver
(`server_stub.entitlement`), not from the `retained` table, so it checks the agent's
resolver against an independent one. `/state` returns the `retained` rows (the exact bytes
published), filtered like the agent's subscriptions: tenant-wide topics, the user's own
``member/`` and ``assign/user/`` topics, and for every group in the user's ancestry
(nesting followed whatever the policy, like the agent) its ``parents`` and ``assign/group``
topics. Both reads run in one read transaction, so the revision returned is the one the
answer was computed at, even while other processes (the CLI) write.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiosqlite

from addin_core.digest import EntitlementDigest, entitlement_digest
from addin_core.protocol import InvalidTopic, Mode, check_id
from addin_core.user_topics import matches, split_filters, user_filters
from addin_runtime.sqlite_tx import transaction
from server_stub.entitlement import AssignmentRow, effective_mode, grants_for_user, group_paths
from server_stub.operations import BadRequest, Service


def _user(user_id: str) -> str:
    try:
        return check_id(user_id, "user id")
    except InvalidTopic as e:
        raise BadRequest(str(e)) from None


@asynccontextmanager
async def _snapshot(service: Service) -> AsyncIterator[aiosqlite.Connection]:
    """A read transaction on the service's connection: every SELECT inside sees one commit.

    Taken under the service's write lock because the connection is shared with the API's
    writes, and a BEGIN must not interleave with theirs."""
    async with service._lock, transaction(service.conn, immediate=False) as conn:
        yield conn


async def _rows(conn: aiosqlite.Connection, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
    return list(await (await conn.execute(sql, args)).fetchall())


async def _revision(conn: aiosqlite.Connection) -> int:
    rows = await _rows(conn, "SELECT value FROM meta WHERE key='revision'")
    return int(rows[0][0]) if rows else 0


async def _ancestry(
    conn: aiosqlite.Connection, user_id: str
) -> tuple[list[str], dict[str, list[str]], dict[str, tuple[str, ...]]]:
    """(direct groups, parents map, every group reached through nesting with its path)."""
    direct = [
        r[0]
        for r in await _rows(
            conn, "SELECT group_id FROM memberships WHERE user_id=? ORDER BY group_id", (user_id,)
        )
    ]
    parents: dict[str, list[str]] = defaultdict(list)
    for r in await _rows(conn, "SELECT child, parent FROM nesting ORDER BY child, parent"):
        parents[r[0]].append(r[1])
    return direct, parents, group_paths(direct, parents)


async def user_digest(service: Service, user_id: str) -> dict[str, Any]:
    """The digest of `user_id`'s entitlements as the server resolves them now.

    Entitled = enabled add-in whose consented (current) version lists at least one host,
    with an assignment that counts under the nesting policy; the strongest mode wins.
    """
    user_id = _user(user_id)
    async with _snapshot(service) as conn:
        revision = await _revision(conn)
        nested_rows = await _rows(conn, "SELECT value FROM meta WHERE key='nested_groups'")
        nested = bool(nested_rows and nested_rows[0][0] == "1")
        known = bool(await _rows(conn, "SELECT 1 FROM users WHERE id=?", (user_id,)))
        direct, parents, paths = await _ancestry(conn, user_id)
        addins = {
            r["id"]: (r["version"], json.loads(r["hosts"]))
            for r in await _rows(
                conn,
                "SELECT a.id, v.version, v.hosts FROM addins a JOIN addin_versions v "
                "ON v.addin_id=a.id AND v.version=a.current_version WHERE a.enabled=1",
            )
        }
        by_addin: dict[str, list[AssignmentRow]] = defaultdict(list)
        groups = sorted(paths)
        marks = ",".join("?" * len(groups))
        for r in await _rows(
            conn,
            "SELECT addin_id, target, target_id, mode FROM assignments WHERE target='everyone' "
            "OR (target='user' AND target_id=?) "
            f"OR (target='group' AND target_id IN ({marks}))",
            (user_id, *groups),
        ):
            by_addin[r[0]].append(AssignmentRow(r[1], r[2], Mode(r[3])))
    lines: list[tuple[str, Mode, str]] = []
    for addin_id, rows in by_addin.items():
        if addin_id not in addins:
            continue  # turned off (or an orphan row): not entitled anywhere
        version, hosts = addins[addin_id]
        if not hosts:
            continue  # shows in no host app: the agent's resolver drops it too
        mode = effective_mode(grants_for_user(user_id, direct, parents, rows, nested))
        if mode is not None:
            lines.append((addin_id, mode, version))
    d: EntitlementDigest = entitlement_digest(lines, revision)
    return {**d.to_json(user_id), "known_user": known}


async def user_state(service: Service, user_id: str) -> dict[str, Any]:
    """The retained messages (tombstones included) an agent of `user_id` should hold."""
    user_id = _user(user_id)
    async with _snapshot(service) as conn:
        revision = await _revision(conn)
        _, _, paths = await _ancestry(conn, user_id)
        exact, prefixes = split_filters(user_filters(service.tenant, user_id, paths))
        # Ids are [A-Za-z0-9._@-] (check_id), so no GLOB metacharacter can occur in a
        # prefix; GLOB with a literal prefix uses the primary-key index.
        where = " OR ".join(
            ["topic IN (" + ",".join("?" * len(exact)) + ")"] + ["topic GLOB ?"] * len(prefixes)
        )
        rows = await _rows(
            conn,
            f"SELECT topic, revision, payload FROM retained WHERE {where} ORDER BY topic",
            (*exact, *(p + "*" for p in prefixes)),
        )
    wanted = set(exact)
    messages = [
        {"topic": r[0], "revision": r[1], "payload": bytes(r[2]).decode("utf-8")}
        for r in rows
        # A `+` filter matches one level only: a deeper topic under a prefix is not the agent's.
        if r[0] in wanted or any(matches(p + "+", r[0]) for p in prefixes)
    ]
    return {"user_id": user_id, "revision": revision, "messages": messages}

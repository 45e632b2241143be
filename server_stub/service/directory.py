"""The directory: users, groups, direct membership, group nesting, and the tenant policy.

A change to a group is one message for the group (the broker fans it out); nothing here
loops over users to notify them. Nesting never makes a cycle: `nest` refuses it and
names the loop.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from addin_core.protocol import Policy, Topic
from server_stub.service.errors import BadRequest, Conflict, NotFound, checked_id, checked_user_id
from server_stub.service.lookup import need
from server_stub.service.messages import emit_membership, emit_parents
from server_stub.service.unit_of_work import Tx, UnitOfWork


async def nesting_edges(tx: Tx) -> dict[str, list[str]]:
    """child -> its parents, for every nesting in the tenant."""
    edges: dict[str, list[str]] = defaultdict(list)
    for r in await tx.rows("SELECT child, parent FROM nesting"):
        edges[r[0]].append(r[1])
    return edges


def cycle_path(child: str, parent: str, edges: dict[str, list[str]]) -> list[str] | None:
    """If nesting `child` in `parent` closes a loop, the loop: child -> parent -> ... -> child."""
    if child == parent:
        return [child, child]
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


def refuse_cycle(child: str, parent: str, edges: dict[str, list[str]]) -> None:
    cycle = cycle_path(child, parent, edges)
    if cycle:
        raise Conflict(
            f"nesting group {child!r} in {parent!r} would make a cycle: " + " -> ".join(cycle),
            findings=cycle,
        )


async def store_policy(tx: Tx, nested_groups: bool) -> None:
    await tx.execute(
        "UPDATE meta SET value=? WHERE key='nested_groups'", (str(int(nested_groups)),)
    )
    tx.emit(
        Topic.policy(tx.tenant),
        Policy(nested_groups=nested_groups, revision=tx.revision, committed_at=tx.now),
    )


class Directory:
    def __init__(self, uow: UnitOfWork) -> None:
        self.uow = uow
        self.database = uow.database

    async def _need(self, tx: Tx, table: str, key: str, what: str) -> None:
        await need(self.database, tx, table, key, what)

    async def create_user(self, user_id: str, name: str | None = None) -> dict[str, Any]:
        user_id = checked_user_id(user_id)
        async with self.uow.write("create_user", {"id": user_id, "name": name}) as tx:
            if await tx.row("SELECT 1 FROM users WHERE id=?", (user_id,)):
                raise Conflict(f"user {user_id!r} already exists")
            await tx.execute(
                "INSERT INTO users(id, name) VALUES (?, ?)", (user_id, name or user_id)
            )
            await emit_membership(tx, user_id)
        return {"id": user_id, "name": name or user_id, "revision": tx.revision}

    async def delete_user(self, user_id: str) -> dict[str, Any]:
        async with self.uow.write("delete_user", {"id": user_id}) as tx:
            await self._need(tx, "users", user_id, "user")
            for r in await tx.rows(
                "SELECT addin_id FROM assignments WHERE target='user' AND target_id=?", (user_id,)
            ):
                tx.tombstone(Topic.assign_user(tx.tenant, user_id, r[0]))
            await tx.execute(
                "DELETE FROM assignments WHERE target='user' AND target_id=?", (user_id,)
            )
            await tx.execute("DELETE FROM users WHERE id=?", (user_id,))
            tx.tombstone(Topic.member(tx.tenant, user_id))
        return {"id": user_id, "deleted": True, "revision": tx.revision}

    async def create_group(self, group_id: str, name: str | None = None) -> dict[str, Any]:
        group_id = checked_id(group_id, "group id")
        async with self.uow.write("create_group", {"id": group_id, "name": name}) as tx:
            if await tx.row("SELECT 1 FROM groups WHERE id=?", (group_id,)):
                raise Conflict(f"group {group_id!r} already exists")
            await tx.execute(
                "INSERT INTO groups(id, name) VALUES (?, ?)", (group_id, name or group_id)
            )
            await emit_parents(tx, group_id)
        return {"id": group_id, "name": name or group_id, "revision": tx.revision}

    async def delete_group(self, group_id: str) -> dict[str, Any]:
        async with self.uow.write("delete_group", {"id": group_id}) as tx:
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
                tx.tombstone(Topic.assign_group(tx.tenant, group_id, r[0]))
            await tx.execute(
                "DELETE FROM assignments WHERE target='group' AND target_id=?", (group_id,)
            )
            await tx.execute("DELETE FROM groups WHERE id=?", (group_id,))
            # Deleting a group changes its members' and sub-groups' lists: republish those.
            for u in members:
                await emit_membership(tx, u)
            for c in children:
                await emit_parents(tx, c)
            tx.tombstone(Topic.group_parents(tx.tenant, group_id))
        return {"id": group_id, "deleted": True, "revision": tx.revision}

    async def add_member(self, group_id: str, user_id: str) -> dict[str, Any]:
        async with self.uow.write("add_member", {"group": group_id, "user": user_id}) as tx:
            await self._need(tx, "groups", group_id, "group")
            await self._need(tx, "users", user_id, "user")
            await tx.execute(
                "INSERT INTO memberships(user_id, group_id) VALUES (?, ?) ON CONFLICT DO NOTHING",
                (user_id, group_id),
            )
            await emit_membership(tx, user_id)
        return {"group": group_id, "user": user_id, "revision": tx.revision}

    async def remove_member(self, group_id: str, user_id: str) -> dict[str, Any]:
        async with self.uow.write("remove_member", {"group": group_id, "user": user_id}) as tx:
            await self._need(tx, "groups", group_id, "group")
            await self._need(tx, "users", user_id, "user")
            cur = await tx.execute(
                "DELETE FROM memberships WHERE user_id=? AND group_id=?", (user_id, group_id)
            )
            if cur.rowcount == 0:
                raise NotFound(f"user {user_id!r} is not a direct member of group {group_id!r}")
            await emit_membership(tx, user_id)
        return {"group": group_id, "user": user_id, "revision": tx.revision}

    async def nest(self, child: str, parent: str) -> dict[str, Any]:
        async with self.uow.write("nest", {"child": child, "parent": parent}) as tx:
            await self._need(tx, "groups", child, "group")
            await self._need(tx, "groups", parent, "group")
            refuse_cycle(child, parent, await nesting_edges(tx))
            await tx.execute(
                "INSERT INTO nesting(child, parent) VALUES (?, ?) ON CONFLICT DO NOTHING", (child, parent)
            )
            await emit_parents(tx, child)
        return {"child": child, "parent": parent, "revision": tx.revision}

    async def unnest(self, child: str, parent: str) -> dict[str, Any]:
        async with self.uow.write("unnest", {"child": child, "parent": parent}) as tx:
            await self._need(tx, "groups", child, "group")
            await self._need(tx, "groups", parent, "group")
            cur = await tx.execute(
                "DELETE FROM nesting WHERE child=? AND parent=?", (child, parent)
            )
            if cur.rowcount == 0:
                raise NotFound(f"group {child!r} is not nested in {parent!r}")
            await emit_parents(tx, child)
        return {"child": child, "parent": parent, "revision": tx.revision}

    async def set_policy(self, nested_groups: bool) -> dict[str, Any]:
        if not isinstance(nested_groups, bool):
            raise BadRequest("nested_groups must be true or false")
        async with self.uow.write("set_policy", {"nested_groups": nested_groups}) as tx:
            await store_policy(tx, nested_groups)
        return {"nested_groups": nested_groups, "revision": tx.revision}

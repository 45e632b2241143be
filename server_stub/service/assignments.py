"""Assignments: an add-in to Everyone, a user, a group or the admin ("me"), with a mode.

Each assignment is one retained message on its own topic; removing one leaves a tombstone.
"""

from __future__ import annotations

from typing import Any

from addin_core.protocol import Assignment
from server_stub.service.errors import BadRequest, NotFound, checked_id, parse_mode
from server_stub.service.lookup import need
from server_stub.service.messages import assign_topic
from server_stub.service.unit_of_work import UnitOfWork


def resolve_target(target: str, target_id: str | None, admin_user: str | None) -> tuple[str, str]:
    """(everyone|user|group, id) from what the admin asked for; '' is Everyone's id."""
    if target == "me":
        if not admin_user:
            raise BadRequest(
                "target 'me' needs the admin's own user: start the server with --admin-user"
            )
        return "user", admin_user
    if target == "everyone":
        if target_id:
            raise BadRequest("target 'everyone' takes no target_id")
        return "everyone", ""
    if target in ("user", "group"):
        if not target_id:
            raise BadRequest(f"target {target!r} needs a target_id")
        return target, checked_id(target_id, f"{target} id")
    raise BadRequest(f"invalid target {target!r}: use everyone, user, group or me")


class Assignments:
    def __init__(self, uow: UnitOfWork, admin_user: str | None = None) -> None:
        self.uow = uow
        self.database = uow.database
        self.admin_user = admin_user

    async def assign(
        self, addin_id: str, target: str, target_id: str | None, mode: str
    ) -> dict[str, Any]:
        kind, tid = resolve_target(target, target_id, self.admin_user)
        m = parse_mode(mode)
        detail = {"addin": addin_id, "target": kind, "target_id": tid, "mode": m.value}
        async with self.uow.write("assign", detail) as tx:
            await need(self.database, tx, "addins", addin_id, "add-in")
            if kind == "user":
                await need(self.database, tx, "users", tid, "user")
            elif kind == "group":
                await need(self.database, tx, "groups", tid, "group")
            await tx.execute(
                "INSERT INTO assignments(addin_id, target, target_id, mode) VALUES (?,?,?,?) "
                "ON CONFLICT(addin_id, target, target_id) DO UPDATE SET mode=excluded.mode",
                (addin_id, kind, tid, m.value),
            )
            tx.emit(
                assign_topic(tx.tenant, addin_id, kind, tid),
                Assignment(mode=m, revision=tx.revision, committed_at=tx.now),
            )
        return {**detail, "target_id": tid or None, "revision": tx.revision}

    async def unassign(self, addin_id: str, target: str, target_id: str | None) -> dict[str, Any]:
        kind, tid = resolve_target(target, target_id, self.admin_user)
        detail = {"addin": addin_id, "target": kind, "target_id": tid}
        async with self.uow.write("unassign", detail) as tx:
            await need(self.database, tx, "addins", addin_id, "add-in")
            cur = await tx.execute(
                "DELETE FROM assignments WHERE addin_id=? AND target=? AND target_id=?",
                (addin_id, kind, tid),
            )
            if cur.rowcount == 0:
                who = "everyone" if kind == "everyone" else f"{kind} {tid!r}"
                raise NotFound(f"add-in {addin_id} is not assigned to {who}")
            tx.tombstone(assign_topic(tx.tenant, addin_id, kind, tid))
        return {**detail, "target_id": tid or None, "deleted": True, "revision": tx.revision}

"""Assignments: an add-in to Everyone, a user, a group or the admin ("me"), with a mode.

Each assignment is one retained message on its own topic; removing one leaves a tombstone.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from addin_core.protocol import MAX_EXCEPTIONS, Assignment, Mode
from server_stub.service.errors import BadRequest, NotFound, checked_id, parse_mode
from server_stub.service.lookup import need
from server_stub.service.messages import assign_topic
from server_stub.service.unit_of_work import Tx, UnitOfWork


def parse_exceptions(items: Iterable[str]) -> tuple[list[str], list[str]]:
    """(groups, users) from ``group:G`` / ``user:U`` items, each checked; BadRequest else."""
    groups: list[str] = []
    users: list[str] = []
    for item in items:
        kind, sep, ident = item.strip().partition(":")
        if not sep or kind not in ("group", "user"):
            raise BadRequest(f"invalid exclusion {item!r}: use group:G or user:U")
        bucket = groups if kind == "group" else users
        ident = checked_id(ident, f"{kind} id")
        if ident not in bucket:
            bucket.append(ident)
    for kind, bucket in (("groups", groups), ("users", users)):
        if len(bucket) > MAX_EXCEPTIONS:
            raise BadRequest(f"{len(bucket)} excluded {kind}: an assignment excludes at most "
                             f"{MAX_EXCEPTIONS}")  # fmt: skip
    return sorted(groups), sorted(users)


def assignment_payload(tx: Tx, mode: Mode, groups: Sequence[str], users: Sequence[str]) -> Assignment:
    return Assignment(
        mode=mode,
        except_groups=list(groups) or None,
        except_users=list(users) or None,
        revision=tx.revision,
        committed_at=tx.now,
    )


async def write_exceptions(
    tx: Tx,
    addin_id: str,
    kind: str,
    tid: str,
    groups: Sequence[str],
    users: Sequence[str],
    known_groups: set[str] | None = None,
    known_users: set[str] | None = None,
) -> None:
    """Replace the exclusions of one assignment; an unknown group or user is refused."""
    for g in groups:
        if known_groups is not None and g not in known_groups:
            raise NotFound(f"cannot exclude unknown group {g!r}")
        if known_groups is None and not await tx.row("SELECT 1 FROM groups WHERE id=?", (g,)):
            raise NotFound(f"cannot exclude unknown group {g!r}")
    for u in users:
        if known_users is not None and u not in known_users:
            raise NotFound(f"cannot exclude unknown user {u!r}")
        if known_users is None and not await tx.row("SELECT 1 FROM users WHERE id=?", (u,)):
            raise NotFound(f"cannot exclude unknown user {u!r}")
    await tx.execute(
        "DELETE FROM assignment_exceptions WHERE addin_id=? AND target=? AND target_id=?",
        (addin_id, kind, tid),
    )
    await tx.executemany(
        "INSERT INTO assignment_exceptions(addin_id, target, target_id, kind, id) "
        "VALUES (?,?,?,?,?)",
        [(addin_id, kind, tid, "group", g) for g in groups]
        + [(addin_id, kind, tid, "user", u) for u in users],
    )


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
        self,
        addin_id: str,
        target: str,
        target_id: str | None,
        mode: str,
        excepted: Sequence[str] = (),
    ) -> dict[str, Any]:
        """Assign; `excepted` (``group:G``, ``user:U``) replaces the assignment's exclusions."""
        kind, tid = resolve_target(target, target_id, self.admin_user)
        m = parse_mode(mode)
        groups, users = parse_exceptions(excepted)
        detail: dict[str, Any] = {"addin": addin_id, "target": kind, "target_id": tid,
                                  "mode": m.value}  # fmt: skip
        if groups or users:
            detail["except"] = [f"group:{g}" for g in groups] + [f"user:{u}" for u in users]
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
            await write_exceptions(tx, addin_id, kind, tid, groups, users)
            tx.emit(
                assign_topic(tx.tenant, addin_id, kind, tid),
                assignment_payload(tx, m, groups, users),
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

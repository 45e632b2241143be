"""Rollouts and rollbacks: an add-in version reaching rings of users one after the other.

Every write (start, advance, pause, resume, abort, and an advance the gate decided) is one
unit of work: one revision, one audit line, and the add-in's catalog entry emitted again
with the rings that now differ from its version (`messages.emit_catalog`). The rules
(ring and gate syntax, which ring a user is in, the gate's verdict) are pure functions in
`server_stub/rollout_rules.py`; this module reads and writes their state.

States: ``running`` (a gate may advance it), ``paused`` (only an admin advances it),
``completed`` (the last ring, everyone, was reached: the version is the add-in's current
one), ``aborted`` (stopped where it was: reached rings keep its version until a rollback
or a newer rollout), ``superseded`` (a later rollout finished, or a newer version was
uploaded, so its rings no longer apply). One rollout at a time may be running or paused
per add-in.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from addin_core.protocol import MAX_RINGS, Mode
from addin_core.version import compare_versions, parse_version
from server_stub.db import Database, Row
from server_stub.entitlement import AssignmentRow, entitled_users, group_closure_members
from server_stub.rollout_rules import (
    DeviceReport,
    Gate,
    GateResult,
    OpenRollout,
    Ring,
    RuleError,
    catalog_rings,
    check_rings,
    evaluate_gate,
    parse_gate,
    parse_ring,
)
from server_stub.service.errors import BadRequest, Conflict, NotFound
from server_stub.service.lookup import find_addin
from server_stub.service.messages import emit_catalog
from server_stub.service.reads import directory_graph, exceptions_by_assignment
from server_stub.service.unit_of_work import Tx, UnitOfWork

ACTIVE_STATES = ("running", "paused")
GATE_ACTOR = "rollout-gate"
"""Who the audit log names for an advance the gate decided."""


def open_rollout(r: Row) -> OpenRollout:
    rings = tuple(Ring(x["name"], tuple(x["targets"])) for x in json.loads(r["rings"]))
    return OpenRollout(
        int(r["id"]),
        str(r["version"]),
        int(r["started_revision"]) if r["rollback"] else None,
        rings,
        int(r["reached"]),
    )


def _parse(rings: Sequence[str], gate: str | None) -> tuple[list[Ring], Gate | None]:
    try:
        parsed = check_rings([parse_ring(r) for r in rings])
        return parsed, (parse_gate(gate) if gate else None)
    except RuleError as e:
        raise BadRequest(str(e)) from None


class Rollouts:
    def __init__(self, uow: UnitOfWork, clock: Callable[[], float]) -> None:
        self.uow = uow
        self.database: Database = uow.database
        self.clock = clock

    # -- writes --------------------------------------------------------------------------
    async def start(
        self,
        addin: str,
        version: str,
        rings: Sequence[str] = (),
        gate: str | None = None,
        *,
        rollback: bool = False,
    ) -> dict[str, Any]:
        """Start a rollout of `version` (or, with `rollback`, a rollback to it): the first
        ring gets it now. Without rings, one ring reaching everyone: done at once."""
        addin_id = await find_addin(self.database, addin)
        parsed, parsed_gate = _parse(rings, gate)
        op = "rollback" if rollback else "rollout_start"
        detail = {"addin": addin_id, "version": version, "rings": [r.to_json() for r in parsed],
                  "gate": parsed_gate.text if parsed_gate else None}  # fmt: skip
        async with self.uow.write(op, detail) as tx:
            a = await tx.row("SELECT * FROM addins WHERE id=?", (addin_id,))
            assert a is not None
            v = await tx.row(
                "SELECT * FROM addin_versions WHERE addin_id=? AND version=?", (addin_id, version)
            )
            if v is None:
                known = [r[0] for r in await tx.rows(
                    "SELECT version FROM addin_versions WHERE addin_id=?", (addin_id,))]  # fmt: skip
                known.sort(key=lambda x: [int(p) for p in x.split(".")])
                raise NotFound(
                    f"add-in {addin_id} has no version {version}; stored versions: "
                    + ", ".join(known)
                    + (" (upload a new one with `addin add FILE --staged`)" if not rollback else "")
                )
            active = await tx.row(
                "SELECT id, version, state FROM rollouts WHERE addin_id=? AND state IN "
                "('running','paused')",
                (addin_id,),
            )
            if active is not None and not rollback:
                raise Conflict(
                    f"add-in {addin_id} already has rollout {active['id']} of version "
                    f"{active['version']} ({active['state']}): abort it or let it finish first"
                )
            from_version = await self._check_version(tx, a, v, rollback)
            for ring in parsed:
                await _check_targets(tx, ring)
            if active is not None:
                # A rollback takes over from the rollout it undoes: that one stops where it
                # is, and its reached rings keep their version until the rollback reaches them.
                await self._set_state(tx, active["id"], "aborted", "superseded by a rollback")
            cur = await tx.execute(
                "INSERT INTO rollouts(addin_id, version, from_version, rollback, state, rings, "
                "gate, reached, ring_since, started_revision, updated_revision, history) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?) RETURNING id",
                (addin_id, version, from_version, int(rollback), "running",
                 json.dumps([r.to_json() for r in parsed]),
                 parsed_gate.text if parsed_gate else None, 1, tx.now, tx.revision, tx.revision,
                 json.dumps([self._event(tx, "started", parsed[0].name)])),
            )  # fmt: skip
            rollout_id = int((await cur.fetchone())[0])
            if len(parsed) == 1:
                await self._complete(tx, rollout_id, addin_id, version)
            await _check_catalog_room(tx, addin_id)
            await emit_catalog(tx, addin_id)
        return {**await self.get(rollout_id), "revision": tx.revision}

    async def _check_version(self, tx: Tx, a: Row, v: Row, rollback: bool) -> str:
        """The version the rollout goes from (for a rollback, the highest one served)."""
        addin_id, version, base = a["id"], v["version"], a["current_version"]
        if rollback:
            opened = await tx.rows(
                "SELECT * FROM rollouts WHERE addin_id=? AND state IN "
                "('running','paused','aborted')",
                (addin_id,),
            )
            served = {base} | {open_rollout(x).version for x in opened}
            if not any(compare_versions(s, version) > 0 for s in served):
                raise Conflict(
                    f"add-in {addin_id}: no user is served a version above {version} "
                    f"(served: {', '.join(sorted(served))}); a rollback goes to a lower version"
                )
            return str(max(served, key=parse_version))
        if compare_versions(version, base) <= 0:
            raise Conflict(
                f"add-in {addin_id}: version {version} is not newer than the current version "
                f"{base}; to go back to an older version use `addin-server rollback`"
            )
        cur = await tx.row(
            "SELECT hosts, permissions FROM addin_versions WHERE addin_id=? AND version=?",
            (addin_id, base),
        )
        assert cur is not None
        if (json.loads(cur["hosts"]), cur["permissions"]) != (
            json.loads(v["hosts"]),
            v["permissions"],
        ):
            raise Conflict(
                f"add-in {addin_id}: version {version} changes its permissions or hosts; "
                "it needs admin consent (`addin consent`), not a rollout"
            )
        return str(base)

    def _event(
        self, tx: Tx, event: str, ring: str | None, extra: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        return {"at": tx.now, "revision": tx.revision, "event": event, "ring": ring,
                "actor": self.uow.actor, **(extra or {})}  # fmt: skip

    async def _append(self, tx: Tx, rollout_id: int, event: dict[str, Any]) -> None:
        row = await tx.row("SELECT history FROM rollouts WHERE id=?", (rollout_id,))
        assert row is not None
        history = [*json.loads(row[0]), event]
        await tx.execute(
            "UPDATE rollouts SET history=?, updated_revision=? WHERE id=?",
            (json.dumps(history), tx.revision, rollout_id),
        )

    async def _set_state(self, tx: Tx, rollout_id: int, state: str, why: str) -> None:
        await tx.execute("UPDATE rollouts SET state=? WHERE id=?", (state, rollout_id))
        await self._append(tx, rollout_id, self._event(tx, state, None, {"why": why}))

    async def _complete(self, tx: Tx, rollout_id: int, addin_id: str, version: str) -> None:
        """The last ring (everyone) is reached: the version becomes the add-in's own, and
        every older open rollout of it no longer applies."""
        await tx.execute("UPDATE rollouts SET state='completed' WHERE id=?", (rollout_id,))
        await self._append(tx, rollout_id, self._event(tx, "completed", None))
        for r in await tx.rows(
            "SELECT id FROM rollouts WHERE addin_id=? AND id<>? AND state IN "
            "('running','paused','aborted')",
            (addin_id, rollout_id),
        ):
            await self._set_state(tx, r[0], "superseded", f"rollout {rollout_id} completed")
        a = await tx.row("SELECT pending_version FROM addins WHERE id=?", (addin_id,))
        pending = a[0] if a is not None else None
        # A version waiting for consent that is not above the new one is moot.
        keep = pending if pending and compare_versions(pending, version) > 0 else None
        await tx.execute(
            "UPDATE addins SET current_version=?, pending_version=? WHERE id=?",
            (version, keep, addin_id),
        )

    async def _one(self, tx: Tx, rollout_id: int) -> Row:
        r = await tx.row("SELECT * FROM rollouts WHERE id=?", (rollout_id,))
        if r is None:
            raise NotFound(f"no rollout {rollout_id}")
        return r

    async def advance(self, rollout_id: int, *, auto: GateResult | None = None) -> dict[str, Any]:
        """Reach the next ring (an admin's decision, or the gate's with `auto`)."""
        detail: dict[str, Any] = {"rollout": rollout_id}
        if auto is not None:
            detail["gate"] = auto.to_json()
        actor = GATE_ACTOR if auto is not None else None
        async with self.uow.write("rollout_advance", detail, actor=actor) as tx:
            r = await self._one(tx, rollout_id)
            if r["state"] not in ACTIVE_STATES or (auto is not None and r["state"] != "running"):
                raise Conflict(f"rollout {rollout_id} is {r['state']}: it cannot advance")
            rings = json.loads(r["rings"])
            reached = int(r["reached"]) + 1
            await tx.execute(
                "UPDATE rollouts SET reached=?, ring_since=? WHERE id=?",
                (reached, tx.now, rollout_id),
            )
            extra = {"gate": auto.to_json()} if auto is not None else {}
            ev = self._event(tx, "advanced", rings[reached - 1]["name"], extra)
            if auto is not None:
                ev["actor"] = GATE_ACTOR
            await self._append(tx, rollout_id, ev)
            if reached == len(rings):
                await self._complete(tx, rollout_id, r["addin_id"], r["version"])
            await _check_catalog_room(tx, r["addin_id"])
            await emit_catalog(tx, r["addin_id"])
        return {**await self.get(rollout_id), "revision": tx.revision}

    async def set_state(self, rollout_id: int, action: str) -> dict[str, Any]:
        """pause, resume or abort."""
        to, allowed = {"pause": ("paused", ("running",)), "resume": ("running", ("paused",)),
                       "abort": ("aborted", ACTIVE_STATES)}[action]  # fmt: skip
        async with self.uow.write(f"rollout_{action}", {"rollout": rollout_id}) as tx:
            r = await self._one(tx, rollout_id)
            if r["state"] not in allowed:
                raise Conflict(f"rollout {rollout_id} is {r['state']}: it cannot {action}")
            await self._set_state(tx, rollout_id, to, f"{action} by {self.uow.actor}")
            # The catalog entry does not change (reached rings keep their version), but
            # the revision orders the decision with every other admin write.
        return {**await self.get(rollout_id), "revision": tx.revision}

    async def tick(self) -> list[dict[str, Any]]:
        """Advance every running rollout whose gate holds; what advanced."""
        done = []
        for r in await self.database.rows(
            "SELECT id FROM rollouts WHERE state='running' AND gate IS NOT NULL ORDER BY id"
        ):
            try:
                view = await self.get(int(r[0]))
            except NotFound:
                continue  # its add-in was removed (and the rollout with it) in between
            gate = view.get("gate_now")
            if view["state"] == "running" and gate is not None and gate["holds"]:
                result = GateResult(True, gate["devices"], gate["applied"], gate["failed"],
                                    gate["waited_s"])  # fmt: skip
                try:
                    done.append(await self.advance(int(r[0]), auto=result))
                except (Conflict, NotFound):
                    continue  # an admin paused, aborted or removed it in between
        return done

    # -- reads ---------------------------------------------------------------------------
    async def rollout_ids(
        self, addin: str | None = None, *, active_only: bool = False
    ) -> list[int]:
        where, args = [], []
        if addin:
            where.append("addin_id=?")
            args.append(await find_addin(self.database, addin))
        if active_only:
            where.append("state IN ('running','paused')")
        sql = "SELECT id FROM rollouts" + (" WHERE " + " AND ".join(where) if where else "")
        return [int(r[0]) for r in await self.database.rows(sql + " ORDER BY id", args)]

    async def list_rollouts(
        self, addin: str | None = None, all_: bool = False
    ) -> list[dict[str, Any]]:
        return [await self.get(i) for i in await self.rollout_ids(addin, active_only=not all_)]

    async def get(self, rollout_id: int) -> dict[str, Any]:
        """One rollout: rings with their counts, the gate now, the timeline."""
        rows = await self.database.rows("SELECT * FROM rollouts WHERE id=?", (rollout_id,))
        if not rows:
            raise NotFound(f"no rollout {rollout_id}")
        r = rows[0]
        rings = [Ring(x["name"], tuple(x["targets"])) for x in json.loads(r["rings"])]
        reached = int(r["reached"])
        per_ring = await self._ring_devices(r["addin_id"], rings)
        now = self.clock()
        waited = max(0.0, now - float(r["ring_since"]))
        ring_views = []
        for i, ring in enumerate(rings):
            res = evaluate_gate(Gate(), r["version"], per_ring[i], waited)
            ring_views.append({
                "name": ring.name, "targets": list(ring.targets), "reached": i < reached,
                "devices": res.devices, "applied": res.applied, "failed": res.failed,
            })  # fmt: skip
        gate_now = None
        if r["gate"] and r["state"] in ACTIVE_STATES and reached < len(rings):
            gate_now = evaluate_gate(
                parse_gate(r["gate"]), r["version"], per_ring[reached - 1], waited
            ).to_json()
        named = await self.database.rows(
            "SELECT v.display_name FROM addins a JOIN addin_versions v ON v.addin_id=a.id "
            "AND v.version=a.current_version WHERE a.id=?",
            (r["addin_id"],),
        )
        return {
            "rollout_id": int(r["id"]),
            "addin_id": r["addin_id"],
            "name": named[0][0] if named else r["addin_id"],
            "version": r["version"],
            "from_version": r["from_version"],
            "rollback": bool(r["rollback"]),
            "state": r["state"],
            "gate": r["gate"],
            "rings": ring_views,
            "current_ring": rings[reached - 1].name,
            "next_ring": rings[reached].name if reached < len(rings) else None,
            "ring_since": float(r["ring_since"]),
            "gate_now": gate_now,
            "started_revision": int(r["started_revision"]),
            "history": json.loads(r["history"]),
        }

    async def _ring_devices(self, addin_id: str, rings: Sequence[Ring]) -> list[list[DeviceReport]]:
        """Per ring, the reports of the devices of its users that are to install the add-in
        (entitled fixed or optional, not excluded). A user counts in the first ring that
        reaches them."""
        rows = self.database.rows
        nested = bool((await rows("SELECT value FROM meta WHERE key='nested_groups'"))[0][0] == "1")
        all_users, members, children = await directory_graph(rows)
        excepted = await exceptions_by_assignment(rows, addin_id)
        none: tuple[frozenset[str], frozenset[str]] = (frozenset(), frozenset())
        assigned = [
            AssignmentRow(a[0], a[1], Mode(a[2]), *excepted.get((addin_id, a[0], a[1]), none))
            for a in await rows(
                "SELECT target, target_id, mode FROM assignments WHERE addin_id=?", (addin_id,)
            )
        ]
        ent = entitled_users(assigned, all_users, members, children, nested)
        installing = {u for u, m in ent.items() if m is not Mode.AVAILABLE}
        ring_of: dict[str, int] = {}
        for i, ring in enumerate(rings):
            for t in ring.targets:
                if t == "everyone":
                    users: set[str] | list[str] = all_users
                elif t.startswith("user:"):
                    users = [t[5:]]
                else:
                    users = group_closure_members(t[6:], members, children, nested)
                for u in users:
                    ring_of.setdefault(u, i)
        out: list[list[DeviceReport]] = [[] for _ in rings]
        for r in await rows("SELECT client_id, user_id, applied, failed FROM reports"):
            at = ring_of.get(r[1])
            if at is None or r[1] not in installing:
                continue
            applied = frozenset(a["version"] for a in json.loads(r[2]) if a["addin_id"] == addin_id)
            failed = frozenset(f["version"] for f in json.loads(r[3]) if f["addin_id"] == addin_id)
            out[at].append(DeviceReport(r[0], r[1], applied, failed))
        return out


async def _check_catalog_room(tx: Tx, addin_id: str) -> None:
    """Conflict when the add-in's catalog entry would list more rings than an entry carries
    (`MAX_RINGS`): every reached ring of every open rollout is listed, and an aborted
    rollout stays open until a later one completes, so aborted rollouts add up. Without this
    the entry could not be built and the write ended in a 500."""
    opened = [
        open_rollout(x)
        for x in await tx.rows(
            "SELECT * FROM rollouts WHERE addin_id=? AND state IN ('running','paused','aborted')",
            (addin_id,),
        )
    ]
    listed = len(catalog_rings(opened))
    if listed > MAX_RINGS:
        raise Conflict(
            f"add-in {addin_id}: its catalog entry would list {listed} rings of open rollouts "
            f"(aborted ones included), more than the {MAX_RINGS} an entry carries; complete a "
            "rollout (or a rollback) to everyone first: that closes the older ones"
        )


async def _check_targets(tx: Tx, ring: Ring) -> None:
    for t in ring.targets:
        kind, _, ident = t.partition(":")
        if kind == "group" and not await tx.row("SELECT 1 FROM groups WHERE id=?", (ident,)):
            raise NotFound(f"ring {ring.name}: unknown group {ident!r}")
        if kind == "user" and not await tx.row("SELECT 1 FROM users WHERE id=?", (ident,)):
            raise NotFound(f"ring {ring.name}: unknown user {ident!r}")

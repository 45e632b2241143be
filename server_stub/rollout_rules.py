"""The rules of a rollout, as plain functions over plain data (no database, no clock).

- a **ring** is ``NAME=TARGET[+TARGET...]`` where a target is ``everyone``, ``group:G`` or
  ``user:U``; rings are reached in the order given, the first at start; the last must
  reach everyone, so a finished rollout leaves the add-in at one version for every user;
- a user belongs to the FIRST ring that reaches them (a pilot user who is also in sales
  counts in the pilot ring only), which is also the ring whose version they get;
- a **gate** is ``applied>=P%``, ``failed<=N`` (``failed=N`` means at most N) and
  ``wait=D`` (``30s``, ``10m``, ``2h``, ``1d``), joined by commas; it holds for the last
  reached ring when every condition does, over the devices of that ring's users that the
  rollout concerns (entitled to install it) and that have reported;
- the **catalog rings** an agent receives are those of every open rollout of the add-in,
  newest first, each listing only its reached rings (a ring not reached yet keeps what it
  had).

The server's ring matching here and the agent's (`agent/resolver.py`) and the oracle's
(`simulator/oracle.py`) are written separately on purpose.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from addin_core.protocol import MAX_RINGS, check_id


class RuleError(ValueError):
    """A ring or gate that does not follow the syntax; the message says how to write it."""


@dataclass(frozen=True)
class Ring:
    name: str
    targets: tuple[str, ...]
    """``everyone``, ``group:G``, ``user:U``."""

    @property
    def everyone(self) -> bool:
        return "everyone" in self.targets

    def reaches(self, user_id: str, groups: Iterable[str]) -> bool:
        """Whether this ring reaches a user in `groups` (already under the nesting policy)."""
        if self.everyone or f"user:{user_id}" in self.targets:
            return True
        return any(f"group:{g}" in self.targets for g in groups)

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "targets": list(self.targets)}


def parse_target(text: str) -> str:
    t = text.strip()
    if t == "everyone":
        return t
    kind, sep, ident = t.partition(":")
    if not sep or kind not in ("group", "user"):
        raise RuleError(f"invalid ring target {text!r}: use everyone, group:G or user:U")
    try:
        check_id(ident, f"{kind} id")
    except ValueError as e:
        raise RuleError(str(e)) from None
    return f"{kind}:{ident}"


def parse_ring(text: str) -> Ring:
    """``pilot=group:pilot``, ``wide=group:sales+group:emea``, ``all=everyone``."""
    name, sep, targets = text.partition("=")
    if not sep or not targets.strip():
        raise RuleError(
            f"invalid ring {text!r}: use NAME=TARGET, e.g. pilot=group:pilot or all=everyone"
        )
    try:
        check_id(name.strip(), "ring name")
    except ValueError as e:
        raise RuleError(str(e)) from None
    parsed = tuple(dict.fromkeys(parse_target(t) for t in targets.split("+")))
    return Ring(name.strip(), parsed)


def check_rings(rings: Sequence[Ring]) -> list[Ring]:
    """The rings of one rollout, or RuleError: named once each, at most `MAX_RINGS`, and the
    last one reaching everyone."""
    if not rings:
        return [Ring("all", ("everyone",))]
    if len(rings) > MAX_RINGS:
        raise RuleError(f"{len(rings)} rings: a rollout has at most {MAX_RINGS}")
    names = [r.name for r in rings]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise RuleError(f"ring {dup!r} is given twice")
    if not rings[-1].everyone:
        raise RuleError(
            f"the last ring ({rings[-1].name}) must reach everyone (e.g. --ring all=everyone): "
            "a finished rollout leaves the add-in at one version for every user"
        )
    return list(rings)


_DURATION = re.compile(r"^([0-9]{1,7})(s|m|h|d)$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    m = _DURATION.match(text.strip())
    if not m:
        raise RuleError(f"invalid duration {text!r}: use a number and s, m, h or d (10m)")
    return float(int(m.group(1)) * _UNIT[m.group(2)])


@dataclass(frozen=True)
class Gate:
    """What must hold before the next ring: every field None is not checked."""

    applied_pct: float | None = None
    max_failed: int | None = None
    wait_s: float | None = None
    text: str = ""


_CONDITION = re.compile(r"^(applied|failed|wait)\s*(>=|<=|=)\s*(.+)$")


def parse_gate(text: str) -> Gate:
    """``applied>=95%,failed=0,wait=10m`` (any subset, any order)."""
    applied: float | None = None
    failed: int | None = None
    wait: float | None = None
    for part in (p.strip() for p in text.split(",")):
        m = _CONDITION.match(part)
        if not m:
            raise RuleError(
                f"invalid gate condition {part!r}: use applied>=P%, failed=N (or failed<=N) "
                "and wait=D, joined by commas"
            )
        key, op, value = m.groups()
        if key == "applied":
            pm = re.fullmatch(r"([0-9]{1,3}(?:\.[0-9]+)?)%", value.strip())
            if op != ">=" or not pm or float(pm.group(1)) > 100:
                raise RuleError(f"invalid gate condition {part!r}: use applied>=P% with P ≤ 100")
            applied = float(pm.group(1))
        elif key == "failed":
            if op == ">=" or not value.strip().isdigit():
                raise RuleError(f"invalid gate condition {part!r}: use failed=N or failed<=N")
            failed = int(value.strip())
        else:
            if op != "=":
                raise RuleError(f"invalid gate condition {part!r}: use wait=D (10m)")
            wait = parse_duration(value)
    return Gate(applied, failed, wait, ",".join(p.strip() for p in text.split(",")))


@dataclass(frozen=True)
class DeviceReport:
    """One device's latest report, reduced to what a gate reads for one add-in."""

    client_id: str
    user_id: str
    applied_versions: frozenset[str]
    """Versions of the add-in the device reported applied (any host)."""
    failed_versions: frozenset[str]
    """Versions of the add-in the device reported it cannot apply."""


@dataclass(frozen=True)
class GateResult:
    holds: bool
    devices: int
    applied: int
    failed: int
    waited_s: float
    unmet: tuple[str, ...] = field(default=())

    @property
    def applied_pct(self) -> float | None:
        return 100.0 * self.applied / self.devices if self.devices else None

    def to_json(self) -> dict[str, object]:
        pct = self.applied_pct
        return {
            "holds": self.holds,
            "devices": self.devices,
            "applied": self.applied,
            "failed": self.failed,
            "applied_pct": round(pct, 1) if pct is not None else None,
            "waited_s": round(self.waited_s, 1),
            "unmet": list(self.unmet),
        }


def evaluate_gate(
    gate: Gate, version: str, devices: Iterable[DeviceReport], waited_s: float
) -> GateResult:
    """Whether `gate` holds for a ring at `version`, from its devices' reports."""
    devs = list(devices)
    applied = sum(1 for d in devs if version in d.applied_versions)
    failed = sum(1 for d in devs if version in d.failed_versions)
    unmet: list[str] = []
    if gate.applied_pct is not None:
        if not devs:
            unmet.append("no device of the ring has reported yet")
        elif 100.0 * applied < gate.applied_pct * len(devs):
            unmet.append(
                f"applied on {applied}/{len(devs)} devices "
                f"({100.0 * applied / len(devs):.1f}% < {gate.applied_pct:g}%)"
            )
    if gate.max_failed is not None and failed > gate.max_failed:
        unmet.append(f"{failed} devices failed (at most {gate.max_failed})")
    if gate.wait_s is not None and waited_s < gate.wait_s:
        unmet.append(f"at its version for {waited_s:.0f} s of {gate.wait_s:.0f} s")
    return GateResult(not unmet, len(devs), applied, failed, waited_s, tuple(unmet))


@dataclass(frozen=True)
class OpenRollout:
    """What the catalog entry needs of one open rollout."""

    rollout_id: int
    version: str
    rollback_revision: int | None
    rings: tuple[Ring, ...]
    reached: int


def catalog_rings(open_rollouts: Sequence[OpenRollout]) -> list[tuple[Ring, OpenRollout]]:
    """The rings the catalog entry lists, first match wins: the newest rollout first, each
    with its reached rings only (a name two rollouts share is listed for each: the agent and
    the simulator's oracle match them the same way, first one wins)."""
    out: list[tuple[Ring, OpenRollout]] = []
    for r in sorted(open_rollouts, key=lambda x: -x.rollout_id):
        for ring in r.rings[: r.reached]:
            out.append((ring, r))
    return out


def version_for(
    base: str, rings: Sequence[tuple[Ring, OpenRollout]], user_id: str, groups: Iterable[str]
) -> tuple[str, str | None]:
    """(version, ring name) that applies to a user: the first listed ring reaching them, or
    the base version (ring None)."""
    gs = set(groups)
    for ring, r in rings:
        if ring.reaches(user_id, gs):
            return r.version, ring.name
    return base, None

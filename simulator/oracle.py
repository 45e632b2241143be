"""The independent oracle: what every user SHOULD be entitled to, computed by brute force.

It is written separately from the agent's resolver on purpose and shares no code with it (it
never imports `agent`): it works from the simulator's own ground truth — the organisation and
the list of admin actions the scenario applied — not from MQTT messages, and it computes group
reach as a fixed point of the nesting relation (iterate "a group reaches its parents' reach"
until nothing changes) instead of walking the graph per user. If the two implementations agree
on thousands of clients, both are probably right; if they disagree, the report says where.

Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from addin_core.protocol import Host, Mode

ALL_HOSTS: tuple[Host, ...] = tuple(Host)


class OracleError(ValueError):
    """An admin action the ground truth cannot apply (unknown id, malformed arguments)."""


@dataclass(frozen=True)
class AdminAction:
    """One admin operation, as the scenario issued it to the server's admin API.

    `op` is one of: add_user, add_group, add_member, remove_member, add_parent, remove_parent,
    upload (args: addin_id, version, hosts, permissions, name), stage (the same args: a
    version stored for a rollout), consent, enable, disable, remove_addin, assign (args:
    addin_id, target, target_id, mode, except: ["group:G", "user:U"]), unassign, policy
    (args: nested_groups), rollout_start (args: addin_id, version, rings: ["NAME=TARGET"]),
    rollback (the same args), rollout_advance, rollout_pause, rollout_resume, rollout_abort
    (args: addin_id).
    """

    op: str
    args: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class RolloutTruth:
    """A rollout as the admin drove it: its rings (name, targets) and how many it reached."""

    version: str
    rings: list[tuple[str, list[str]]]
    reached: int = 1
    state: str = "running"
    rollback: bool = False


@dataclass
class AddinTruth:
    addin_id: str
    version: str
    hosts: frozenset[Host]
    permissions: str
    enabled: bool = True
    pending: tuple[str, frozenset[Host], str] | None = None
    """An uploaded update waiting for consent: (version, hosts, permissions)."""
    stored: dict[str, tuple[frozenset[Host], str]] = field(default_factory=dict)
    """Every version the server holds (uploaded or staged): its hosts and permissions."""
    rollouts: list[RolloutTruth] = field(default_factory=list)
    """Every rollout, oldest first."""


def _version_key(text: str) -> tuple[int, ...]:
    # Deliberately not addin_core.version: a second, tiny implementation of the same rule.
    parts = [int(p) for p in text.split(".")]
    return tuple(parts + [0] * (4 - len(parts)))


class GroundTruth:
    """The organisation, catalog, assignments and policy as the admin has set them."""

    def __init__(
        self,
        users: Iterable[str] = (),
        groups: Mapping[str, Iterable[str]] | None = None,
        parents: Mapping[str, Iterable[str]] | None = None,
        *,
        nested_groups: bool = False,
    ) -> None:
        self.users: set[str] = set(users)
        self.groups: set[str] = set(groups or {}) | set(parents or {})
        self.membership: set[tuple[str, str]] = set()  # (user, group)
        self.nesting: set[tuple[str, str]] = set()  # (child group, parent group)
        for g, members in (groups or {}).items():
            self.membership |= {(u, g) for u in members}
        for g, ps in (parents or {}).items():
            self.groups |= set(ps)
            self.nesting |= {(g, p) for p in ps}
        self.nested_groups = nested_groups
        self.addins: dict[str, AddinTruth] = {}
        self.assignments: dict[tuple[str, str, str | None], Mode] = {}
        self.exceptions: dict[tuple[str, str, str | None], frozenset[str]] = {}
        """Per assignment, what it excludes: "group:G" and "user:U"."""

    @classmethod
    def from_org_document(cls, doc: Mapping[str, Any]) -> GroundTruth:
        groups = {g["id"]: g.get("members", []) for g in doc.get("groups", [])}
        parents = {g["id"]: g.get("parents", []) for g in doc.get("groups", [])}
        nested = bool((doc.get("policy") or {}).get("nested_groups", False))
        return cls([u["id"] for u in doc.get("users", [])], groups, parents, nested_groups=nested)

    # -- admin actions ------------------------------------------------------------------------
    def apply(self, action: AdminAction) -> str:
        """Apply one action; return the outcome the server should report.

        "ok" for most actions; for uploads "current", "needs_consent" or "refused" (a version
        that is not strictly greater than the deployed one).
        """
        a = action.args
        try:
            match action.op:
                case "add_user":
                    self.users.add(a["user"])
                case "add_group":
                    self.groups.add(a["group"])
                case "add_member":
                    self.membership.add((a["user"], a["group"]))
                case "remove_member":
                    self.membership.discard((a["user"], a["group"]))
                case "add_parent":
                    self.nesting.add((a["group"], a["parent"]))
                case "remove_parent":
                    self.nesting.discard((a["group"], a["parent"]))
                case "policy":
                    self.nested_groups = bool(a["nested_groups"])
                case "upload":
                    return self._upload(a)
                case "stage":
                    return self._stage(a)
                case "rollout_start" | "rollback":
                    self._start(a, rollback=action.op == "rollback")
                case "rollout_advance":
                    self._advance(a["addin_id"])
                case "rollout_pause" | "rollout_resume" | "rollout_abort":
                    r = self._active(a["addin_id"])
                    r.state = {"rollout_pause": "paused", "rollout_resume": "running",
                               "rollout_abort": "aborted"}[action.op]  # fmt: skip
                case "consent":
                    addin = self.addins[a["addin_id"]]
                    if addin.pending is not None:
                        addin.version, addin.hosts, addin.permissions = addin.pending
                        addin.pending = None
                case "enable" | "disable":
                    self.addins[a["addin_id"]].enabled = action.op == "enable"
                case "remove_addin":
                    del self.addins[a["addin_id"]]
                    for key in [k for k in self.assignments if k[0] == a["addin_id"]]:
                        del self.assignments[key]
                case "assign":
                    key = (a["addin_id"], a["target"], a.get("target_id"))
                    self.assignments[key] = Mode(a["mode"])
                    self.exceptions[key] = frozenset(a.get("except") or ())
                case "unassign":
                    key = (a["addin_id"], a["target"], a.get("target_id"))
                    self.assignments.pop(key, None)
                    self.exceptions.pop(key, None)
                case _:
                    raise OracleError(f"unknown admin action {action.op!r}")
        except KeyError as e:
            raise OracleError(f"{action.op}: unknown or missing {e}") from None
        return "ok"

    def _upload(self, a: Mapping[str, Any]) -> str:
        hosts = frozenset(Host(h) for h in a["hosts"])
        new = (str(a["version"]), hosts, str(a["permissions"]))
        old = self.addins.get(a["addin_id"])
        if old is None:
            self.addins[a["addin_id"]] = AddinTruth(a["addin_id"], *new)
            self.addins[a["addin_id"]].stored[new[0]] = (hosts, new[2])
            return "current"
        if any(_version_key(new[0]) <= _version_key(v) for v in [old.version, *old.stored]):
            return "refused"
        old.stored[new[0]] = (hosts, new[2])
        if hosts != old.hosts or new[2] != old.permissions:
            old.pending = new
            return "needs_consent"
        old.version, old.hosts, old.permissions = new
        old.pending = None
        for r in old.rollouts:
            if r.state == "aborted":
                r.state = "superseded"
        return "current"

    def _stage(self, a: Mapping[str, Any]) -> str:
        addin = self.addins[a["addin_id"]]
        if any(_version_key(str(a["version"])) <= _version_key(v) for v in addin.stored):
            return "refused"
        addin.stored[str(a["version"])] = (
            frozenset(Host(h) for h in a["hosts"]),
            str(a["permissions"]),
        )
        return "staged"

    # -- rollouts -----------------------------------------------------------------------------
    def _active(self, addin_id: str) -> RolloutTruth:
        for r in self.addins[addin_id].rollouts:
            if r.state in ("running", "paused"):
                return r
        raise OracleError(f"add-in {addin_id} has no running or paused rollout")

    def _start(self, a: Mapping[str, Any], rollback: bool) -> None:
        addin = self.addins[a["addin_id"]]
        rings = []
        for text in a.get("rings") or ["all=everyone"]:
            name, _, targets = str(text).partition("=")
            rings.append((name, targets.split("+")))
        if rollback:
            for r in addin.rollouts:
                if r.state in ("running", "paused"):
                    r.state = "aborted"
        addin.rollouts.append(RolloutTruth(str(a["version"]), rings, rollback=rollback))
        if len(rings) == 1:
            self._complete(addin, addin.rollouts[-1])

    def _advance(self, addin_id: str) -> None:
        addin = self.addins[addin_id]
        r = self._active(addin_id)
        r.reached += 1
        if r.reached == len(r.rings):
            self._complete(addin, r)

    def _complete(self, addin: AddinTruth, done: RolloutTruth) -> None:
        done.state = "completed"
        for r in addin.rollouts:
            if r is not done and r.state in ("running", "paused", "aborted"):
                r.state = "superseded"
        addin.version = done.version
        addin.hosts, addin.permissions = addin.stored[done.version]
        if addin.pending and _version_key(addin.pending[0]) <= _version_key(done.version):
            addin.pending = None

    def version_for(self, addin_id: str, user: str, groups: set[str]) -> str:
        """The version `user` (in `groups`, under the policy) is served: brute force over the
        rollouts still in force, the newest first, and their reached rings in order."""
        addin = self.addins[addin_id]
        for r in reversed(addin.rollouts):
            if r.state not in ("running", "paused", "aborted"):
                continue
            for _name, targets in r.rings[: r.reached]:
                for t in targets:
                    if (
                        t == "everyone"
                        or t == f"user:{user}"
                        or (t.startswith("group:") and t[6:] in groups)
                    ):
                        return r.version
        return addin.version

    # -- the brute force ----------------------------------------------------------------------
    def group_reach(self) -> dict[str, frozenset[str]]:
        """For every group, itself plus every group it is nested in (directly or not).

        Fixed point: start from "each group reaches itself", then repeatedly add the reach of
        every parent, until a full pass adds nothing. Cycles just stop adding.
        """
        reach: dict[str, set[str]] = {g: {g} for g in self.groups}
        for child, parent in self.nesting:
            reach.setdefault(child, {child})
            reach.setdefault(parent, {parent})
        changed = True
        while changed:
            changed = False
            for child, parent in self.nesting:
                before = len(reach[child])
                reach[child] |= reach[parent]
                changed = changed or len(reach[child]) != before
        return {g: frozenset(r) for g, r in reach.items()}

    def user_groups(self, reach: Mapping[str, frozenset[str]] | None = None) -> dict[str, set[str]]:
        """Effective groups per user under the current nesting policy."""
        direct: dict[str, set[str]] = {u: set() for u in self.users}
        for u, g in self.membership:
            direct.setdefault(u, set()).add(g)
        if not self.nested_groups:
            return direct
        reach = reach if reach is not None else self.group_reach()
        return {u: set().union(*(reach.get(g, {g}) for g in gs)) for u, gs in direct.items()}

    def entitlements_for_all(self, hosts: Iterable[Host] = ALL_HOSTS) -> dict[str, dict[str, Mode]]:
        """{user: {addin_id: strongest mode}} for enabled add-ins with a host the client has."""
        host_set = frozenset(hosts)
        groups_of = self.user_groups()
        visible = {a.addin_id for a in self.addins.values() if a.enabled and a.hosts & host_set}
        result: dict[str, dict[str, Mode]] = {}
        for user in sorted(groups_of):
            mine: dict[str, Mode] = {}
            shut: set[str] = set()
            mark = {f"user:{user}"} | {f"group:{g}" for g in groups_of[user]}
            for key, mode in self.assignments.items():
                addin_id, target, target_id = key
                if addin_id not in visible:
                    continue
                if (
                    target == "everyone"
                    or (target == "user" and target_id == user)
                    or (target == "group" and target_id in groups_of[user])
                ):
                    if self.exceptions.get(key, frozenset()) & mark:
                        shut.add(addin_id)  # an exclusion wins over every assignment
                    held = mine.get(addin_id)
                    if held is None or mode.strength > held.strength:
                        mine[addin_id] = mode
            result[user] = {a: m for a, m in mine.items() if a not in shut}
        return result

    def installed_for(
        self,
        entitlements: Mapping[str, Mode],
        hosts: Iterable[Host] = ALL_HOSTS,
        user: str | None = None,
        groups: set[str] | None = None,
    ) -> dict[Host, dict[str, str]]:
        """What each host shows after a launch: fixed and optional add-ins, at the version
        served to `user` (the consented one, or their rollout ring's), in the hosts that
        version's manifest lists. Available add-ins are not installed."""
        if user is not None and groups is None:
            groups = self.user_groups().get(user, set())
        out: dict[Host, dict[str, str]] = {}
        served = {
            a: self.version_for(a, user, groups or set())
            if user is not None
            else self.addins[a].version
            for a in entitlements
        }
        for host in hosts:
            out[host] = {
                addin_id: served[addin_id]
                for addin_id, mode in entitlements.items()
                if mode in (Mode.FIXED, Mode.OPTIONAL)
                and host
                in self.addins[addin_id].stored.get(
                    served[addin_id], (self.addins[addin_id].hosts, "")
                )[0]
            }
        return out


def diff_entitlements(
    expected: Mapping[str, Mode | str], actual: Mapping[str, Mode | str]
) -> list[str]:
    """Human-readable differences, empty when equal."""
    out: list[str] = []
    for a in sorted(set(expected) | set(actual)):
        e, g = expected.get(a), actual.get(a)
        if e is None:
            out.append(f"unexpected {a} ({g})")
        elif g is None:
            out.append(f"missing {a} ({e})")
        elif str(e) != str(g):
            out.append(f"{a}: expected {e}, got {g}")
    return out


def diff_installed(
    expected: Mapping[str, Mapping[str, str]], actual: Mapping[str, Mapping[str, str]]
) -> list[str]:
    out: list[str] = []
    for host in sorted(set(expected) | set(actual)):
        e, g = expected.get(host, {}), actual.get(host, {})
        for a in sorted(set(e) | set(g)):
            if e.get(a) != g.get(a):
                out.append(
                    f"{host}: {a} expected {e.get(a) or 'absent'}, got {g.get(a) or 'absent'}"
                )
    return out

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
    upload (args: addin_id, version, hosts, permissions, name), consent, enable, disable,
    remove_addin, assign (args: addin_id, target, target_id, mode), unassign, policy
    (args: nested_groups).
    """

    op: str
    args: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class AddinTruth:
    addin_id: str
    version: str
    hosts: frozenset[Host]
    permissions: str
    enabled: bool = True
    pending: tuple[str, frozenset[Host], str] | None = None
    """An uploaded update waiting for consent: (version, hosts, permissions)."""


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
                case "unassign":
                    self.assignments.pop((a["addin_id"], a["target"], a.get("target_id")), None)
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
            return "current"
        if _version_key(new[0]) <= _version_key(old.version):
            return "refused"
        if hosts != old.hosts or new[2] != old.permissions:
            old.pending = new
            return "needs_consent"
        old.version, old.hosts, old.permissions = new
        old.pending = None
        return "current"

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
            for (addin_id, target, target_id), mode in self.assignments.items():
                if addin_id not in visible:
                    continue
                if (
                    target == "everyone"
                    or (target == "user" and target_id == user)
                    or (target == "group" and target_id in groups_of[user])
                ):
                    held = mine.get(addin_id)
                    if held is None or mode.strength > held.strength:
                        mine[addin_id] = mode
            result[user] = mine
        return result

    def installed_for(
        self, entitlements: Mapping[str, Mode], hosts: Iterable[Host] = ALL_HOSTS
    ) -> dict[Host, dict[str, str]]:
        """What each host shows after a launch: fixed and optional add-ins, at the consented
        version, in the hosts their manifest lists. Available add-ins are not installed."""
        out: dict[Host, dict[str, str]] = {}
        for host in hosts:
            out[host] = {
                addin_id: self.addins[addin_id].version
                for addin_id, mode in entitlements.items()
                if mode in (Mode.FIXED, Mode.OPTIONAL) and host in self.addins[addin_id].hosts
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

"""Client-side resolution: from received state to the add-ins this user is entitled to. Pure.

`resolve` answers "what should be installed, in which mode, in which host apps, and why";
`explain` answers the same question for one add-in even when the answer is "nothing",
with every fact `addin-agent why` needs (nested-only assignments, turned-off add-ins,
hosts the add-in does not support...).

Rules: targets everyone / user / group; nested groups count only when the
tenant policy `nested_groups` is on; the strongest mode wins (fixed > optional > available);
an exclusion (``except_groups`` / ``except_users``) on any assignment that reaches the user
and names them or one of their groups wins over every assignment of that add-in;
turned-off add-ins are left out; an add-in shows only in the hosts its manifest lists and
that are installed on this computer. While a rollout runs, the version that applies is the
one of the first ring of the catalog entry that reaches the user (groups under the same
nesting policy), the entry's own otherwise. Group nesting is walked breadth-first with a visited
set (cycles cannot loop) and a depth bound.

Written independently, on purpose, of the server's entitlement evaluator
(server_stub/entitlement.py, which computes the anti-entropy digest from the database) and
of the simulator's oracle (simulator/oracle.py): the three agree only if each reads the
rules right, so a mistake in one shows up as a digest mismatch or a failed convergence
check instead of being copied everywhere. Hence no shared code and distinct names: here a
`Grant` is one assignment that reaches the user.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from addin_core.topics import Host, Mode, Topic

if TYPE_CHECKING:  # types only: the read-only commands import this without pydantic
    from addin_core.protocol import Assignment, CatalogEntry
    from agent.state import ReceivedState


TargetKind = Literal["everyone", "user", "group"]


@dataclass(frozen=True, slots=True)
class Grant:
    """One assignment that reaches the user: its target, mode, and the group path.

    `path` runs from a group the user is directly in to the assigned group
    (``("emea-sales", "sales")`` means: you are in emea-sales, which is nested in sales).
    """

    target: TargetKind
    mode: Mode
    revision: int
    group_id: str | None = None
    path: tuple[str, ...] = ()
    except_groups: tuple[str, ...] = ()
    except_users: tuple[str, ...] = ()

    @property
    def nested(self) -> bool:
        return len(self.path) > 1

    def describe(self) -> str:
        if self.target == "everyone":
            return "assigned to Everyone"
        if self.target == "user":
            return "assigned to you directly"
        if self.nested:
            return (
                f"assigned to group {self.group_id} (you are in it through {' → '.join(self.path)})"
            )
        return f"assigned to group {self.group_id} (you are a direct member)"

    def target_text(self) -> str:
        if self.target == "everyone":
            return "Everyone"
        return f"group {self.group_id}" if self.target == "group" else "you directly"

    def to_json(self) -> dict[str, object]:
        return {
            "target": self.target,
            "group_id": self.group_id,
            "path": list(self.path),
            "mode": self.mode.value,
            "revision": self.revision,
        }


@dataclass(frozen=True, slots=True)
class Exclusion:
    """An assignment reaching the user excludes them (or one of their groups)."""

    grant: Grant
    kind: Literal["group", "user"]
    ident: str

    def describe(self) -> str:
        return f"excluded by {self.kind} {self.ident} from the assignment to {self.grant.target_text()}"


@dataclass(frozen=True, slots=True)
class Served:
    """The version of an add-in that applies to this user, and where it comes from."""

    version: str
    sha256: str
    hosts: tuple[Host, ...]
    permissions: str
    ring: str | None = None
    """The rollout ring that serves it; None: the catalog entry's own version."""
    rollback: int | None = None
    """The revision of the admin's rollback that authorises this version as a downgrade."""


@dataclass(frozen=True, slots=True)
class Entitlement:
    """The user is entitled to `addin_id` in `mode`, in `hosts`, because of `grants`."""

    addin_id: str
    name: str
    mode: Mode
    version: str
    sha256: str
    hosts: tuple[Host, ...]
    """Hosts it shows in on this computer (catalog hosts that are installed here)."""
    permissions: str
    grants: tuple[Grant, ...]
    catalog_hosts: tuple[Host, ...] = ()
    """Every host the consented manifest lists."""
    ring: str | None = None
    """The rollout ring whose version applies (None: the catalog entry's version)."""
    rollback: int | None = None
    """Set when `version` is an admin's rollback: the one case a lower version is applied."""


@dataclass(frozen=True, slots=True)
class Explanation:
    """Everything the resolver knows about one add-in for one user."""

    addin_id: str
    entry: CatalogEntry | None
    removed_from_catalog: bool
    nested_groups: bool
    grants: tuple[Grant, ...]
    """Grants that count under the current policy."""
    blocked: tuple[Grant, ...]
    """Grants through nested groups while nesting is disabled: they do not count."""
    hosts_here: tuple[Host, ...]
    entitlement: Entitlement | None
    excluded: Exclusion | None = None
    """The exclusion that takes the add-in away from the user, whatever grants it."""
    served: Served | None = None
    """The version that applies to the user (None: not in the catalog)."""


def group_paths(
    state: ReceivedState, user_id: str, nested: bool = True
) -> dict[str, tuple[str, ...]]:
    """Every group reaching `user_id`, each with the shortest path from a direct group.

    With `nested` False only direct groups are returned. Cycle-safe: each group is visited
    once, so the walk costs at most the groups received, however deep the chain. Not cut at
    some depth: the server (`server_stub/entitlement.py`) follows every level, and a group
    past the cut would be one whose exclusion the agent ignores (installing an add-in for a
    user the server excluded) or whose assignment it never sees.
    """
    paths: dict[str, tuple[str, ...]] = {}
    frontier: list[str] = []
    for g in state.membership.get(user_id, ()):
        if g not in paths:
            paths[g] = (g,)
            frontier.append(g)
    if not nested:
        return paths
    while frontier:
        nxt: list[str] = []
        for g in frontier:
            for p in state.parents.get(g, ()):
                if p not in paths:
                    paths[p] = (*paths[g], p)
                    nxt.append(p)
        frontier = nxt
    return paths


def _grants_for(
    state: ReceivedState, user_id: str, addin_id: str, paths: dict[str, tuple[str, ...]]
) -> list[Grant]:
    out: list[Grant] = []
    a = state.assign_everyone.get(addin_id)
    if a is not None:
        out.append(_grant("everyone", a))
    a = state.assign_user.get(user_id, {}).get(addin_id)
    if a is not None:
        out.append(_grant("user", a))
    for g, path in paths.items():
        ga = state.assign_group.get(g, {}).get(addin_id)
        if ga is not None:
            out.append(_grant("group", ga, g, path))
    return out


def _grant(
    target: TargetKind, a: Assignment, group_id: str | None = None, path: tuple[str, ...] = ()
) -> Grant:
    if a.except_groups is None and a.except_users is None:
        return Grant(target, a.mode, a.revision, group_id, path)
    return Grant(target, a.mode, a.revision, group_id, path,
                 tuple(a.except_groups or ()), tuple(a.except_users or ()))  # fmt: skip


def _exclusion(grants: Iterable[Grant], user_id: str, groups: Iterable[str]) -> Exclusion | None:
    """The first exclusion among `grants` (those that count) that names the user or one of
    `groups` (the user's groups under the nesting policy)."""
    mine: set[str] | None = None
    for g in grants:
        if user_id in g.except_users:
            return Exclusion(g, "user", user_id)
        if g.except_groups:
            mine = set(groups) if mine is None else mine
            hit = sorted(x for x in g.except_groups if x in mine)
            if hit:
                return Exclusion(g, "group", hit[0])
    return None


def served(entry: CatalogEntry, user_id: str, groups: Iterable[str]) -> Served:
    """The version of `entry` that applies to `user_id` (in `groups`, under the policy)."""
    if entry.rings:
        mine = set(groups)
        for ring in entry.rings:
            for t in ring.targets:
                kind, _, ident = t.partition(":")
                if (
                    t == "everyone"
                    or (kind == "user" and ident == user_id)
                    or (kind == "group" and ident in mine)
                ):
                    return Served(ring.version, ring.manifest_sha256, tuple(ring.hosts),
                                  ring.permissions, ring.ring, ring.rollback)  # fmt: skip
    return Served(entry.version, entry.manifest_sha256, tuple(entry.hosts), entry.permissions,
                  None, entry.rollback)  # fmt: skip


def _all_grants(
    state: ReceivedState, user_id: str, paths: dict[str, tuple[str, ...]]
) -> dict[str, list[Grant]]:
    """Grants per add-in in one pass over the (small) assignment tables."""
    out: dict[str, list[Grant]] = {}

    def add(addin_id: str, grant: Grant) -> None:
        out.setdefault(addin_id, []).append(grant)

    for addin_id, a in state.assign_everyone.items():
        add(addin_id, _grant("everyone", a))
    for addin_id, a in state.assign_user.get(user_id, {}).items():
        add(addin_id, _grant("user", a))
    for g, path in paths.items():
        bucket: dict[str, Assignment] = state.assign_group.get(g, {})
        for addin_id, a in bucket.items():
            add(addin_id, _grant("group", a, g, path))
    return out


def _strongest(grants: Iterable[Grant]) -> Mode:
    return max((g.mode for g in grants), key=lambda m: m.strength)


def _entitle(
    entry: CatalogEntry, grants: list[Grant], hosts: Iterable[Host], served: Served
) -> Entitlement | None:
    if not grants or not entry.enabled:
        return None
    wanted = set(hosts)
    here = tuple(h for h in served.hosts if h in wanted)
    if not here:
        return None
    return Entitlement(
        addin_id=entry.addin_id,
        name=entry.name,
        mode=_strongest(grants),
        version=served.version,
        sha256=served.sha256,
        hosts=here,
        permissions=served.permissions,
        grants=tuple(grants),
        catalog_hosts=served.hosts,
        ring=served.ring,
        rollback=served.rollback,
    )


def resolve(
    state: ReceivedState, user_id: str, hosts: Iterable[Host] = tuple(Host)
) -> dict[str, Entitlement]:
    """The add-ins `user_id` is entitled to on a computer with `hosts` installed."""
    hosts = tuple(hosts)
    paths = group_paths(state, user_id, nested=state.nested_groups)
    out: dict[str, Entitlement] = {}
    for addin_id, grants in _all_grants(state, user_id, paths).items():
        entry = state.catalog.get(addin_id)
        if entry is None or _exclusion(grants, user_id, paths) is not None:
            continue
        ent = _entitle(entry, grants, hosts, served(entry, user_id, paths))
        if ent is not None:
            out[addin_id] = ent
    return out


def explain(
    state: ReceivedState, user_id: str, addin_id: str, hosts: Iterable[Host] = tuple(Host)
) -> Explanation:
    """What the resolver concludes about `addin_id`, including the reasons it does not count."""
    hosts = tuple(hosts)
    all_paths = group_paths(state, user_id, nested=True)
    grants = _grants_for(state, user_id, addin_id, all_paths)
    nested = state.nested_groups
    counting = [g for g in grants if nested or not g.nested]
    blocked = [g for g in grants if not nested and g.nested]
    entry = state.catalog.get(addin_id)
    removed = entry is None and state.is_tombstoned(Topic.catalog(state.tenant, addin_id))
    groups = [g for g, p in all_paths.items() if nested or len(p) == 1]
    excluded = _exclusion(counting, user_id, groups)
    mine = served(entry, user_id, groups) if entry else None
    here = tuple(h for h in mine.hosts if h in hosts) if mine else ()
    ent = _entitle(entry, counting, hosts, mine) if entry and mine and not excluded else None
    return Explanation(
        addin_id=addin_id,
        entry=entry,
        removed_from_catalog=removed,
        nested_groups=nested,
        grants=tuple(counting),
        blocked=tuple(blocked),
        hosts_here=here,
        entitlement=ent,
        excluded=excluded,
        served=mine,
    )


def reach(state: ReceivedState, user_id: str) -> dict[str, list[Grant]]:
    """{addin_id: the grants that count for `user_id` under the current policy}, whatever
    the catalog says (an assignment reaches the user even while the add-in is turned off);
    an add-in the user is excluded from has none."""
    paths = group_paths(state, user_id, nested=state.nested_groups)
    return {
        a: grants
        for a, grants in _all_grants(state, user_id, paths).items()
        if _exclusion(grants, user_id, paths) is None
    }


def exclusions(state: ReceivedState, user_id: str) -> dict[str, Exclusion]:
    """{addin_id: the exclusion that takes it away from `user_id`}."""
    paths = group_paths(state, user_id, nested=state.nested_groups)
    out: dict[str, Exclusion] = {}
    for a, grants in _all_grants(state, user_id, paths).items():
        x = _exclusion(grants, user_id, paths)
        if x is not None:
            out[a] = x
    return out


def ring_entry(entry: CatalogEntry, sha256: str) -> CatalogEntry:
    """`entry` as the download of a ring's version needs it: that version's number, hash,
    URL, hosts and permissions (the entry itself names the version outside the rings)."""
    for ring in entry.rings or ():
        if ring.manifest_sha256 == sha256:
            return entry.model_copy(
                update={
                    "version": ring.version,
                    "manifest_sha256": ring.manifest_sha256,
                    "manifest_url": ring.manifest_url,
                    "hosts": ring.hosts,
                    "permissions": ring.permissions,
                    "rings": None,
                }
            )
    return entry

"""Who is entitled to an add-in, and why: the server's view, for `explain`, `status` and
the anti-entropy digest.

Pure functions over plain data (no database, no clock): an assignment reaches a user
directly, through Everyone, or through a group the user is in; through a nested group only
when the tenant policy honours nesting. Nesting cycles are walked at most once per group,
so they never hang.

This evaluator is deliberately independent of the agent's resolver (`agent/resolver.py`):
the anti-entropy digest compares the two, so they share no code and no names (an
`AssignmentPath` here, a grant there). Keep them apart.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from addin_core.protocol import Mode


@dataclass(frozen=True)
class AssignmentRow:
    target: str  # "everyone" | "user" | "group"
    target_id: str  # "" for everyone
    mode: Mode
    except_groups: frozenset[str] = field(default=frozenset())
    except_users: frozenset[str] = field(default=frozenset())

    def target_text(self) -> str:
        if self.target == "everyone":
            return "Everyone"
        return f"{self.target} {self.target_id}"


@dataclass(frozen=True)
class AssignmentPath:
    """One assignment that reaches (or would reach) a user, and the group path it takes."""

    assignment: AssignmentRow
    group_path: tuple[str, ...] = ()
    """For a group assignment: the user's direct group first, the assigned group last."""
    counts: bool = True
    """False when the path needs nesting and the policy has nesting off."""

    @property
    def nested(self) -> bool:
        return len(self.group_path) > 1

    def describe(self, user_id: str) -> str:
        a = self.assignment
        if a.target == "everyone":
            return f"assignment to Everyone (mode {a.mode})"
        if a.target == "user":
            return f"assignment to user {user_id} directly (mode {a.mode})"
        if not self.nested:
            return (
                f"assignment to group {a.target_id} (mode {a.mode}): {user_id} is a direct member"
            )
        chain = " -> ".join(self.group_path)
        text = f"assignment to group {a.target_id} (mode {a.mode}) through nesting {user_id} in {chain}"
        return text if self.counts else text + "; ignored because nested_groups is off"


def group_paths(
    direct_groups: Iterable[str], parents: Mapping[str, Sequence[str]]
) -> dict[str, tuple[str, ...]]:
    """Shortest path from one of the user's direct groups to every group it reaches by nesting.

    Breadth-first, each group visited once: cycles terminate.
    """
    paths: dict[str, tuple[str, ...]] = {}
    queue: deque[str] = deque()
    for g in sorted(direct_groups):
        if g not in paths:
            paths[g] = (g,)
            queue.append(g)
    while queue:
        g = queue.popleft()
        for p in parents.get(g, ()):
            if p not in paths:
                paths[p] = (*paths[g], p)
                queue.append(p)
    return paths


def paths_for_user(
    user_id: str,
    direct_groups: Iterable[str],
    parents: Mapping[str, Sequence[str]],
    assignments: Iterable[AssignmentRow],
    nested_groups: bool,
) -> list[AssignmentPath]:
    """Every assignment of one add-in that reaches `user_id`, strongest first."""
    paths = group_paths(direct_groups, parents)
    found: list[AssignmentPath] = []
    for a in assignments:
        if a.target == "everyone" or (a.target == "user" and a.target_id == user_id):
            found.append(AssignmentPath(a))
        elif a.target == "group" and a.target_id in paths:
            path = paths[a.target_id]
            found.append(AssignmentPath(a, path, counts=nested_groups or len(path) == 1))
    found.sort(key=lambda g: (not g.counts, -g.assignment.mode.strength))
    return found


@dataclass(frozen=True)
class Exclusion:
    """An assignment that reaches the user excludes them: it wins over every assignment."""

    assignment: AssignmentRow
    by: str
    """``"group contractors"`` or ``"user bob"``."""

    def describe(self) -> str:
        return f"excluded by {self.by} from the assignment to {self.assignment.target_text()}"


def exclusion(
    user_id: str,
    paths: Iterable[AssignmentPath],
    direct_groups: Iterable[str],
    parents: Mapping[str, Sequence[str]],
    nested_groups: bool,
) -> Exclusion | None:
    """The first exclusion that applies to `user_id` among the assignments that reach them
    (groups counted under the nesting policy, as for assignments), or None."""
    groups = set(group_paths(direct_groups, parents)) if nested_groups else set(direct_groups)
    for p in paths:
        a = p.assignment
        if not p.counts:
            continue
        if user_id in a.except_users:
            return Exclusion(a, f"user {user_id}")
        hit = sorted(a.except_groups & groups)
        if hit:
            return Exclusion(a, f"group {hit[0]}")
    return None


def effective_mode(paths: Iterable[AssignmentPath]) -> Mode | None:
    """The strongest mode among the assignment paths that count, or None when none does."""
    modes = [g.assignment.mode for g in paths if g.counts]
    return max(modes, key=lambda m: m.strength) if modes else None


def group_closure_members(
    group_id: str,
    members: Mapping[str, Iterable[str]],
    children: Mapping[str, Sequence[str]],
    nested_groups: bool,
) -> set[str]:
    """Users reached by an assignment to `group_id` (its nested sub-groups too when allowed)."""
    users = set(members.get(group_id, ()))
    if not nested_groups:
        return users
    seen = {group_id}
    queue = deque([group_id])
    while queue:
        g = queue.popleft()
        for c in children.get(g, ()):
            if c not in seen:
                seen.add(c)
                users.update(members.get(c, ()))
                queue.append(c)
    return users


def entitled_users(
    assignments: Iterable[AssignmentRow],
    all_users: Iterable[str],
    members: Mapping[str, Iterable[str]],
    children: Mapping[str, Sequence[str]],
    nested_groups: bool,
) -> dict[str, Mode]:
    """user id -> effective mode for one add-in, computed per assignment (never per user)."""
    result: dict[str, Mode] = {}
    everyone: list[str] | None = None

    def grant(users: Iterable[str], mode: Mode) -> None:
        if not result:
            # The first (often the only) assignment: at C speed (10,000 users of Everyone).
            result.update(dict.fromkeys(users, mode))
            return
        for u in users:
            old = result.get(u)
            if old is None or mode.strength > old.strength:
                result[u] = mode

    excluded: set[str] = set()
    for a in assignments:
        if a.target == "everyone":
            if everyone is None:
                everyone = list(all_users)
            reached: Iterable[str] = everyone
        elif a.target == "user":
            reached = [a.target_id]
        else:
            reached = group_closure_members(a.target_id, members, children, nested_groups)
        grant(reached, a.mode)
        if a.except_groups or a.except_users:
            out = set(a.except_users)
            for g in a.except_groups:
                out |= group_closure_members(g, members, children, nested_groups)
            excluded |= out & set(reached)
    for u in excluded:
        result.pop(u, None)
    return result

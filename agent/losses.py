"""Why an assignment stopped reaching the user: decided when it happens, because afterwards
the cache no longer holds what carried it (the topics of a group the user left are
forgotten with the unsubscription). Pure.

The daemon computes the grants that count before a message that can take one away (a
membership, a group's parents, the policy, an assignment's tombstone) and after it; an add-in
that had grants and has none left gets ONE `Loss`, which `addin-agent why` turns into a
sentence ("you left group sales at 10:02; it carried this add-in").
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal

from addin_core.protocol import Topic, TopicKind
from agent.resolver import Grant, exclusions, reach
from agent.state import ReceivedState

LossCause = Literal["left_group", "unassigned", "nesting_chain", "nesting_off", "excluded"]

_REACH_KINDS = (TopicKind.MEMBER, TopicKind.GROUP_PARENTS, TopicKind.POLICY)
_ASSIGN_KINDS = (TopicKind.ASSIGN_EVERYONE, TopicKind.ASSIGN_GROUP, TopicKind.ASSIGN_USER)


@dataclass(frozen=True, slots=True)
class Loss:
    """The last assignment of an add-in that reached the user, and what took it away."""

    cause: LossCause
    grant: Grant
    link: tuple[str, str] | None = None
    """For ``nesting_chain``: (child, parent), the nesting the admin removed; for
    ``excluded``: ("group", G) or ("user", U), what the exclusion names."""


def may_take_reach(topic: Topic, payload: object) -> bool:
    """Whether accepting `payload` on `topic` can take an assignment away from the user
    (an assignment's new version may carry an exclusion)."""
    return topic.kind in _REACH_KINDS or topic.kind in _ASSIGN_KINDS


def _cause(g: Grant, state: ReceivedState, user_id: str) -> Loss:
    if g.target != "group":
        return Loss("unassigned", g)
    path = g.path
    if path[0] not in state.membership.get(user_id, ()):
        return Loss("left_group", g)
    for child, parent in itertools.pairwise(path):
        if parent not in state.parents.get(child, ()):
            return Loss("nesting_chain", g, (child, parent))
    if g.nested and not state.nested_groups:
        return Loss("nesting_off", g)
    return Loss("unassigned", g)


def lost_reach(
    before: dict[str, list[Grant]], state: ReceivedState, user_id: str
) -> dict[str, Loss]:
    """{addin_id: Loss} for every add-in that had grants in `before` and has none in
    `state` (the state after the message)."""
    after = reach(state, user_id)
    out: dict[str, Loss] = {}
    excluded = exclusions(state, user_id) if before.keys() - after.keys() else {}
    for addin_id, grants in before.items():
        x = excluded.get(addin_id)
        if grants and x is not None:
            out[addin_id] = Loss("excluded", x.grant, (x.kind, x.ident))
        elif grants and not after.get(addin_id):
            # Direct grants first: "you left sales" says more than a nesting path through it.
            g = min(grants, key=lambda x: len(x.path))
            out[addin_id] = _cause(g, state, user_id)
    return out

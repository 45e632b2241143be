"""Which topics this agent subscribes to, as a function of its state. Pure.

The rule itself (which topics belong to a user) is `addin_core.user_topics`, shared with
the server's /state answer; this module feeds it the ancestry the agent holds and computes
the subscribe/unsubscribe difference.
"""

from __future__ import annotations

from dataclasses import dataclass

from addin_core.user_topics import user_filters
from agent.resolver import group_paths
from agent.state import ReceivedState


def ancestry(state: ReceivedState, user_id: str) -> set[str]:
    """Every group the user is in, directly or through nesting (policy ignored)."""
    return set(group_paths(state, user_id, nested=True))


def desired_filters(state: ReceivedState, user_id: str) -> set[str]:
    return user_filters(state.tenant, user_id, ancestry(state, user_id))


@dataclass(frozen=True, slots=True)
class SubscriptionDiff:
    subscribe: tuple[str, ...]
    unsubscribe: tuple[str, ...]

    def __bool__(self) -> bool:
        return bool(self.subscribe or self.unsubscribe)


def reconcile(current: set[str], desired: set[str]) -> SubscriptionDiff:
    """What to subscribe and unsubscribe to go from `current` to `desired` (sorted, stable)."""
    return SubscriptionDiff(tuple(sorted(desired - current)), tuple(sorted(current - desired)))

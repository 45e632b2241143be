"""Which topics this agent subscribes to, as a function of its state (DESIGN §3.1). Pure.

Own ``member/`` and ``assign/user/`` topics, ``assign/everyone/+``, ``policy``,
``catalog/+``, and for every group in the user's ancestry ``group/{g}/parents`` and
``assign/group/{g}/+`` — whatever the nesting policy, so `why` can explain a nested-only
assignment and a policy flip needs no resubscription.
"""

from __future__ import annotations

from dataclasses import dataclass

from addin_core.protocol import Filters, Topic
from agent.resolver import group_paths
from agent.state import ReceivedState


def base_filters(tenant: str, user_id: str) -> set[str]:
    return {
        str(Topic.member(tenant, user_id)),
        Filters.assign_user(tenant, user_id),
        Filters.assign_everyone(tenant),
        str(Topic.policy(tenant)),
        Filters.catalog(tenant),
    }


def group_filters(tenant: str, group_id: str) -> set[str]:
    return {str(Topic.group_parents(tenant, group_id)), Filters.assign_group(tenant, group_id)}


def ancestry(state: ReceivedState, user_id: str) -> set[str]:
    """Every group the user is in, directly or through nesting (policy ignored)."""
    return set(group_paths(state, user_id, nested=True))


def desired_filters(state: ReceivedState, user_id: str) -> set[str]:
    out = base_filters(state.tenant, user_id)
    for g in ancestry(state, user_id):
        out |= group_filters(state.tenant, g)
    return out


@dataclass(frozen=True, slots=True)
class SubscriptionDiff:
    subscribe: tuple[str, ...]
    unsubscribe: tuple[str, ...]

    def __bool__(self) -> bool:
        return bool(self.subscribe or self.unsubscribe)


def reconcile(current: set[str], desired: set[str]) -> SubscriptionDiff:
    """What to subscribe and unsubscribe to go from `current` to `desired` (sorted, stable)."""
    return SubscriptionDiff(tuple(sorted(desired - current)), tuple(sorted(current - desired)))

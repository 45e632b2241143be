"""Which topics belong to one user: the single rule behind the agent's subscriptions, the
topics the agent's anti-entropy accepts from a /state answer, and the retained rows the
server's /state returns. Pure.

A user's agent holds: its own ``member/`` and ``assign/user/`` topics, ``assign/everyone/+``,
``policy``, ``catalog/+``, and for every group in the user's ancestry (nesting followed
whatever the policy, so `why` can explain a nested-only assignment and a policy flip needs
no resubscription) ``group/{g}/parents`` and ``assign/group/{g}/+``.
"""

from __future__ import annotations

from collections.abc import Iterable

from addin_core.protocol import Filters, Topic


def user_filters(tenant: str, user_id: str, groups: Iterable[str]) -> set[str]:
    """The subscription filters of `user_id`'s agent, given every group in its ancestry."""
    out = {
        str(Topic.member(tenant, user_id)),
        Filters.assign_user(tenant, user_id),
        Filters.assign_everyone(tenant),
        str(Topic.policy(tenant)),
        Filters.catalog(tenant),
    }
    for g in groups:
        out |= {str(Topic.group_parents(tenant, g)), Filters.assign_group(tenant, g)}
    return out


def split_filters(filters: Iterable[str]) -> tuple[list[str], list[str]]:
    """(exact topics, prefixes of the one-level ``+`` filters), sorted: the shape a query on
    a table of topics needs."""
    exact = sorted(f for f in filters if not f.endswith("+"))
    prefixes = sorted(f.removesuffix("+") for f in filters if f.endswith("+"))
    return exact, prefixes


def matches(filter_: str, topic: str) -> bool:
    """Whether `topic` matches a filter made by `user_filters` (``+`` only, last level)."""
    if not filter_.endswith("+"):
        return topic == filter_
    prefix = filter_[:-1]
    return topic.startswith(prefix) and "/" not in topic[len(prefix) :]


def belongs_to_user(topic: str, tenant: str, user_id: str, groups: Iterable[str]) -> bool:
    """Whether `topic` is one `user_id`'s agent subscribes to."""
    return any(matches(f, topic) for f in user_filters(tenant, user_id, groups))

"""addin_core/user_topics.py: the one rule for which topics belong to a user, which the
agent subscribes by and the server's /state answers by."""

from __future__ import annotations

import pytest

from addin_core.protocol import Filters, Topic
from addin_core.user_topics import belongs_to_user, split_filters, user_filters
from addin_core.validation import validation_problems

T = "contoso"


@pytest.mark.parametrize(
    ("topic", "mine"),
    [
        (Topic.catalog(T, "a1"), True),
        (Topic.assign_everyone(T, "a1"), True),
        (Topic.policy(T), True),
        (Topic.member(T, "ann"), True),
        (Topic.assign_user(T, "ann", "a1"), True),
        (Topic.group_parents(T, "sales"), True),
        (Topic.assign_group(T, "sales", "a1"), True),
        (Topic.member(T, "bob"), False),
        (Topic.assign_user(T, "bob", "a1"), False),
        (Topic.group_parents(T, "hr"), False),
        (Topic.assign_group(T, "hr", "a1"), False),
        (Topic.catalog("fabrikam", "a1"), False),
        (Topic.report(T, "pc-1"), False),
    ],
)
def test_a_user_owns_the_tenant_wide_topics_its_own_and_its_groups(
    topic: Topic, mine: bool
) -> None:
    assert belongs_to_user(str(topic), T, "ann", {"sales"}) is mine


def test_a_plus_filter_matches_one_level_only() -> None:
    assert not belongs_to_user(f"{Filters.catalog(T)[:-1]}a1/extra", T, "ann", set())


def test_split_filters_gives_exact_topics_and_prefixes() -> None:
    exact, prefixes = split_filters(user_filters(T, "ann", ["sales"]))
    assert str(Topic.policy(T)) in exact and str(Topic.group_parents(T, "sales")) in exact
    assert Filters.assign_group(T, "sales")[:-1] in prefixes
    assert not any(p.endswith("+") for p in prefixes)


def test_validation_problems_names_each_location_or_the_whole() -> None:
    errors = [{"loc": ("body", "users", 0, "id"), "msg": "bad id"}, {"loc": (), "msg": "empty"}]
    assert validation_problems(errors, "document", skip={"body"}) == (
        "users.0.id: bad id; document: empty"
    )

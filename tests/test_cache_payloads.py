"""The read-only commands rebuild cached payloads without pydantic (`agent.cache_payloads`):
the rebuilt values must have every field of the protocol's models, with the same values and
types, and the state rebuilt both ways must explain every add-in identically."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import pytest

from addin_core import protocol as p
from addin_core.topics import Host, Mode, Source, Topic, TopicKind
from agent import cache_payloads as c
from agent.cache_rows import received_state
from agent.resolver import explain

T = "contoso"
SHA = hashlib.sha256(b"x").hexdigest()

PAIRS: list[tuple[type[Any], type[Any]]] = [
    (p.CatalogEntry, c.CachedCatalogEntry),
    (p.WithheldVersion, c.CachedWithheld),
    (p.RingVersion, c.CachedRingVersion),
    (p.Assignment, c.CachedAssignment),
    (p.Membership, c.CachedMembership),
    (p.GroupParents, c.CachedGroupParents),
    (p.Policy, c.CachedPolicy),
    (p.Tombstone, c.CachedTombstone),
]


@pytest.mark.parametrize(("model", "cached"), PAIRS, ids=lambda t: t.__name__)
def test_every_model_field_is_rebuilt(model: type[Any], cached: type[Any]) -> None:
    assert set(model.model_fields) == {f.name for f in dataclasses.fields(cached)}


def test_every_state_kind_has_a_rebuilt_form() -> None:
    state_kinds = {k for k in p.MODEL_BY_KIND if k != TopicKind.REPORT}
    assert state_kinds <= set(c._BUILDERS)


def _entry(aid: str, **kw: Any) -> p.CatalogEntry:
    fields: dict[str, Any] = dict(
        revision=3,
        committed_at=12.5,
        addin_id=aid,
        name=f"Add-in {aid}",
        source=Source.LOB,
        version="1.2.0.0",
        manifest_sha256=SHA,
        manifest_url=f"/v1/manifests/{SHA}",
        hosts=[Host.WORD, Host.EXCEL],
        permissions="ReadDocument",
        enabled=True,
    )
    fields.update(kw)
    return p.CatalogEntry(**fields)


MESSAGES: list[tuple[Topic, Any]] = [
    (Topic.catalog(T, "a1"), _entry("a1")),
    (
        Topic.catalog(T, "a2"),
        _entry(
            "a2",
            withheld=p.WithheldVersion(
                version="2.0.0.0", permissions="ReadWriteDocument", hosts=[Host.WORD]
            ),
            store_asset_id="WA104379501",
            source=Source.STORE,
        ),
    ),
    (
        Topic.catalog(T, "a4"),
        _entry(
            "a4",
            version="1.0.0.0",
            rollback=4,
            rings=[
                p.RingVersion(
                    ring="pilot",
                    targets=["group:sales", "user:ann"],
                    version="1.1.0.0",
                    manifest_sha256=SHA,
                    manifest_url=f"/v1/manifests/{SHA}",
                    hosts=[Host.WORD],
                    permissions="ReadDocument",
                )
            ],
        ),
    ),
    (Topic.catalog(T, "a3"), _entry("a3", enabled=False, revision=4)),
    (Topic.catalog(T, "gone"), p.Tombstone(revision=5, deleted=True)),
    (Topic.assign_everyone(T, "a1"), p.Assignment(revision=6, mode=Mode.FIXED)),
    (Topic.assign_group(T, "sales", "a2"), p.Assignment(revision=7, mode=Mode.OPTIONAL)),
    (Topic.assign_group(T, "emea", "a3"), p.Assignment(revision=8, mode=Mode.AVAILABLE)),
    (Topic.assign_user(T, "ann", "a3"), p.Assignment(revision=9, mode=Mode.FIXED)),
    (
        Topic.assign_everyone(T, "a4"),
        p.Assignment(revision=9, mode=Mode.FIXED, except_groups=["emea"], except_users=["bob"]),
    ),
    (Topic.member(T, "ann"), p.Membership(revision=10, groups=["sales"])),
    (Topic.group_parents(T, "sales"), p.GroupParents(revision=11, parents=["emea"])),
    (Topic.policy(T), p.Policy(revision=12, nested_groups=True)),
]


@pytest.mark.parametrize(("topic", "model"), MESSAGES, ids=lambda v: str(v)[:40])
def test_rebuilt_values_equal_the_validated_ones(topic: Topic, model: Any) -> None:
    raw = model.to_bytes()
    validated = p.decode(topic, raw)
    rebuilt = c.from_cache(topic, raw.decode())
    assert type(rebuilt).__module__ == "agent.cache_payloads"
    for name in type(validated).model_fields:
        want, got = getattr(validated, name), getattr(rebuilt, name)
        if isinstance(want, p.WithheldVersion):
            assert got == c.CachedWithheld(**dict(want))
            assert all(type(h) is Host for h in got.hosts)
        elif name == "rings" and want is not None:
            assert got == [c.CachedRingVersion(**dict(r)) for r in want]
            assert all(type(h) is Host for r in got for h in r.hosts)
        else:
            assert got == want and type(got) is type(want), name


def test_the_state_rebuilt_both_ways_explains_every_addin_alike() -> None:
    rows = [{"topic": str(t), "payload": m.to_bytes().decode()} for t, m in MESSAGES]
    validated = received_state(rows, T)
    rebuilt = received_state(rows, T, revalidate=False)
    assert rebuilt.revision == validated.revision == 12
    assert rebuilt.membership == validated.membership
    assert rebuilt.parents == validated.parents
    assert rebuilt.nested_groups and validated.nested_groups
    assert set(rebuilt.catalog) == set(validated.catalog) == {"a1", "a2", "a3", "a4"}
    assert rebuilt.is_tombstoned(Topic.catalog(T, "gone"))
    for aid in ("a1", "a2", "a3", "a4", "gone"):
        got, want = explain(rebuilt, "ann", aid), explain(validated, "ann", aid)
        assert dataclasses.replace(got, entry=None) == dataclasses.replace(want, entry=None)
        assert (got.entry is None) == (want.entry is None), aid
        if want.entry is not None:
            assert got.entry.version == want.entry.version and got.entry.hosts == want.entry.hosts


@pytest.mark.parametrize(
    "payload",
    [
        "not json",
        "[1, 2]",
        '{"revision": 3}',  # a catalog entry without its fields
        '{"revision": 3, "addin_id": "a1", "surprise": 1}',
        '{"revision": 3, "mode": "sometimes"}',
    ],
)
def test_a_hand_edited_row_is_skipped_not_fatal(payload: str) -> None:
    topic = Topic.catalog(T, "a1") if "mode" not in payload else Topic.assign_everyone(T, "a1")
    with pytest.raises(c.UnreadableRow):
        c.from_cache(topic, payload)
    good = (Topic.member(T, "ann"), p.Membership(revision=2, groups=["g"]))
    rows = [
        {"topic": str(topic), "payload": payload},
        {"topic": str(good[0]), "payload": good[1].to_bytes().decode()},
    ]
    state = received_state(rows, T, quiet=True, revalidate=False)
    assert state.membership == {"ann": ["g"]} and not state.catalog

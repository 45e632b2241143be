"""Fuzzing the wire protocol: `Topic.parse`, `decode`, `decode_message` and
every payload model, with random and structure-aware input. Only `ProtocolError` subclasses
escape `Topic.parse` / `decode` / `decode_message`; a model used directly raises only
pydantic's `ValidationError`; whatever is accepted round-trips and cannot carry an unsafe id.
"""

from __future__ import annotations

import json
from typing import Any

from fuzzing import fuzz_settings, run
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from addin_core.protocol import (
    MAX_PAYLOAD_BYTES,
    MODEL_BY_KIND,
    PROTOCOL_PREFIX,
    AgentReport,
    AnyPayload,
    CatalogEntry,
    InvalidPayload,
    InvalidTopic,
    ProtocolError,
    Tombstone,
    Topic,
    TopicKind,
    check_id,
    decode,
    decode_message,
)

TENANT = "contoso"
SHA = "ab" * 32
TOPICS = [
    Topic.catalog(TENANT, "a1"),
    Topic.assign_everyone(TENANT, "a1"),
    Topic.assign_group(TENANT, "sales", "a1"),
    Topic.assign_user(TENANT, "ann", "a1"),
    Topic.member(TENANT, "ann"),
    Topic.group_parents(TENANT, "sales"),
    Topic.policy(TENANT),
    Topic.report(TENANT, "ann-pc"),
]
VALID: dict[TopicKind, dict[str, Any]] = {
    TopicKind.CATALOG: {
        "addin_id": "a1", "name": "Notes", "source": "lob", "version": "1.0.0.0",
        "manifest_sha256": SHA, "manifest_url": f"/v1/manifests/{SHA}", "hosts": ["Word"],
        "permissions": "ReadDocument", "enabled": True, "revision": 5, "committed_at": 1.5,
    },
    TopicKind.ASSIGN_EVERYONE: {"mode": "fixed", "revision": 5},
    TopicKind.ASSIGN_GROUP: {"mode": "optional", "revision": 5},
    TopicKind.ASSIGN_USER: {"mode": "available", "revision": 5},
    TopicKind.MEMBER: {"groups": ["sales", "all-staff"], "revision": 5},
    TopicKind.GROUP_PARENTS: {"parents": ["all-staff"], "revision": 5},
    TopicKind.POLICY: {"nested_groups": True, "revision": 5},
    TopicKind.REPORT: {
        "client_id": "ann-pc", "user_id": "ann", "revision": 5, "reported_at": 1.0,
        "applied": [{"addin_id": "a1", "version": "1.0", "host": "Word"}], "errors": [],
    },
}  # fmt: skip

UNSAFE = ["", "+", "#", "/", "\x00", "a/b", "a+b", "a#b", "a\x00b", " a", "a b", "..", "x" * 129]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=20,
)


def assert_safe(value: AnyPayload, topic: Topic) -> None:
    """Whatever decode accepts round-trips and holds only safe ids."""
    assert isinstance(value, (MODEL_BY_KIND[topic.kind], Tombstone))
    again = decode(topic, value.to_bytes())
    assert again == value
    data = value.model_dump()
    for key in ("addin_id", "client_id", "user_id"):
        if isinstance(data.get(key), str):
            check_id(data[key])
    for key in ("groups", "parents"):
        for g in data.get(key) or []:
            check_id(g)


def decode_or_refuse(topic: Topic, payload: bytes | str) -> AnyPayload | None:
    try:
        value = decode(topic, payload)
    except InvalidPayload as e:
        assert str(e).startswith(str(topic) + ": "), str(e)
        return None
    assert_safe(value, topic)
    return value


def test_fuzz_topic_parse_random_text() -> None:
    @fuzz_settings()
    @given(st.text(max_size=200))
    def target(text: str) -> None:
        try:
            t = Topic.parse(text)
        except InvalidTopic:
            return
        assert str(t) == text

    run(target)


segment = st.one_of(
    st.sampled_from(["catalog", "assign", "everyone", "group", "user", "member", "parents",
                     "policy", "report", "contoso", "a1", "ann", "", "+", "#", "\x00", ".."]),
    st.text(max_size=12),
)  # fmt: skip


def test_fuzz_topic_parse_structured() -> None:
    @fuzz_settings()
    @given(st.lists(segment, max_size=6), st.sampled_from([PROTOCOL_PREFIX, "addins/v2", "x"]))
    def target(parts: list[str], prefix: str) -> None:
        text = "/".join([prefix, *parts])
        try:
            t = Topic.parse(text)
        except InvalidTopic:
            return
        assert str(t) == text
        for part in parts:
            for bad in ("+", "#", "\x00"):
                assert bad not in part
        assert Topic.parse(str(t)) == t

    run(target)


def test_fuzz_decode_random_bytes() -> None:
    @fuzz_settings()
    @given(st.sampled_from(TOPICS), st.binary(max_size=512))
    def target(topic: Topic, payload: bytes) -> None:
        decode_or_refuse(topic, payload)

    run(target)


def test_fuzz_decode_random_json() -> None:
    @fuzz_settings()
    @given(st.sampled_from(TOPICS), json_values)
    def target(topic: Topic, value: Any) -> None:
        decode_or_refuse(topic, json.dumps(value))

    run(target)


@st.composite
def mutated_payload(draw: st.DrawFn) -> tuple[Topic, str]:
    """A valid payload for a random topic with a few structure-aware mutations."""
    topic = draw(st.sampled_from(TOPICS))
    body = json.loads(json.dumps(VALID[topic.kind]))
    for _ in range(draw(st.integers(0, 4))):
        key = draw(st.sampled_from(sorted(body) or ["revision"]))
        op = draw(
            st.sampled_from(["drop", "add", "retype", "unsafe", "huge", "tombstone", "revision"])
        )
        if op == "drop":
            body.pop(key, None)
        elif op == "add":
            body[draw(st.text(max_size=10))] = draw(json_values)
        elif op == "retype":
            body[key] = draw(json_values)
        elif op == "unsafe":
            bad = draw(st.sampled_from(UNSAFE))
            body[key] = [bad] if isinstance(body.get(key), list) else bad
        elif op == "huge":
            body[key] = "x" * draw(st.sampled_from([250, 251, 500, MAX_PAYLOAD_BYTES]))
        elif op == "tombstone":
            body = {"deleted": draw(st.sampled_from([True, False, 1, "true"])), "revision": 7}
        elif op == "revision":
            body["revision"] = draw(st.sampled_from([0, -1, 1, 2**53, 2**53 + 1, 1.5, "5", True]))
    return topic, json.dumps(body)


def test_fuzz_decode_mutated_payloads() -> None:
    @fuzz_settings()
    @given(mutated_payload())
    def target(case: tuple[Topic, str]) -> None:
        topic, payload = case
        decode_or_refuse(topic, payload)

    run(target)


def test_fuzz_decode_message() -> None:
    @fuzz_settings()
    @given(
        st.one_of(st.sampled_from([str(t) for t in TOPICS]), st.text(max_size=80)),
        st.one_of(st.binary(max_size=256), mutated_payload().map(lambda c: c[1].encode())),
    )
    def target(topic: str, payload: bytes) -> None:
        try:
            t, value = decode_message(topic, payload)
        except ProtocolError:
            return
        assert str(t) == topic
        assert_safe(value, t)

    run(target)


def test_fuzz_models_directly() -> None:
    @fuzz_settings()
    @given(
        st.sampled_from(
            sorted(set(MODEL_BY_KIND.values()) | {Tombstone}, key=lambda m: m.__name__)
        ),
        st.one_of(json_values, mutated_payload().map(lambda c: json.loads(c[1]))),
    )
    def target(model: Any, value: Any) -> None:
        try:
            parsed = model.model_validate_json(json.dumps(value))
        except ValidationError:
            return
        assert model.model_validate_json(parsed.to_bytes()) == parsed
        if isinstance(parsed, (CatalogEntry, AgentReport)):
            for key in ("addin_id", "client_id", "user_id"):
                if hasattr(parsed, key):
                    check_id(getattr(parsed, key))

    run(target)


def test_every_valid_example_is_accepted() -> None:
    # The structure-aware strategy starts from these; they must be valid or it fuzzes nothing.
    for t in TOPICS:
        assert decode_or_refuse(t, json.dumps(VALID[t.kind])) is not None

"""The wire protocol: topics and payloads round-trip, and malformed input is refused clearly."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from addin_core import protocol
from addin_core.protocol import (
    MAX_PAYLOAD_BYTES,
    AgentReport,
    AppliedAddin,
    Assignment,
    CatalogEntry,
    Filters,
    GroupParents,
    Host,
    InvalidPayload,
    InvalidTopic,
    Membership,
    Mode,
    Policy,
    Source,
    Tombstone,
    Topic,
    TopicKind,
    WithheldVersion,
    decode,
    decode_message,
)

ADDIN = "2b88e7e5-1f45-4d5b-9b0e-6f0e8d3c1a11"
SHA = "ab" * 32

TOPICS = [
    (Topic.catalog("contoso", ADDIN), f"addins/v1/contoso/catalog/{ADDIN}"),
    (Topic.assign_everyone("contoso", ADDIN), f"addins/v1/contoso/assign/everyone/{ADDIN}"),
    (
        Topic.assign_group("contoso", "sales", ADDIN),
        f"addins/v1/contoso/assign/group/sales/{ADDIN}",
    ),
    (
        Topic.assign_user("contoso", "ann@contoso.com", ADDIN),
        f"addins/v1/contoso/assign/user/ann@contoso.com/{ADDIN}",
    ),
    (Topic.member("contoso", "ann"), "addins/v1/contoso/member/ann"),
    (Topic.group_parents("contoso", "sales"), "addins/v1/contoso/group/sales/parents"),
    (Topic.policy("contoso"), "addins/v1/contoso/policy"),
    (Topic.report("contoso", "ws-001"), "addins/v1/contoso/report/ws-001"),
]


@pytest.mark.parametrize(("topic", "wire"), TOPICS)
def test_topic_round_trip(topic: Topic, wire: str) -> None:
    assert str(topic) == wire
    assert Topic.parse(wire) == topic
    assert topic.retained == (topic.kind is not TopicKind.REPORT)


@pytest.mark.parametrize(
    "bad_id", ["a+b", "a#", "a/b", "a\x00b", "", " a", "-a", "x" * 129, "ü", "a b"]
)
def test_unsafe_ids_cannot_make_a_topic(bad_id: str) -> None:
    with pytest.raises(InvalidTopic, match="invalid"):
        Topic.member("contoso", bad_id)
    with pytest.raises(InvalidTopic):
        Topic.catalog(bad_id, ADDIN)


@pytest.mark.parametrize(
    "wire",
    [
        "addins/v2/contoso/policy",
        "addins/v1/contoso",
        "addins/v1/contoso/catalog",
        "addins/v1/contoso/catalog/a/b",
        "addins/v1/contoso/assign/nobody/a",
        "addins/v1/contoso/group/g/children",
        "addins/v1/+/policy",
        "addins/v1/contoso/member/#",
        "addins/v1/contoso/member/a\x00",
        "other/v1/contoso/policy",
    ],
)
def test_parse_rejects_unknown_topics(wire: str) -> None:
    with pytest.raises(InvalidTopic):
        Topic.parse(wire)


def test_topic_demands_exactly_its_ids() -> None:
    with pytest.raises(InvalidTopic, match="needs addin_id"):
        Topic("contoso", TopicKind.CATALOG)
    with pytest.raises(InvalidTopic, match="takes no user_id"):
        Topic("contoso", TopicKind.POLICY, user_id="ann")


def test_filters() -> None:
    assert Filters.catalog("c") == "addins/v1/c/catalog/+"
    assert Filters.assign_group("c", "g") == "addins/v1/c/assign/group/g/+"
    assert Filters.assign_user("c", "u") == "addins/v1/c/assign/user/u/+"
    with pytest.raises(InvalidTopic):
        Filters.assign_group("c", "g/#")


def test_retained_state_filters_match_every_state_topic_and_no_report() -> None:
    from paho.mqtt.client import topic_matches_sub

    filters = Filters.retained_state("contoso")
    for topic, wire in TOPICS:
        matched = any(topic_matches_sub(f, wire) for f in filters)
        assert matched == (topic.kind != TopicKind.REPORT), wire


def catalog_entry(**over: object) -> CatalogEntry:
    fields: dict[str, object] = dict(
        addin_id=ADDIN,
        name="Contoso Notes",
        source=Source.LOB,
        version="1.2.0.0",
        manifest_sha256=SHA,
        manifest_url=f"/v1/manifests/{SHA}",
        hosts=[Host.WORD, Host.EXCEL],
        permissions="ReadWriteDocument",
        enabled=True,
        revision=7,
        committed_at=1700000000.5,
    )
    fields.update(over)
    return CatalogEntry(**fields)  # type: ignore[arg-type]


WITHHELD = WithheldVersion(version="2.0", permissions="ReadWriteDocument", hosts=[Host.WORD])

PAYLOADS = [
    (Topic.catalog("c", ADDIN), catalog_entry()),
    (Topic.catalog("c", ADDIN), catalog_entry(permissions="ReadDocument", withheld=WITHHELD)),
    (Topic.assign_everyone("c", ADDIN), Assignment(mode=Mode.OPTIONAL, revision=2)),
    (Topic.assign_group("c", "g", ADDIN), Assignment(mode=Mode.FIXED, revision=3)),
    (Topic.assign_user("c", "u", ADDIN), Assignment(mode=Mode.AVAILABLE, revision=4)),
    (Topic.member("c", "u"), Membership(groups=["g", "h"], revision=5)),
    (Topic.group_parents("c", "g"), GroupParents(parents=["all-staff"], revision=6)),
    (Topic.policy("c"), Policy(nested_groups=True, revision=8)),
    (Topic.member("c", "u"), Tombstone(deleted=True, revision=9)),
    (
        Topic.report("c", "ws1"),
        AgentReport(
            client_id="ws1",
            user_id="u",
            revision=9,
            reported_at=1.0,
            applied=[AppliedAddin(addin_id=ADDIN, version="1.0", host=Host.WORD)],
            errors=[],
        ),
    ),
]


@pytest.mark.parametrize(("topic", "payload"), PAYLOADS)
def test_payload_round_trip(topic: Topic, payload: object) -> None:
    wire = payload.to_bytes()  # type: ignore[attr-defined]
    assert decode(topic, wire) == payload
    t2, p2 = decode_message(str(topic), wire)
    assert (t2, p2) == (topic, payload)


_WH: dict[str, object] = {"version": "2.0", "permissions": "ReadDocument", "hosts": ["Word"]}


def good_catalog_json(**over: object) -> bytes:
    data = json.loads(catalog_entry().to_bytes())
    data.update(over)
    return json.dumps(data).encode()


@pytest.mark.parametrize(
    ("topic", "raw", "reason"),
    [
        (Topic.policy("c"), b"\xff\xfe", "not UTF-8"),
        (Topic.policy("c"), b'{"nested_groups": true, "revision": 1', "not JSON"),
        (Topic.policy("c"), b"[1, 2]", "must be a JSON object"),
        (Topic.policy("c"), b'"hello"', "must be a JSON object"),
        (
            Topic.policy("c"),
            b'{"nested_groups": true, "revision": 1, "admin": true}',
            "Extra inputs",
        ),
        (Topic.policy("c"), b'{"nested_groups": true}', "revision: Field required"),
        (Topic.policy("c"), b'{"nested_groups": "yes", "revision": 1}', "nested_groups"),
        (Topic.policy("c"), b'{"revision": 0}', "revision"),
        (Topic.policy("c"), b'{"revision": "5"}', "revision"),
        (Topic.policy("c"), b'{"deleted": true, "revision": 3}', "cannot carry a tombstone"),
        (Topic.member("c", "u"), b'{"deleted": false, "revision": 3}', "Tombstone"),
        (Topic.member("c", "u"), b'{"groups": ["ok", "bad/#"], "revision": 3}', "groups.1"),
        (Topic.member("c", "u"), b'{"groups": ["a\\u0000"], "revision": 3}', "groups.0"),
        (Topic.assign_user("c", "u", "a"), b'{"mode": "mandatory", "revision": 3}', "mode"),
        (Topic.catalog("c", ADDIN), good_catalog_json(addin_id="other"), "names add-in"),
        (Topic.catalog("c", ADDIN), good_catalog_json(version="1.2.3.4.5"), "version"),
        (Topic.catalog("c", ADDIN), good_catalog_json(version="123456"), "version"),
        (Topic.catalog("c", ADDIN), good_catalog_json(manifest_sha256="XYZ"), "manifest_sha256"),
        (
            Topic.catalog("c", ADDIN),
            good_catalog_json(manifest_url="http://evil/x"),
            "manifest_url",
        ),
        (Topic.catalog("c", ADDIN), good_catalog_json(hosts=["Notepad"]), "hosts.0"),
        (Topic.catalog("c", ADDIN), good_catalog_json(source="sideload"), "source"),
        (Topic.catalog("c", ADDIN), good_catalog_json(withheld="2.0"), "withheld: Input should"),
        (
            Topic.catalog("c", ADDIN),
            good_catalog_json(withheld={**_WH, "version": "1.2"}),
            "withheld: Value error, version 1.2 is not newer than the entry's 1.2.0.0",
        ),
        (
            Topic.catalog("c", ADDIN),
            good_catalog_json(withheld={**_WH, "version": "1.2.0.0.1"}),
            "withheld.version",
        ),
        (
            Topic.catalog("c", ADDIN),
            good_catalog_json(withheld={**_WH, "permissions": "Read Write"}),
            "withheld.permissions",
        ),
        (
            Topic.catalog("c", ADDIN),
            good_catalog_json(withheld={**_WH, "hosts": ["Vi"]}),
            "hosts.0",
        ),
        (
            # A withheld version is never offered: a hash or URL for it is refused.
            Topic.catalog("c", ADDIN),
            good_catalog_json(withheld={**_WH, "manifest_sha256": SHA}),
            "withheld.manifest_sha256: Extra inputs",
        ),
        (
            Topic.catalog("c", ADDIN),
            good_catalog_json(withheld={"version": "2.0", "hosts": ["Word"]}),
            "withheld.permissions: Field required",
        ),
        (
            Topic.report("c", "ws1"),
            b'{"client_id": "ws2", "user_id": "u", "revision": 1,'
            b' "reported_at": 1.0, "applied": []}',
            "on 'ws1'",
        ),
        (Topic.policy("c"), b" " * (MAX_PAYLOAD_BYTES + 1), "exceeds"),
    ],
)
def test_malformed_payloads_are_refused_with_a_reason(
    topic: Topic, raw: bytes, reason: str
) -> None:
    with pytest.raises(InvalidPayload) as err:
        decode(topic, raw)
    assert reason in str(err.value)
    assert str(topic) in str(err.value)


def test_an_entry_without_a_withheld_version_has_no_withheld_field_on_the_wire() -> None:
    """Agents that predate `withheld` refuse unknown fields: the server leaves it out unless a
    version waits for consent (docs/design.md, "Versions withheld for consent")."""
    assert b"withheld" not in catalog_entry().to_bytes()
    wire = catalog_entry(permissions="ReadDocument", withheld=WITHHELD).to_bytes()
    assert json.loads(wire)["withheld"] == {
        "version": "2.0",
        "permissions": "ReadWriteDocument",
        "hosts": ["Word"],
    }


def test_a_withheld_version_may_keep_permissions_and_hosts() -> None:
    """A change of manifest type alone also needs consent: the entry then shows the same
    permissions and hosts, and is still valid."""
    same = WithheldVersion(version="1.3", permissions="ReadWriteDocument", hosts=[Host.EXCEL])
    entry = catalog_entry(withheld=same)
    assert decode(Topic.catalog("c", ADDIN), entry.to_bytes()) == entry


def test_mode_strength_orders_fixed_over_optional_over_available() -> None:
    assert Mode.FIXED.strength > Mode.OPTIONAL.strength > Mode.AVAILABLE.strength
    assert max([Mode.AVAILABLE, Mode.FIXED, Mode.OPTIONAL], key=lambda m: m.strength) is Mode.FIXED


def test_payloads_are_immutable() -> None:
    p = Policy(nested_groups=False, revision=1)
    with pytest.raises(Exception, match="frozen"):
        p.nested_groups = True  # type: ignore[misc]


def test_topic_wire_form_is_cached_without_changing_equality() -> None:
    fresh = Topic.assign_group("c", "g", ADDIN)
    formatted = Topic.assign_group("c", "g", ADDIN)
    assert str(formatted) == "addins/v1/c/assign/group/g/" + ADDIN
    assert str(formatted) == str(formatted)  # the second call reads the cached form
    # One has its wire form cached, the other not: still equal, same hash, same dict key.
    assert fresh == formatted and hash(fresh) == hash(formatted)
    assert {fresh: 1}[formatted] == 1
    assert "_wire" not in repr(formatted)
    for topic, wire in TOPICS:
        assert str(Topic.parse(wire)) == wire == str(topic)


def _outcome(fn: Callable[[], object]) -> tuple[str, object]:
    try:
        return ("ok", fn())
    except InvalidPayload as e:
        return ("refused", str(e))


def _json_values() -> st.SearchStrategy[object]:
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-5, 2**40),
        st.floats(allow_nan=False),
        st.text(max_size=12),
        st.sampled_from(["fixed", "Word", "deleted", "1.0.0.0", SHA, f"/v1/manifests/{SHA}"]),
    )
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=3), max_leaves=6)


@given(
    st.sampled_from(PAYLOADS),
    st.dictionaries(st.sampled_from(["revision", "mode", "deleted", "groups", "name",
                                     "hosts", "committed_at", "zzz", "addin_id", "withheld"]),
                    _json_values(), max_size=3),
    st.lists(st.sampled_from(["revision", "mode", "groups", "name", "hosts", "deleted"]),
             max_size=2),
)  # fmt: skip
@settings(max_examples=300, deadline=None)
def test_one_step_decoding_agrees_with_the_diagnosing_path(
    case: tuple[Topic, Any], changes: dict[str, object], dropped: list[str]
) -> None:
    """`decode` validates plain ASCII payloads in one step and sends everything else through
    the path that names what is wrong: both must reach the same verdict."""
    topic, payload = case
    data = json.loads(payload.to_bytes())
    data.update(changes)
    for key in dropped:
        data.pop(key, None)
    raw = json.dumps(data, ensure_ascii=False).encode()

    def diagnosed() -> object:
        plain = protocol._validate_plain
        try:
            protocol._validate_plain = lambda t, r: None  # type: ignore[assignment]
            return decode(topic, raw)
        finally:
            protocol._validate_plain = plain

    assert _outcome(lambda: decode(topic, raw)) == _outcome(diagnosed)


def test_parsed_topics_are_remembered_and_bad_ones_refused_every_time() -> None:
    wire = f"addins/v1/c/assign/everyone/{ADDIN}"
    assert Topic.parse(wire) is Topic.parse(wire)
    for _ in range(2):
        with pytest.raises(InvalidTopic):
            Topic.parse("addins/v1/c/assign/everyone/bad#id")
        with pytest.raises(InvalidTopic):
            Topic.parse(["not", "a", "string"])  # type: ignore[arg-type]
    for n in range(protocol._PARSED_MAX + 10):  # bounded: the memo starts over when full
        Topic.parse(f"addins/v1/c/member/u{n}")
    assert protocol._parse_remembered.cache_info().currsize <= protocol._PARSED_MAX

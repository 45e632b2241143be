"""Forged state published with the SERVER's own broker account, against an agent that enforces
signatures: everything real — Mosquitto with the server-generated password and ACL files,
`addin-server serve --signing-key` and `addin-agent run` (with `signing_key`) as processes.

Whoever holds the server's broker account (or runs the broker) may publish on every state
topic; without signatures the agent would take a well-formed message with a higher revision
(tests/test_hostile_agent.py shows the manifest hash then limits the damage). With them, each
forgery below is refused: an event names the topic and the reason, the cache is unchanged, and
`addin-agent why` and `doctor` say so.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hostile_helpers import Mqtt, T, World, addin_id, agent_cli, manifest, wait_for

from addin_core.protocol import Topic, decode
from addin_core.signing import public_key_text, sign_state, split_state, verify_state

BASE = addin_id("signed-base")
KEY = Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("signed-hostile")
    key_file = tmp / "signing.key"
    key_file.write_bytes(
        KEY.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)
    w = World(
        tmp,
        server_env={"ADDIN_SERVER_SIGNING_KEY": str(key_file)},
        # Plain MQTT and HTTP (the lab transport), signatures enforced all the same.
        agent_lines=(f'signing_key = "{public_key_text(KEY)}"',),
    )
    try:
        # The users are added by CLI commands before `serve` runs: their messages sit in
        # the outbox unsigned and are signed when serve publishes them.
        w.start_broker()
        w.start_server()
        w.upload(manifest("signed-base"))
        w.call("POST", f"/v1/addins/{BASE}/assign", json={"target": "user", "target_id": "ann", "mode": "fixed"})  # fmt: skip
        w.call("POST", f"/v1/addins/{BASE}/assign", json={"target": "user", "target_id": "bob", "mode": "optional"})  # fmt: skip
        w.start_agent()
        wait_for(
            lambda: w.rows("SELECT 1 FROM pending WHERE addin_id = ? AND state = 'ready'", (BASE,)),
            20,
            "the signed assignment is staged",
        )
        assert w.launch("Word")["installed"] == {BASE: "1.0.0.0"}
        user, password = w.server_account
        w.forger = Mqtt(w.broker.port, user, password)  # type: ignore[attr-defined, union-attr]
        assert w.forger.connect()  # type: ignore[attr-defined]
        yield w
    finally:
        w.stop()


def published(world: World, topic: str) -> bytes:
    """The latest message the server published on `topic` (the watcher sees them all)."""

    def last() -> bytes | None:
        got = [p for t, p, _ in world.watcher.messages if t == topic]
        return got[-1] if got else None

    raw: bytes = wait_for(last, 10, f"a message on {topic}")
    return raw


@pytest.fixture
def forge(world: World) -> Iterator[Any]:
    """Publish (retained, with the server's account) a forged payload; afterwards give the
    broker back the genuine retained message so the next case starts clean."""
    touched: dict[str, bytes] = {}

    def send(topic: str, payload: bytes) -> None:
        touched.setdefault(topic, published(world, topic))
        world.forger.publish(topic, payload, retain=True)  # type: ignore[attr-defined]

    yield send
    for topic, genuine in touched.items():
        world.forger.publish(topic, genuine, retain=True)  # type: ignore[attr-defined]


@pytest.fixture
def unchanged(world: World) -> Iterator[None]:
    before = world.snapshot()
    yield
    assert world.agent_alive(), world.agent_log.read_text()[-3000:]
    assert world.snapshot() == before


def refused(world: World, after: int, topic: str, reason: str) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        for e in world.events_after(after, "signature_refused"):
            if e["detail"].startswith(f"{topic}: {reason}: "):
                return e
        return None

    try:
        event: dict[str, Any] = wait_for(found, 10, f"signature_refused {topic} {reason}")
    except AssertionError:
        raise AssertionError(f"no refusal among {world.events_after(after)}") from None
    return event


def why(world: World) -> dict[str, Any]:
    r = agent_cli(world.cache, "why", BASE, "--json")
    assert r.returncode == 0, r.stderr
    rep: dict[str, Any] = json.loads(r.stdout)
    return rep


def higher_catalog_entry(world: World) -> bytes:
    """The agent's own catalog entry of BASE with a higher revision and another name."""
    topic = f"{T}/catalog/{BASE}"
    unsigned, _ = split_state(published(world, topic))
    data = json.loads(unsigned)
    data["revision"] += 1000
    data["name"] = "Forged"
    return json.dumps(data, separators=(",", ":")).encode()


def test_every_message_the_server_published_is_signed(world: World) -> None:
    # CLI-written rows (the users, added before serve ran) included.
    seen = {
        t: p
        for t, p, _ in world.watcher.messages
        # Not the server's own marker topics, not the agents' reports.
        if "/server/" not in t and Topic.parse(t).retained
    }
    assert f"{T}/member/ann" in seen and f"{T}/member/bob" in seen
    for topic, raw in seen.items():
        decode(Topic.parse(topic), verify_state(KEY.public_key(), topic, raw))


def test_unsigned_catalog_entry_with_higher_revision_is_refused(
    world: World, forge: Any, unchanged: None
) -> None:
    after = world.last_event_id()
    topic = f"{T}/catalog/{BASE}"
    forge(topic, higher_catalog_entry(world))
    e = refused(world, after, topic, "unsigned")
    assert e["addin_id"] == BASE
    rep = why(world)
    assert rep["cause"] == "signature_refused"
    assert "its catalog entry was not signed" in rep["verdict"]
    assert "keeps the last signed state" in rep["verdict"] and "compromised" in rep["verdict"]
    # The chain still shows the last signed state: the genuine name, installed.
    assert "Installed in Word: signed-base 1.0.0.0." in rep["verdict"]
    assert rep["steps"][0]["label"] == "signature" and rep["steps"][0]["ok"] is False


def test_payload_signed_by_another_key_is_refused(
    world: World, forge: Any, unchanged: None
) -> None:
    after = world.last_event_id()
    topic = f"{T}/catalog/{BASE}"
    other = Ed25519PrivateKey.generate()
    forge(topic, sign_state(other, topic, higher_catalog_entry(world)))
    refused(world, after, topic, "bad signature")
    rep = why(world)
    assert rep["cause"] == "signature_refused"
    assert "its catalog entry had a signature that did not verify" in rep["verdict"]


def test_signed_payload_of_another_topic_replayed_is_refused(
    world: World, forge: Any, unchanged: None
) -> None:
    # Bob's assignment, genuinely signed by the server, replayed on ann's topic: it would
    # turn ann's fixed assignment into bob's optional one.
    bobs = published(world, f"{T}/assign/user/bob/{BASE}")
    anns = f"{T}/assign/user/ann/{BASE}"
    assert verify_state(KEY.public_key(), f"{T}/assign/user/bob/{BASE}", bobs)
    after = world.last_event_id()
    forge(anns, bobs)
    refused(world, after, anns, "bad signature")
    rep = why(world)
    assert rep["cause"] == "signature_refused"
    assert "an assignment of it had a signature that did not verify" in rep["verdict"]
    assert any(anns in s["detail"] for s in rep["steps"] if s["label"] == "signature")


def test_doctor_shows_signatures_enforced_and_the_refusals(world: World) -> None:
    r = agent_cli(world.cache, "doctor", "--json", config=world.agent_config)
    assert r.returncode in (0, 1), r.stderr
    checks = {c["name"]: c for c in json.loads(r.stdout)}
    sig = checks["signatures"]
    assert sig["status"] == "fail" and "enforced" in sig["detail"]
    assert "REFUSED" in sig["detail"] and public_key_text(KEY) in sig["detail"]


def test_a_genuine_newer_change_still_arrives_and_supersedes_the_refusal(
    world: World,
) -> None:
    world.upload(manifest("signed-base", version="1.0.0.1"))
    wait_for(
        lambda: world.rows(
            "SELECT 1 FROM pending WHERE addin_id = ? AND to_version = '1.0.0.1' AND state = 'ready'",
            (BASE,),
        ),
        20,
        "the signed update is staged",
    )
    assert world.launch("Word")["installed"] == {BASE: "1.0.0.1"}
    rep = why(world)
    # The catalog refusals are superseded by the newer signed entry; the replayed assignment
    # is not (ann's assignment topic has had nothing newer since).
    details = [s["detail"] for s in rep["steps"] if s["label"] == "signature"]
    assert details and all(f"/assign/user/ann/{BASE}" in d for d in details)

"""Signed state end to end (docs/security.md, "What the agent trusts"): `addin-server serve
--signing-key` as a real process, a real Mosquitto, agents with `signing_key` and real SQLite
caches, HTTP on 127.0.0.1.

Every path a state payload takes — the publisher's outbox drain, its republish to a broker that
lost its state, anti-entropy's ``/state`` — carries the same signed bytes; the agent verifies
them on MQTT and on anti-entropy alike, and one with the wrong key takes nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import pytest
from agent_helpers import (
    AGENT_TOKEN,
    ServerProcess,
    addin_id,
    agent_config,
    manifest,
    settled,
    until,
)
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from harness import free_port

from addin_core.protocol import Filters, Host, Topic, decode, server_topic
from addin_core.signing import load_public_key, public_key_text, verify_state
from addin_runtime.sqlite_tx import readonly_uri
from agent.config import ConfigError, load_config
from agent.daemon import Agent
from simulator.mosquitto import MosquittoBroker

T = "addins/v1/contoso"
# The agents here use plain mqtt:// and http:// (`insecure`, the lab transport); a signing_key
# makes them enforce signatures all the same.


def write_key(path: Path, key: Ed25519PrivateKey, mode: int = 0o600) -> Path:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.write_bytes(pem)
    path.chmod(mode)
    return path


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
async def server(
    tmp_path: Path, broker: MosquittoBroker, key: Ed25519PrivateKey
) -> AsyncIterator[ServerProcess]:
    path = write_key(tmp_path / "signing.key", key)
    srv = ServerProcess(tmp_path, broker, env={"ADDIN_SERVER_SIGNING_KEY": str(path)})
    await srv.user("ann")
    await srv.user("bob")
    yield srv
    await srv.aclose()


async def raw_retained(port: int, quiet: float = 0.5) -> dict[str, bytes]:
    """Every retained state message of the tenant, byte for byte, as a fresh subscriber gets it."""
    got: dict[str, bytes] = {}
    async with aiomqtt.Client("127.0.0.1", port) as c:
        for f in Filters.retained_state("contoso"):
            await c.subscribe(f, qos=1)
        try:
            async with asyncio.timeout(10):
                while True:
                    try:
                        async with asyncio.timeout(quiet):
                            m = await anext(c.messages)
                    except TimeoutError:
                        break
                    if m.retain:
                        got[str(m.topic)] = bytes(m.payload)
        except TimeoutError:
            pass
    return got


async def published(port: int, topic: str) -> bytes:
    """The retained bytes of `topic` once the publisher has published it (bounded wait)."""
    for _ in range(40):  # ~12 s with the quiet period
        got = await raw_retained(port, quiet=0.3)
        if topic in got:
            return got[topic]
    raise AssertionError(f"{topic} was never published")


async def marker_reaches(port: int, revision: int) -> None:
    """Wait (bounded) until the publisher's retained marker names `revision` or a later one."""
    for _ in range(100):
        async with aiomqtt.Client("127.0.0.1", port) as c:
            await c.subscribe(server_topic("contoso", "published"), qos=1)
            try:
                async with asyncio.timeout(0.3):
                    m = await anext(c.messages)
                    if json.loads(bytes(m.payload))["revision"] >= revision:
                        return
            except TimeoutError:
                pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"the publisher never marked revision {revision} published")


def events(agent: Agent, kind: str) -> list[dict[str, Any]]:
    conn = sqlite3.connect(readonly_uri(agent.config.cache_path), uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM events WHERE kind=?", (kind,))]
    finally:
        conn.close()


async def state_answer(server: ServerProcess, user: str) -> dict[str, bytes]:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        r = await http.get(
            f"/v1/agents/{user}/state", headers={"Authorization": f"Bearer {AGENT_TOKEN}"}
        )
    assert r.status_code == 200, r.text
    return {m["topic"]: m["payload"].encode() for m in r.json()["messages"]}


async def test_signed_change_installs_and_every_path_serves_the_same_signed_bytes(
    tmp_path: Path, broker: MosquittoBroker, server: ServerProcess, key: Ed25519PrivateKey
) -> None:
    pub = key.public_key()
    a, b = addin_id("a"), addin_id("b")
    await server.upload(manifest("a"))
    await server.assign(a, "everyone")
    agent = Agent(
        agent_config(tmp_path, broker, server, signing_key=public_key_text(key), insecure=True)
    )
    await agent.start()
    try:
        await settled(agent, server)
        # A change made while the agent runs arrives, verified, and installs at launch.
        await server.upload(manifest("b"))
        await server.assign(b, "user", "ann", mode="fixed")
        await until(lambda: b in agent.entitlements(), what="the signed assignment arrives")
        await settled(agent, server)
        assert await agent.launch(Host.WORD) == {a: "1.0.0.0", b: "1.0.0.0"}
        assert agent.stats["signature_refused"] == 0 and agent.stats["invalid"] == 0
    finally:
        await agent.stop()

    published = await raw_retained(broker.port)
    assert f"{T}/assign/user/ann/{b}" in published and f"{T}/member/ann" in published
    for topic, raw in published.items():
        assert raw.endswith(b'"}') and b',"sig":"' in raw, topic
        decode(Topic.parse(topic), verify_state(pub, topic, raw))

    # Anti-entropy's answer holds the very bytes the broker holds.
    answer = await state_answer(server, "ann")
    assert answer and set(answer) <= set(published)
    for topic, raw in answer.items():
        assert raw == published[topic], topic

    # A broker that lost everything is given the same signed bytes again.
    broker.restart(hard=True)
    again: dict[str, bytes] = {}
    for _ in range(40):  # bounded: ~20 s
        again = await raw_retained(broker.port)
        if set(again) == set(published):
            break
    assert again == published


async def test_anti_entropy_resync_verifies_and_a_wrong_key_takes_nothing(
    tmp_path: Path, broker: MosquittoBroker, server: ServerProcess, key: Ed25519PrivateKey
) -> None:
    a, b = addin_id("a"), addin_id("b")
    await server.upload(manifest("a"))
    await server.upload(manifest("b"))
    await server.assign(a, "everyone")
    cfg = agent_config(
        tmp_path,
        broker,
        server,
        signing_key=public_key_text(key),
        insecure=True,
        anti_entropy_interval=0.5,
    )
    agent = Agent(cfg)
    await agent.start()
    await settled(agent, server)
    await agent.stop()
    # While the agent is off, a change's retained message is lost from the broker: only
    # anti-entropy (``/state``, signed) can bring it.
    broker.restart(hard=True)
    rev = await server.assign(b, "user", "ann")
    await published(broker.port, f"{T}/assign/user/ann/{b}")
    # Once the publisher's marker says it has published that revision nothing republishes
    # it (a republish after the restart could otherwise land after the drop); then drop it.
    await marker_reaches(broker.port, rev)
    async with aiomqtt.Client("127.0.0.1", broker.port) as c:
        await c.publish(f"{T}/assign/user/ann/{b}", b"", qos=1, retain=True)
    assert f"{T}/assign/user/ann/{b}" not in await raw_retained(broker.port, quiet=0.3)

    agent = Agent(cfg)
    await agent.start()
    try:
        # The entitlement is taken before the resync's event row is written: wait for both.
        await until(
            lambda: b in agent.entitlements() and bool(events(agent, "resync")),
            20,
            "anti-entropy brings the change",
        )
        resync = events(agent, "resync")
        assert resync and "REFUSED" not in resync[-1]["detail"]
        assert agent.stats["signature_refused"] == 0
    finally:
        await agent.stop()

    # An agent configured with another key refuses every message, from MQTT and from
    # anti-entropy alike, and holds nothing.
    other = Ed25519PrivateKey.generate()
    wrong = agent_config(
        tmp_path,
        broker,
        server,
        user="bob",
        signing_key=public_key_text(other),
        insecure=True,
        anti_entropy_interval=0.5,
    )
    agent = Agent(wrong)
    await agent.start()
    try:
        await until(lambda: len(events(agent, "resync")) >= 1, 20, "a resync is tried")
        assert agent.entitlements() == {} and agent.revision == 0
        assert agent.stats["accepted"] == 0 and agent.stats["signature_refused"] > 0
        refused = events(agent, "signature_refused")
        assert any(f"{T}/catalog/{a}: bad signature" in e["detail"] for e in refused)
        assert any(e["addin_id"] == a for e in refused)
        assert "REFUSED for their signature" in events(agent, "resync")[-1]["detail"]
    finally:
        await agent.stop()


async def test_unsigned_server_is_refused_and_a_lab_agent_reads_signed_state(
    tmp_path: Path, broker: MosquittoBroker, server: ServerProcess, key: Ed25519PrivateKey
) -> None:
    a = addin_id("a")
    await server.upload(manifest("a"))
    await server.assign(a, "everyone")
    # A lab agent (no key, insecure) reads the signed payloads without checking them.
    lab = Agent(agent_config(tmp_path, broker, server, insecure=True))
    await lab.start()
    try:
        await until(lambda: a in lab.entitlements(), what="the lab agent reads signed state")
        assert lab.stats["invalid"] == 0
    finally:
        await lab.stop()

    # An unsigned message on the broker (here by an anonymous publisher: the test broker has
    # no ACL) is refused as unsigned by an agent with the key.
    await server.upload(manifest("x"))
    x = addin_id("x")
    signed = await published(broker.port, f"{T}/catalog/{x}")
    unsigned = signed[: signed.rindex(b',"sig":"')] + b"}"
    async with aiomqtt.Client("127.0.0.1", broker.port) as c:
        await c.publish(f"{T}/catalog/{x}", unsigned, qos=1, retain=True)
    agent = Agent(
        agent_config(
            tmp_path, broker, server, user="bob", signing_key=public_key_text(key), insecure=True
        )
    )
    await agent.start()
    try:
        await until(
            lambda: agent.stats["signature_refused"] >= 1, what="the unsigned entry is refused"
        )
        assert x not in agent.state.catalog and a in agent.state.catalog
        refused = events(agent, "signature_refused")
        assert [e["detail"].split(": ")[:2] for e in refused] == [[f"{T}/catalog/{x}", "unsigned"]]
    finally:
        await agent.stop()


def test_signing_key_config_is_checked(tmp_path: Path) -> None:
    good = public_key_text(Ed25519PrivateKey.generate())
    base = {"tenant": "contoso", "user_id": "ann", "client_id": "ann-pc", "insecure": True}
    assert load_config(env={}, **base, signing_key=good).signing_key == good
    assert load_config(env={}, **base, signing_key="").signing_key is None
    assert load_public_key(good)
    for bad, words in (("not-a-key!", "not a base64"), ("QUJD", "32")):
        with pytest.raises(ConfigError) as e:
            load_config(env={}, **base, signing_key=bad)
        assert e.value.problems[0].startswith("invalid agent configuration: signing_key: ")
        assert words in str(e.value)


@pytest.mark.parametrize(
    "setup, words",
    [
        ("missing", "does not exist"),
        ("open", "readable by other users"),
        ("garbage", "not a PKCS8 PEM private key"),
    ],
)
def test_serve_refuses_a_bad_signing_key_in_one_line(
    tmp_path: Path, setup: str, words: str
) -> None:
    path = tmp_path / "signing.key"
    if setup == "open":
        write_key(path, Ed25519PrivateKey.generate(), 0o644)
    elif setup == "garbage":
        path.write_bytes(b"not a key\n")
        path.chmod(0o600)
    db = tmp_path / "server.db"
    cmd = [
        sys.executable, "-m", "server_stub", "serve", "--db", str(db), "--tenant", "contoso",
        "--broker", "mqtt://127.0.0.1:1", "--listen", f"127.0.0.1:{free_port()}",
        "--insecure", "--admin-token", "a", "--agent-token", "b", "--signing-key", str(path),
    ]  # fmt: skip
    r = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("ADDIN_SERVER_")},
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: signing key ") and words in lines[0]
    assert "Traceback" not in r.stderr and not db.exists()


async def test_serve_names_the_public_key_it_signs_with(
    tmp_path: Path, broker: MosquittoBroker, key: Ed25519PrivateKey
) -> None:
    path = write_key(tmp_path / "signing.key", key)
    srv = ServerProcess(tmp_path, broker, env={"ADDIN_SERVER_SIGNING_KEY": str(path)})
    try:
        log = srv.log.read_text()
        assert f"state signed (public key {public_key_text(key)})" in log
    finally:
        srv.stop()
        await srv.aclose()

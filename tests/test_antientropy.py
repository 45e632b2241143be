"""Anti-entropy end to end (docs/design.md, "Reliability rules"): the real server stub in a
subprocess, a real Mosquitto, agents with real SQLite caches, HTTP on 127.0.0.1.

The agent compares a digest of its entitlements with the server's over HTTP and, on a
lasting mismatch, feeds the server's retained state through its revision-ordered message
path: a missed change is repaired, a matching digest does nothing, and a stale server
(restored from an old backup) can neither downgrade nor remove anything.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import pytest
from agent_helpers import (
    ADMIN_TOKEN,
    AGENT_TOKEN,
    ServerProcess,
    addin_id,
    agent_config,
    manifest,
    settled,
    until,
)
from click.testing import CliRunner
from server_helpers import retained_state

from addin_core.protocol import Host
from addin_runtime.sqlite_tx import readonly_uri
from agent.antientropy import AntiEntropy, local_digest
from agent.cli import main as cli_main
from agent.daemon import Agent
from simulator.mosquitto import MosquittoBroker


@pytest.fixture
async def server(
    tmp_path: Path, broker: MosquittoBroker, db_target: str
) -> AsyncIterator[ServerProcess]:
    srv = ServerProcess(tmp_path, broker, db=db_target)
    await srv.user("ann")
    await srv.user("bob")
    yield srv
    await srv.aclose()


def events(agent: Agent, kind: str) -> list[dict[str, Any]]:
    path = agent.config.cache_path
    conn = sqlite3.connect(readonly_uri(path), uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM events WHERE kind=?", (kind,))]
    finally:
        conn.close()


async def clear_retained(broker: MosquittoBroker, short_topics: list[str]) -> None:
    """Delete retained messages from the broker: an empty retained publish per topic."""
    async with aiomqtt.Client("127.0.0.1", broker.port) as c:
        for t in short_topics:
            await c.publish(f"addins/v1/contoso/{t}", b"", qos=1, retain=True)


async def wait_retained(broker: MosquittoBroker, cond: Callable[[dict[str, Any]], bool]) -> None:
    for _ in range(40):  # bounded: ~20 s with the 0.5 s quiet period of retained_state
        if cond(await retained_state(broker.port)):
            return
    raise AssertionError("the broker's retained state never reached the expected shape")


async def test_endpoints_digest_and_state(server: ServerProcess) -> None:
    a, b, c = addin_id("a"), addin_id("b"), addin_id("c")
    for name in ("a", "b", "c"):
        await server.upload(manifest(name, hosts=("Word", "Excel")))
    await server.group("sales")
    await server.group("emea")
    await server.group("other")
    await server.nest("emea", "sales")
    await server.join("emea", "ann")
    await server.assign(a, "everyone", mode="optional")
    await server.assign(a, "group", "sales", mode="fixed")  # nested only: policy off
    await server.assign(b, "user", "ann", mode="available")
    await server.assign(c, "user", "bob")
    await server.assign(c, "group", "other")
    rev = await server.revision()
    agent_auth = {"Authorization": f"Bearer {AGENT_TOKEN}"}
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        d = (await http.get("/v1/agents/ann/digest", headers=agent_auth)).json()
        assert (d["user_id"], d["revision"], d["count"], d["known_user"]) == ("ann", rev, 2, True)
        # Everyone's "optional" counts, the nested "fixed" does not (nesting is off).
        ent = {a: ("optional", "1.0.0.0"), b: ("available", "1.0.0.0")}
        from addin_core.digest import entitlement_digest

        assert d["digest"] == entitlement_digest([(k, m, v) for k, (m, v) in ent.items()], 0).digest

        await server.policy(True)
        d2 = (await http.get("/v1/agents/ann/digest", headers=agent_auth)).json()
        assert d2["digest"] != d["digest"] and d2["count"] == 2

        s = (await http.get("/v1/agents/ann/state", headers=agent_auth)).json()
        topics = {m["topic"].removeprefix("addins/v1/contoso/") for m in s["messages"]}
        assert {f"catalog/{x}" for x in (a, b, c)} <= topics
        assert {"policy", "member/ann", f"assign/everyone/{a}", f"assign/user/ann/{b}"} <= topics
        # The whole ancestry, whatever the policy; nothing of bob's or of other groups.
        assert {"group/emea/parents", "group/sales/parents", f"assign/group/sales/{a}"} <= topics
        assert not any("bob" in t or "other" in t for t in topics)
        for m in s["messages"]:  # the exact bytes published
            assert json.loads(m["payload"])["revision"] == m["revision"]

        assert (await http.get("/v1/agents/ann/digest")).status_code == 401
        bad = {"Authorization": "Bearer nope"}
        assert (await http.get("/v1/agents/ann/state", headers=bad)).status_code == 401
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        assert (await http.get("/v1/agents/ann/digest", headers=admin)).status_code == 200
        r = await http.get("/v1/agents/a%20b/digest", headers=agent_auth)
        assert r.status_code == 400 and "user id" in r.json()["detail"]
        ghost = (await http.get("/v1/agents/ghost/digest", headers=agent_auth)).json()
        assert ghost["known_user"] is False and ghost["count"] == 1  # Everyone's add-in only


async def test_missed_change_is_repaired_and_recorded(
    tmp_path: Path, broker: MosquittoBroker, server: ServerProcess
) -> None:
    a, b, e = addin_id("a"), addin_id("b"), addin_id("e")
    for name in ("a", "b", "e"):
        await server.upload(manifest(name))
    await server.assign(a, "everyone")
    await server.assign(e, "user", "ann")
    cfg = agent_config(tmp_path, broker, server, anti_entropy_interval=0.5)
    agent = Agent(cfg)
    await agent.start()
    await settled(agent, server)
    assert set(await agent.launch(Host.WORD)) == {a, e}
    await agent.stop()

    # While the computer is off, the broker restarts without persistence (the agent's
    # session and its queue are gone; the server republishes what it knew). Then two
    # changes are published, and their retained messages are lost from the broker.
    broker.restart(hard=True)
    await server.assign(b, "everyone")
    rev = await server.unassign(e, "user", "ann")
    await wait_retained(broker, lambda s: s.get(f"assign/user/ann/{e}", {}).get("revision") == rev)
    await clear_retained(broker, [f"assign/everyone/{b}", f"assign/user/ann/{e}"])
    await wait_retained(
        broker, lambda s: f"assign/everyone/{b}" not in s and f"assign/user/ann/{e}" not in s
    )

    agent = Agent(cfg)
    await agent.start()
    try:
        # MQTT alone cannot bring the agent there: the broker no longer has those messages.
        await until(
            lambda: set(agent.entitlements()) == {a, b},
            timeout=20,
            what="anti-entropy repairs the entitlements",
        )
        assert agent.anti_entropy is not None
        await until(
            lambda: (
                agent.anti_entropy is not None
                and agent.anti_entropy.last is not None
                and agent.anti_entropy.last.result == "ok"
            ),
            timeout=10,
            what="a matching check after the resync",
        )
        await settled(agent, server)
        assert await agent.launch(Host.WORD) == {a: "1.0.0.0", b: "1.0.0.0"}
        resyncs = events(agent, "resync")
        assert resyncs, "the resync was recorded"
        assert "2 newer than held" in resyncs[0]["detail"]
        assert "before" in resyncs[0]["detail"] and "after" in resyncs[0]["detail"]
        assert events(agent, "anti_entropy_ok")
    finally:
        await agent.stop()


async def test_matching_digest_records_no_resync(
    tmp_path: Path, broker: MosquittoBroker, server: ServerProcess
) -> None:
    a = addin_id("a")
    await server.upload(manifest("a"))
    await server.assign(a, "everyone")
    # Changes for other users move the tenant's revision past what ann's agent holds.
    await server.assign(a, "user", "bob", mode="optional")
    agent = Agent(agent_config(tmp_path, broker, server, anti_entropy_interval=1.0))
    await agent.start()
    try:
        await settled(agent, server)
        ae = agent.anti_entropy
        assert ae is not None
        await until(lambda: ae.checks >= 3, timeout=15, what="three checks")
        assert ae.resyncs == 0 and not events(agent, "resync")
        assert ae.last is not None and ae.last.result == "ok"
        assert ae.last.server_revision is not None and ae.last.revision < ae.last.server_revision
        assert len(events(agent, "anti_entropy_ok")) == 1  # sparse: only on becoming ok

        # `status` shows the last check; `doctor` compares the cache with the server now.
        toml = tmp_path / "agent.toml"
        toml.write_text(
            "\n".join(
                f"{k} = {json.dumps(v)}"
                for k, v in agent.config.model_dump(mode="json").items()
                if v is not None
            )
        )
        r = CliRunner().invoke(cli_main, ["--config", str(toml), "status", "--json"])
        assert r.exit_code == 0, r.output
        assert json.loads(r.output)["anti_entropy"]["result"] == "ok"
        r = CliRunner().invoke(cli_main, ["--config", str(toml), "status"])
        assert "anti-entropy last check" in r.output and ": ok" in r.output
        r = CliRunner().invoke(cli_main, ["--config", str(toml), "doctor", "--json"])
        check = {c["name"]: c for c in json.loads(r.output)}["anti-entropy"]
        assert check["status"] == "ok", check
        assert "1 entitlement(s) match the server's" in check["detail"]
    finally:
        await agent.stop()


async def test_zero_interval_disables(
    tmp_path: Path, broker: MosquittoBroker, server: ServerProcess
) -> None:
    agent = Agent(agent_config(tmp_path, broker, server, anti_entropy_interval=0))
    await agent.start()
    try:
        assert agent.anti_entropy is None
    finally:
        await agent.stop()


def _backup(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(src) as s, sqlite3.connect(dst) as d:
        s.backup(d)


async def test_stale_state_never_downgrades_or_removes(
    tmp_path: Path,
    broker: MosquittoBroker,
    broker_factory: Callable[..., MosquittoBroker],
    server: ServerProcess,
) -> None:
    if not isinstance(server.db, Path):
        pytest.skip("restores a backup of the SQLite file (the PostgreSQL case is the same code)")
    a, b, d = addin_id("a"), addin_id("b"), addin_id("d")
    for name in ("a", "b", "d"):
        await server.upload(manifest(name))
    await server.assign(a, "everyone")
    await server.assign(d, "everyone")
    await server.unassign(d, "everyone")  # a tombstone in the old backup
    _backup(server.db, tmp_path / "old" / "server.db")
    # After the backup: an update, a new assignment, and d assigned again.
    await server.upload(manifest("a", "1.1.0.0"))
    await server.assign(b, "user", "ann", mode="optional")
    await server.assign(d, "everyone", mode="optional")

    agent = Agent(agent_config(tmp_path, broker, server, anti_entropy_interval=0))
    await agent.start()
    old = ServerProcess(tmp_path / "old", broker_factory())  # restored backup, own broker
    try:
        await settled(agent, server)
        want = {a: "1.1.0.0", b: "1.0.0.0", d: "1.0.0.0"}
        assert {k: v.version for k, v in agent.entitlements().items()} == want
        assert await agent.launch(Host.WORD) == want
        before = local_digest(agent.state, "ann")

        # The agent now talks to the server restored from the old backup.
        agent.config = agent.config.model_copy(update={"server_url": old.url})
        ae = AntiEntropy(agent, interval=600)
        try:
            r = await ae.check()
            # It holds a newer revision than that server: a real mismatch, acted on at once.
            assert r.result == "unresolved" and r.accepted == 0
            assert r.server_revision is not None and r.server_revision < agent.revision
            assert {k: v.version for k, v in agent.entitlements().items()} == want
            assert local_digest(agent.state, "ann").digest == before.digest
            assert not agent.pending, agent.pending  # nothing to remove or downgrade
            assert len(events(agent, "resync")) == 1
            # The same stale answer is not fetched again.
            r2 = await ae.check()
            assert r2.result == "unresolved" and ae.resyncs == 1
        finally:
            await ae.stop()
        assert await agent.launch(Host.WORD) == want
    finally:
        await agent.stop()
        await old.aclose()

"""The server and real agents through a three-node NATS cluster's MQTT gateway (3.1.1 only:
both fall back to it by themselves), configured by `addin-server broker-config --target
nats`: its permissions hold, and a rollout survives one node SIGKILLed mid-way (and restarted
later: each client names one node) with every change published, every agent equal to the
oracle, nothing removed or downgraded on the way, and a computer joining afterwards
converging too. The agents run anti-entropy every 5 s: nats-server 2.9 can drop a QoS 1
delivery or leave a retained topic stale around a fail-over, and anti-entropy is the repair.

Lab mode (passwords, no TLS) with NATS: `broker-config --target nats` has no TLS mode yet.
Agents are in-process `agent.daemon.Agent`s, spread over the three nodes; the server is a
real `addin-server serve` process on node 0.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from fault_helpers import (
    AGENT_TOKEN,
    REPO,
    TENANT,
    USERS,
    Admin,
    Rollout,
    Server,
    converge,
    org_actions,
    regressions,
    stop_agents,
)
from harness import ServerProcess
from server_helpers import eventually

from addin_core.protocol import Host, server_identity
from agent.config import AgentConfig
from agent.daemon import Agent
from simulator.coordinator import Coordinator, RunOptions
from simulator.nats_cluster import (
    NatsCluster,
    NatsError,
    find_nats_server,
    free_nodes,
    node_arg,
    write_open_cluster,
)
from simulator.scenario import load_scenario

try:
    NATS = find_nats_server()
except NatsError as e:
    pytest.skip(str(e), allow_module_level=True)

SERVER_PASSWORD = "server-broker-password"
STEPS = 30


class NatsServer(Server):
    """`serve --insecure` logged in to one NATS node as the tenant's server account."""

    def __init__(self, workdir: Path, broker_url: str) -> None:
        ServerProcess.__init__(
            self,
            workdir / "server.db",
            broker_url,
            log=workdir / "server.log",
            broker_account=(server_identity(TENANT), SERVER_PASSWORD),
        )


def broker_config(db: Path, directory: Path, cluster_nodes: list[str]) -> str:
    """Run the real `addin-server broker-config --target nats`; its output."""
    cmd = [sys.executable, "-m", "server_stub", "broker-config", str(directory),
           "--db", str(db), "--tenant", TENANT, "--target", "nats",
           "--store-dir", str(directory / "js")]  # fmt: skip
    for n in cluster_nodes:
        cmd += ["--node", n]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return done.stdout


def seed_credentials(directory: Path) -> None:
    """A server password chosen before the config exists, so the server can start first
    (broker-config keeps the passwords it finds)."""
    directory.mkdir(parents=True)
    creds = {"tenant": TENANT, "server": {"username": server_identity(TENANT),
             "password": SERVER_PASSWORD}, "agents": {}}  # fmt: skip
    (directory / "credentials.json").write_text(json.dumps(creds))


def agent_config(
    workdir: Path, url: str, user: str, password: str, server: Server, device: str = "pc"
) -> AgentConfig:
    return AgentConfig(
        tenant=TENANT,
        user_id=user,
        client_id=f"{user}-{device}",
        insecure=True,
        broker_url=url,
        broker_username=user,
        broker_password=password,
        server_url=server.url,
        server_token=AGENT_TOKEN,
        cache_path=str(workdir / f"{user}-{device}.sqlite"),
        applier="folder",
        applier_dir=str(workdir / f"{user}-{device}-wef"),
        hosts=(Host.WORD, Host.EXCEL, Host.POWERPOINT),
        keepalive=5,
        # nats-server 2.9 can drop a QoS 1 delivery to a client that stays connected to a
        # surviving node while the cluster fails over (seen: 1 agent in 10, in 2 runs of
        # 6): no reconnect, so no retained resend. Anti-entropy is the product's repair for
        # exactly that; a short interval lets the test see it within its bounds.
        anti_entropy_interval=5,
    )


@pytest.fixture
def system(tmp_path: Path) -> Iterator[tuple[NatsCluster, Server, Path]]:
    """Server (on node 0) with the organisation loaded, and the cluster from its config."""
    nodes = free_nodes(3)
    conf = tmp_path / "nats"
    seed_credentials(conf)
    server = NatsServer(tmp_path, f"mqtt://{nodes[0].mqtt}")
    server.start()
    cluster = NatsCluster(conf, nodes, login=(server_identity(TENANT), SERVER_PASSWORD))
    try:
        admin = Admin(server)

        async def load() -> None:
            for a in org_actions():
                await admin.apply(a)

        asyncio.run(load())
        out = broker_config(server.db, conf, [node_arg(n) for n in nodes])
        assert "accounts.conf" in out, out
        cluster.start()
        yield cluster, server, conf
    finally:
        server.kill()
        cluster.stop()


def _passwords(conf: Path) -> dict[str, str]:
    agents = json.loads((conf / "credentials.json").read_text())["agents"]
    assert isinstance(agents, dict)
    return agents


class Login:
    """One MQTT 3.1.1 login to a node, connected (CONNACK accepted) or `refused`."""

    def __init__(self, port: int, user: str, password: str) -> None:
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"probe-{user}",
                                  protocol=paho.MQTTv311, clean_session=True)  # fmt: skip
        self.client.username_pw_set(user, password)
        self.connack: list[bool] = []
        self.granted: list[bool] = []
        self.messages: list[str] = []
        self.client.on_connect = lambda _c, _u, _f, rc, _p=None: self.connack.append(
            not rc.is_failure
        )
        self.client.on_subscribe = lambda _c, _u, _m, rcs, _p=None: self.granted.append(
            not rcs[0].is_failure
        )
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        _until(lambda: bool(self.connack), "a CONNACK")
        self.refused = not self.connack[0]

    def _on_message(self, _c: object, _u: object, m: paho.MQTTMessage) -> None:
        self.messages.append(m.topic)

    def may_subscribe(self, topic: str) -> bool:
        before = len(self.granted)
        self.client.subscribe(topic, qos=1)
        _until(lambda: len(self.granted) > before, f"the SUBACK of {topic}")
        return self.granted[-1]

    def publish(self, topic: str) -> None:
        self.client.publish(topic, b"{}", qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _until(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"no {what} within {timeout}s"
        time.sleep(0.05)


def test_permissions_follow_the_acl_rules(system: tuple[NatsCluster, Server, Path]) -> None:
    cluster, _server, conf = system
    port = cluster.nodes[1].mqtt.port
    pw = _passwords(conf)
    base = f"addins/v1/{TENANT}"
    assert Login(port, "u01", "wrong").refused
    watcher = Login(cluster.nodes[2].mqtt.port, server_identity(TENANT), SERVER_PASSWORD)
    agent = Login(port, "u01", pw["u01"])
    try:
        assert watcher.may_subscribe(f"{base}/#")
        # Its own member and assignment topics, and tenant-wide ones; no other user's.
        assert agent.may_subscribe(f"{base}/member/u01")
        assert agent.may_subscribe(f"{base}/assign/user/u01/+")
        assert agent.may_subscribe(f"{base}/assign/group/+/+")
        assert not agent.may_subscribe(f"{base}/member/u02")
        assert not agent.may_subscribe(f"{base}/assign/user/u02/+")
        assert not agent.may_subscribe(f"{base}/#")
        # It writes reports, never state: the state write is dropped, the report arrives.
        agent.publish(f"{base}/policy")
        agent.publish(f"{base}/report/u01-pc")
        _until(lambda: f"{base}/report/u01-pc" in watcher.messages, "the report")
        assert f"{base}/policy" not in watcher.messages
    finally:
        agent.close()
        watcher.close()


@pytest.mark.parametrize("killed", [2, 0], ids=["agents-node", "servers-node"])
async def test_rollout_with_a_node_sigkilled(
    tmp_path: Path, system: tuple[NatsCluster, Server, Path], killed: int
) -> None:
    cluster, server, conf = system
    admin = Admin(server)
    # The fixture's org actions went to another Admin: replay them into this oracle only.
    for a in org_actions():
        admin.truth.apply(a)
    pw = _passwords(conf)
    agents = {
        u: Agent(agent_config(tmp_path, cluster.mqtt_url(i % 3), u, pw[u], server))
        for i, u in enumerate(USERS)
    }
    try:
        await asyncio.wait_for(asyncio.gather(*(a.start() for a in agents.values())), 60)
        rollout = Rollout(seed=1700 + killed)
        for step in range(STEPS):
            if step == STEPS // 3:
                cluster.kill(killed)
            if step == 2 * STEPS // 3:
                await asyncio.to_thread(cluster.restart, killed)
            await admin.apply(rollout.step())
        assert await converge(agents, admin.truth, timeout=120) == {}
        await eventually(lambda: server.unpublished() == 0, 30, "the outbox to drain")
        # A computer that joins after the fault starts from the cluster's retained state and
        # converges too. (Not asserted: that state equals the server's. In 1 run of 7, one
        # retained topic read on a surviving node stayed a revision behind what the server
        # had published and nats-server had acknowledged, 8 s after the older one, while the
        # killed node rejoined; the newcomer's anti-entropy repairs that.)
        newcomer = Agent(agent_config(tmp_path, cluster.mqtt_url(1), "u05", pw["u05"], server,
                                      device="new"))  # fmt: skip
        agents["u05-new"] = newcomer
        await asyncio.wait_for(newcomer.start(), 60)
        assert await converge({"u05": newcomer}, admin.truth, timeout=60) == {}
        # 0 lost changes: every agent equals the oracle, and none ever lost or downgraded
        # anything on the way (the rollout only adds and upgrades).
        caches = [str(tmp_path / f"{u}-pc.sqlite") for u in USERS]
    finally:
        await stop_agents(agents)
    assert {c: regressions(c) for c in caches} == {c: [] for c in caches}
    assert "MQTT 3.1.1" in server.log.read_text()


async def test_simulator_agents_spread_over_an_open_cluster(tmp_path: Path) -> None:
    """`addin-sim run --broker NODE0 --agent-broker NODE0 ... NODE2` (what bench_brokers.py
    runs): the server and control channel on node 0, the agents on all three nodes."""
    nodes = free_nodes(3)
    write_open_cluster(tmp_path / "nats", nodes, light_consumers=True)
    cluster = NatsCluster(tmp_path / "nats", nodes)
    await asyncio.to_thread(cluster.start)
    try:
        urls = tuple(cluster.mqtt_url(i) for i in range(3))
        options = RunOptions(clients=60, workers=0, workdir=tmp_path / "run", baseline=False,
                             broker_url=urls[0], agent_brokers=urls,
                             agent_mqtt_version="3.1.1",
                             # The repair for a delivery nats-server 2.9 loses under load
                             # (seen on a busy 2-core machine), as in the tests above.
                             agent_anti_entropy=5)  # fmt: skip
        coordinator = Coordinator(load_scenario("phased-rollout"), options)
        result = await coordinator.execute()
    finally:
        cluster.stop()
    assert result.mismatches == []
    by_node = Counter(zlib.crc32(c.encode()) % 3 for c, _ in coordinator.clients)
    assert sorted(by_node) == [0, 1, 2], by_node

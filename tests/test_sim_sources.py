"""The simulator's connections leave from several loopback addresses (simulator/sources.py):
paho binds every socket before connecting, so one address's ephemeral ports would be all a
19,000-client run on one machine had."""

from __future__ import annotations

import asyncio
from pathlib import Path

import psutil
import pytest
from fault_helpers import Admin, Server, agent_config, org_actions, stop_agents

from agent.daemon import Agent
from simulator.baseline import make_shard
from simulator.control import BrokerAddress
from simulator.mosquitto import MosquittoBroker
from simulator.sources import SPREAD, source_address


def _sources_to(port: int) -> list[str]:
    """Local addresses of this process's TCP connections to `port`."""
    return [
        c.laddr.ip
        for c in psutil.Process().net_connections(kind="tcp")
        if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
    ]


def test_loopback_brokers_get_spread_sources_and_others_none() -> None:
    got = {source_address(f"u{i:05d}-pc", "127.0.0.1") for i in range(1000)}
    assert len(got) == SPREAD
    assert all(a is not None and a.startswith("127.") for a in got)
    # The same client leaves from the same address in every run.
    assert source_address("u00001-pc", "127.0.0.1") == source_address("u00001-pc", "127.0.0.1")
    assert {source_address(i, "127.0.0.1") for i in range(SPREAD)} == got
    for host in ("10.77.0.1", "broker.contoso.local", "::1", ""):
        assert source_address(1, host) is None


@pytest.mark.parametrize("kind", ["paho", "aiomqtt"])
async def test_fan_out_subscribers_connect_from_every_source(
    broker: MosquittoBroker, kind: str
) -> None:
    shard = make_shard(kind, BrokerAddress.parse(broker.url), "probe/t", 2 * SPREAD, "s")  # type: ignore[arg-type]
    await shard.connect()
    try:
        seen = _sources_to(broker.port)
        assert len(seen) == 2 * SPREAD
        assert set(seen) == {source_address(i, "127.0.0.1") for i in range(SPREAD)}
    finally:
        await shard.close()


async def test_an_agent_connects_from_its_configured_source_address(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    server = Server(tmp_path, broker)
    server.start()
    agent: Agent | None = None
    try:
        admin = Admin(server)
        for a in org_actions():
            await admin.apply(a)
        cfg = agent_config(tmp_path, broker, server, "u01")
        agent = Agent(cfg.model_copy(update={"mqtt_source_address": "127.0.103.7"}))
        await agent.start()
        await asyncio.wait_for(agent.transport.connected.wait(), 30)  # type: ignore[union-attr]
        assert _sources_to(broker.port) == ["127.0.103.7"]
    finally:
        if agent is not None:
            await stop_agents({"u01": agent})
        server.kill()


def test_a_source_address_that_is_not_an_ip_address_is_refused_by_the_config() -> None:
    from agent.config import AgentConfig

    base = dict(
        tenant="contoso", user_id="u", client_id="c", insecure=True,
        broker_url="mqtt://127.0.0.1:1883", server_url="http://127.0.0.1:1",
    )  # fmt: skip
    assert AgentConfig(**base, mqtt_source_address="127.0.100.1").mqtt_source_address == (
        "127.0.100.1"
    )
    with pytest.raises(ValueError, match="is not an IP address"):
        AgentConfig(**base, mqtt_source_address="workstation.local")

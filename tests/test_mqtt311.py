"""MQTT 3.1.1 pinned (`mqtt_version = "3.1.1"`, `serve --mqtt-version 3.1.1`) on Mosquitto:
the server publishes and the agents converge to the oracle over 3.1.1 sessions, through a
broker restart (clean_session = false keeps their sessions)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fault_helpers import Admin, Rollout, Server, agent_config, converge, org_actions, stop_agents

from agent.daemon import Agent
from simulator.mosquitto import MosquittoBroker

USERS = ("u01", "u02", "u07")


async def test_server_and_agents_over_mqtt_311(
    tmp_path: Path, broker_factory: Callable[..., Any]
) -> None:
    broker: MosquittoBroker = broker_factory(
        persistence=True, extra_config="connection_messages true"
    )
    server = Server(tmp_path, broker)
    server.env["ADDIN_SERVER_MQTT_VERSION"] = "3.1.1"
    server.start()
    agents: dict[str, Agent] = {}
    try:
        admin = Admin(server)
        for a in org_actions():
            await admin.apply(a)
        agents = {
            u: Agent(agent_config(tmp_path, broker, server, u).model_copy(
                update={"mqtt_version": "3.1.1"}))
            for u in USERS
        }  # fmt: skip
        for agent in agents.values():
            await agent.start()
        rollout = Rollout(seed=311)
        for step in range(16):
            if step == 8:
                broker.restart()
            await admin.apply(rollout.step())
        assert await converge(agents, admin.truth, timeout=60) == {}
    finally:
        await stop_agents(agents)
        server.kill()
    # Mosquitto logs each connect's protocol: p2 is MQTT 3.1.1, p5 would be MQTT 5.
    protocols = dict(re.findall(r"as (\S+) \(p(\d)", broker.log_path.read_text()))
    clients = [*(f"{u}-pc" for u in USERS), "addin-server-contoso"]
    assert {c: protocols.get(c) for c in clients} == {c: "2" for c in clients}

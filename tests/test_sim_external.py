"""`addin-sim run` against a deployment it did not start (--broker/--server/--tenant), and
with its workers in network namespaces (--netns, root only), namespaces removed whatever
happens."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from harness import ADMIN_TOKEN, AGENT_TOKEN, ServerProcess

from simulator.coordinator import Coordinator, RunOptions
from simulator.environment import Environment
from simulator.mosquitto import MosquittoBroker
from simulator.netns import unavailable
from simulator.results import RunError
from simulator.scenario import load_scenario

NETNS_MISSING = unavailable()


def _namespaces(tag: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    return [line.split()[0] for line in out.stdout.splitlines() if f"addinsim-{tag}" in line]


async def test_run_against_an_external_broker_and_server(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    server = ServerProcess(tmp_path / "server.db", broker.url, tenant="fabrikam")
    server.start()
    try:
        options = RunOptions(
            clients=40, workers=0, workdir=tmp_path / "run", baseline=False,
            broker_url=broker.url, server_url=server.url, admin_token=ADMIN_TOKEN,
            agent_token=AGENT_TOKEN, tenant="fabrikam",
        )  # fmt: skip
        result = await Coordinator(load_scenario("phased-rollout"), options).execute()
    finally:
        server.stop()
    assert result.mismatches == []
    assert result.stages  # the fleet was measured through the given broker and server
    # It started neither: no broker folder, no server database of its own.
    assert not (tmp_path / "run" / "broker").exists()
    assert not (tmp_path / "run" / "server.sqlite").exists()
    assert "fabrikam" in server.log.read_text()


@pytest.mark.skipif(NETNS_MISSING is not None, reason=f"{NETNS_MISSING}")
async def test_workers_in_two_network_namespaces(tmp_path: Path) -> None:
    options = RunOptions(clients=100, workers=2, netns=2, workdir=tmp_path, baseline=False)
    result = await Coordinator(load_scenario("phased-rollout"), options).execute()
    assert result.mismatches == []
    assert result.workers == 2
    # The agents reached the broker from the namespaces' own addresses, one per namespace.
    log = (tmp_path / "broker" / "mosquitto.log").read_text()
    peers = set(re.findall(r"connected from (10\.\d+\.\d+\.2):\d+ as ws-", log))
    assert len(peers) == 2, peers
    assert _namespaces(options.run_id[:6]) == []


@pytest.mark.skipif(NETNS_MISSING is not None, reason=f"{NETNS_MISSING}")
def test_namespaces_are_removed_when_the_start_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    options = RunOptions(clients=1, workers=1, netns=2, workdir=tmp_path, baseline=False)
    env = Environment(options, tmp_path)

    def fail(timeout: float = 0) -> None:
        assert len(_namespaces(options.run_id[:6])) == 2  # made before the server starts
        raise RunError("the server stub exited at start")

    monkeypatch.setattr(env, "start_server", fail)
    with pytest.raises(RunError):
        try:
            env.start()
        finally:
            env.stop()  # what the coordinator's exit stack does
    assert _namespaces(options.run_id[:6]) == []


def test_netns_refuses_a_loopback_broker(tmp_path: Path) -> None:
    options = RunOptions(netns=1, workdir=tmp_path, broker_url="mqtt://127.0.0.1:1883")
    env = Environment(options, tmp_path)
    with pytest.raises(RunError, match="loopback"):
        env.start()
    assert env.netns is None


async def test_an_unreachable_broker_is_a_run_error_naming_it() -> None:
    """`addin-sim run --broker` at a port nobody listens on: one line saying which broker and
    why (it was a TimeoutError traceback)."""
    from simulator.control import BrokerAddress, ControlChannel
    from simulator.mosquitto import free_port

    async def ignore(_topic: str, _data: object) -> None:
        return None

    port = free_port()
    channel = ControlChannel(BrokerAddress.parse(f"mqtt://127.0.0.1:{port}"), "t", [], ignore)
    with pytest.raises(RunError, match=rf"cannot reach the broker 127.0.0.1:{port} in 1 s: .*refused"):
        await channel.start(timeout=1)

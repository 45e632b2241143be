"""A ring rollout, its gate, a rollback and an exclusion end to end: a real Mosquitto, the real
`addin-server serve` process (its gate watcher every half second) and three real
`addin-agent run` daemons (folder appliers, control sockets), driven through the admin API
and the agents' own command line (`launch`, `why`).

ann is in the pilot ring, bob and cat in sales (the second ring); cat is also a contractor.
Version 2.0 reaches the pilot only; once ann's agent reports it applied, the gate advances
the rollout to sales by itself; the admin's rollback to 1.0 is applied as a downgrade; an
exclusion of the contractors removes the add-in from cat's Word, and `why` names it.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from agent_helpers import ServerProcess, addin_id, manifest, until
from click.testing import CliRunner
from harness import AGENT_TOKEN, AgentProcess

from agent.cli import main as agent_main
from simulator.mosquitto import MosquittoBroker

A = addin_id("ringed-e2e")
USERS = ("ann", "bob", "cat")


def agent_toml(tmp: Path, broker: MosquittoBroker, server: ServerProcess, user: str) -> Path:
    d = tmp / user
    d.mkdir()
    cfg = d / "agent.toml"
    cfg.write_text(
        f"""
tenant = "contoso"
user_id = "{user}"
client_id = "{user}-pc"
insecure = true
broker_url = "{broker.url}"
server_url = "{server.url}"
server_token = "{AGENT_TOKEN}"
cache_path = "{d / "cache.sqlite"}"
hosts = ["Word"]
applier = "folder"
applier_dir = "{d / "wef"}"
control = "{d / "agent.sock"}"
"""
    )
    return cfg


def agent_cli(cfg: Path, *args: str) -> dict[str, Any]:
    r = CliRunner().invoke(agent_main, ["--config", str(cfg), *args, "--json"])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    assert r.exit_code == 0, r.output
    body: dict[str, Any] = json.loads(r.output)
    return body


async def launch(cfg: Path) -> dict[str, str]:
    """Word starts on that computer: its pending changes apply; the installed set."""
    body = await asyncio.to_thread(agent_cli, cfg, "launch", "Word")
    return dict(body["installed"])


async def launched_until(cfg: Path, want: dict[str, str], what: str) -> None:
    """Launch Word (bounded: 20 s) until it holds `want` (the change may still be arriving)."""
    seen: dict[str, str] = {}

    async def holds() -> bool:
        nonlocal seen
        seen = await launch(cfg)
        return seen == want

    try:
        await until(holds, timeout=20, what=what)
    except AssertionError as e:
        raise AssertionError(f"{e}; Word holds {seen}") from None


@pytest.fixture
async def world(
    tmp_path: Path, broker: MosquittoBroker
) -> AsyncIterator[tuple[ServerProcess, dict[str, Path]]]:
    srv = ServerProcess(tmp_path, broker, env={"ADDIN_SERVER_GATE_INTERVAL": "0.5"})
    daemons: list[AgentProcess] = []
    try:
        for u in USERS:
            await srv.user(u)
        for g in ("pilot", "sales", "contractors"):
            await srv.group(g)
        await srv.join("pilot", "ann")
        await srv.join("sales", "bob")
        await srv.join("sales", "cat")
        await srv.join("contractors", "cat")
        await srv.upload(manifest("ringed-e2e", "1.0"))
        await srv.assign(A, "everyone")
        cfgs = {u: agent_toml(tmp_path, broker, srv, u) for u in USERS}
        env = {k: v for k, v in os.environ.items() if not k.startswith("ADDIN_AGENT_")}
        for cfg in cfgs.values():
            daemons.append(AgentProcess(cfg, cfg.parent / "daemon.log", env=env))
        for u, cfg in cfgs.items():
            await until(lambda c=cfg: (c.parent / "agent.sock").exists(), 20, f"{u}'s daemon")
            await launched_until(cfg, {A: "1.0"}, f"{u} at 1.0")
        yield srv, cfgs
    finally:
        for d in daemons:
            d.stop()
        await srv.aclose()


async def test_ring_rollout_gate_rollback_and_exclusion(
    world: tuple[ServerProcess, dict[str, Path]],
) -> None:
    srv, cfg = world
    xml = manifest("ringed-e2e", "2.0")
    await srv.call("POST", "/v1/addins?staged=true", content=xml,
                   headers={"Content-Type": "application/xml"})  # fmt: skip
    rollout = await srv.call(
        "POST",
        "/v1/rollouts",
        json={"addin": A, "version": "2.0", "gate": "applied>=100%,failed=0,wait=1s",
              "rings": ["pilot=group:pilot", "wide=group:sales", "all=everyone"]},
    )  # fmt: skip
    rid = rollout["rollout_id"]

    # Ring 1 only: bob and cat keep 1.0 (launching changes nothing for them) ...
    await launched_until(cfg["ann"], {A: "2.0"}, "ann (pilot) at 2.0")
    assert await launch(cfg["bob"]) == {A: "1.0"}
    assert await launch(cfg["cat"]) == {A: "1.0"}

    # ... until ann's report makes the gate hold: the server advances by itself.
    async def advanced() -> bool:
        view = await srv.call("GET", f"/v1/rollouts/{rid}")
        return bool(view["current_ring"] == "wide")

    await until(advanced, timeout=30, what="the gate advancing the rollout to ring wide")
    view = await srv.call("GET", f"/v1/rollouts/{rid}")
    auto = [e for e in view["history"] if e["event"] == "advanced"]
    assert auto[0]["actor"] == "rollout-gate" and auto[0]["gate"]["applied"] == 1
    await srv.call("POST", f"/v1/rollouts/{rid}/pause")
    await launched_until(cfg["bob"], {A: "2.0"}, "bob (ring wide) at 2.0")

    # The rollback, everywhere at once: ann and bob go DOWN to 1.0 (the one authorised
    # downgrade), and ann's `why` says whose decision it was.
    back = await srv.call("POST", "/v1/rollouts", json={"addin": A, "version": "1.0",
                                                         "rollback": True})  # fmt: skip
    assert back["state"] == "completed"
    await launched_until(cfg["ann"], {A: "1.0"}, "ann rolled back to 1.0")
    await launched_until(cfg["bob"], {A: "1.0"}, "bob rolled back to 1.0")
    why = await asyncio.to_thread(agent_cli, cfg["ann"], "why", A)
    assert why["cause"] == "installed", why
    rb = [s for s in why["steps"] if s["label"] == "rollback"]
    assert rb and f"revision {back['revision']}" in rb[0]["detail"], why["steps"]

    # An exclusion: cat (a contractor) loses the add-in at her next launch; why names it.
    await srv.call(
        "POST", f"/v1/addins/{A}/assign",
        json={"target": "everyone", "mode": "fixed", "except": ["group:contractors"]},
    )  # fmt: skip
    await launched_until(cfg["cat"], {}, "cat's Word without the excluded add-in")
    why = await asyncio.to_thread(agent_cli, cfg["cat"], "why", A)
    assert why["cause"] == "excluded", why
    assert "excluded by group contractors from the assignment to Everyone" in why["verdict"]
    assert await launch(cfg["bob"]) == {A: "1.0"}, "bob is no contractor"
    explain = await srv.call("GET", "/v1/explain", params={"user": "cat", "addin": A})
    assert explain["excluded"] == "excluded by group contractors from the assignment to Everyone"

"""End to end, one test per domain rule (docs/design.md, "Domain rules"): the real server
stub in a subprocess, a real Mosquitto, agents with real SQLite caches and folder appliers,
HTTP on 127.0.0.1."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from agent_helpers import ServerProcess, addin_id, agent_config, manifest, settled, until

from addin_core.protocol import Host, Mode
from agent.cache import open_readonly
from agent.daemon import Agent, AgentRefusal
from agent.why import why
from simulator.mosquitto import MosquittoBroker

MakeAgent = Callable[..., Awaitable[Agent]]


@pytest.fixture
async def server(
    tmp_path: Path, broker: MosquittoBroker, db_target: str
) -> AsyncIterator[ServerProcess]:
    srv = ServerProcess(tmp_path, broker, db=db_target)
    await srv.user("ann")
    await srv.user("bob")
    yield srv
    await srv.aclose()


@pytest.fixture
async def make_agent(
    tmp_path: Path, broker: MosquittoBroker, server: ServerProcess
) -> AsyncIterator[MakeAgent]:
    made: list[Agent] = []

    async def make(user: str = "ann", **kw: Any) -> Agent:
        a = Agent(agent_config(tmp_path, broker, server, user, **kw))
        await a.start()
        made.append(a)
        return a

    yield make
    for a in made:
        await a.stop()


def files(agent: Agent, host: Host) -> set[str]:
    d = Path(agent.config.applier_dir or "") / host.value
    return {p.stem for p in d.glob("*.xml")} if d.is_dir() else set()


async def test_everyone_and_nothing_changes_before_launch(
    server: ServerProcess, make_agent: MakeAgent
) -> None:
    notes = addin_id("notes")
    await server.upload(manifest("notes", hosts=("Word", "Excel")))
    # Without the host watcher, nothing is written before `launch` (with it, changes are
    # written while the host is not running: tests/test_hostwatch.py).
    agent = await make_agent(watch_hosts=False)
    await server.assign(notes, "everyone", mode="fixed")
    await until(lambda: notes in agent.entitlements(), what="entitlement")
    await settled(agent, server)
    # Staged, not applied: the running apps see nothing until they start.
    assert agent.installed() == {}
    assert files(agent, Host.WORD) == set()
    assert {k for k, p in agent.pending.items() if p.ready} == {
        (Host.WORD, notes),
        (Host.EXCEL, notes),
    }
    assert await agent.launch(Host.WORD) == {notes: "1.0.0.0"}
    assert files(agent, Host.WORD) == {notes}
    assert Host.EXCEL not in agent.installed()  # Excel has not started yet
    assert (Path(agent.config.applier_dir or "") / "Word" / f"{notes}.xml").read_bytes() == (
        manifest("notes", hosts=("Word", "Excel"))
    )

    # After the apply the agent reported what it applied; the server's explain shows it.
    async def reported() -> bool:
        x = await server.call("GET", f"/v1/explain?user=ann&addin={notes}")
        return any(
            a == {"addin_id": notes, "version": "1.0.0.0", "host": "Word"}
            for r in x.get("reports", [])
            for a in r["applied"]
        )

    await until(reported, what="the agent report reaches the server")


async def test_user_and_just_me_targets(server: ServerProcess, make_agent: MakeAgent) -> None:
    a, b = addin_id("a"), addin_id("b")
    await server.upload(manifest("a"))
    await server.upload(manifest("b"))
    ann, bob = await make_agent("ann"), await make_agent("bob")
    await server.assign(a, "user", "bob", mode="fixed")
    await server.assign(b, "me", mode="optional")  # the admin's own user is ann
    await settled(ann, server)
    await settled(bob, server)
    assert set(ann.entitlements()) == {b} and ann.entitlements()[b].mode == Mode.OPTIONAL
    assert set(bob.entitlements()) == {a}
    assert await bob.launch(Host.WORD) == {a: "1.0.0.0"}


async def test_group_join_and_leave(server: ServerProcess, make_agent: MakeAgent) -> None:
    g = addin_id("grp")
    await server.upload(manifest("grp"))
    await server.group("sales")
    await server.assign(g, "group", "sales", mode="fixed")
    agent = await make_agent()
    await settled(agent, server)
    assert agent.entitlements() == {}
    assert not any("sales" in f for f in agent.transport.subscribed)
    await server.join("sales", "ann")
    await until(lambda: g in agent.entitlements(), what="join takes effect")
    await until(
        lambda: any("assign/group/sales/+" in f for f in agent.transport.subscribed),
        what="subscribed to the group",
    )
    await settled(agent, server)
    assert await agent.launch(Host.WORD) == {g: "1.0.0.0"}
    await server.leave("sales", "ann")
    await until(lambda: g not in agent.entitlements(), what="leave takes effect")
    await until(
        lambda: not any("sales" in f for f in agent.transport.subscribed), what="unsubscribed"
    )
    assert agent.installed()[Host.WORD] == {g: "1.0.0.0"}  # until Word next starts
    assert await agent.launch(Host.WORD) == {}
    assert files(agent, Host.WORD) == set()


async def test_nested_groups_on_and_off(server: ServerProcess, make_agent: MakeAgent) -> None:
    n = addin_id("nested")
    await server.upload(manifest("nested"))
    for grp in ("sales", "emea"):
        await server.group(grp)
    await server.nest("emea", "sales")
    await server.join("emea", "ann")
    await server.assign(n, "group", "sales", mode="fixed")
    agent = await make_agent()
    await settled(agent, server)
    assert agent.entitlements() == {}  # nesting is off by default, like Microsoft's
    rep = why(open_readonly(agent.config.cache_path), "nested")
    assert rep.cause == "nested_disabled" and "emea" in rep.verdict
    await server.policy(True)
    await until(lambda: n in agent.entitlements(), what="nesting enabled")
    assert agent.entitlements()[n].grants[0].path == ("emea", "sales")
    rev = await server.policy(False)
    await until(lambda: n not in agent.entitlements(), what="nesting disabled")
    # The verdict names the policy change that took it, with its revision.
    await settled(agent, server)
    rep = why(open_readonly(agent.config.cache_path), "nested")
    assert rep.cause == "nested_disabled"
    assert "turned nested groups off" in rep.verdict and f"revision {rev}" in rep.verdict


async def test_modes_fixed_optional_available(server: ServerProcess, make_agent: MakeAgent) -> None:
    f, o, v = addin_id("fixed"), addin_id("optional"), addin_id("available")
    for name in ("fixed", "optional", "available"):
        await server.upload(manifest(name))
    await server.assign(f, "everyone", mode="fixed")
    await server.assign(o, "everyone", mode="optional")
    await server.assign(v, "everyone", mode="available")
    agent = await make_agent()
    await settled(agent, server)
    assert set(await agent.launch(Host.WORD)) == {f, o}
    with pytest.raises(AgentRefusal, match="fixed"):
        await agent.remove("fixed")
    await agent.remove("optional")
    await agent.install("available")
    assert set(await agent.launch(Host.WORD)) == {f, v}
    # The strongest assignment wins: a fixed user assignment makes `optional` un-removable.
    await server.assign(o, "user", "ann", mode="fixed")
    await until(lambda: agent.entitlements()[o].mode == Mode.FIXED, what="fixed wins")
    assert set(await agent.launch(Host.WORD)) == {f, o, v}


async def test_turn_off_and_on(server: ServerProcess, make_agent: MakeAgent) -> None:
    x = addin_id("toggle")
    await server.upload(manifest("toggle"))
    await server.assign(x, "everyone")
    agent = await make_agent()
    await settled(agent, server)
    assert await agent.launch(Host.WORD) == {x: "1.0.0.0"}
    await server.call("POST", f"/v1/addins/{x}/disable")
    await until(lambda: x not in agent.entitlements(), what="turned off")
    assert agent.installed()[Host.WORD] == {x: "1.0.0.0"}  # stays until Word starts
    assert await agent.launch(Host.WORD) == {}
    assert why(open_readonly(agent.config.cache_path), x).cause == "turned_off"
    await server.call("POST", f"/v1/addins/{x}/enable")
    await until(lambda: x in agent.entitlements(), what="turned on")
    await settled(agent, server)
    assert await agent.launch(Host.WORD) == {x: "1.0.0.0"}


async def test_lob_update_and_downgrade_refused(
    server: ServerProcess, make_agent: MakeAgent
) -> None:
    x = addin_id("lob")
    await server.upload(manifest("lob", "1.9.0.0"))
    await server.assign(x, "everyone")
    agent = await make_agent()
    await settled(agent, server)
    assert await agent.launch(Host.WORD) == {x: "1.9.0.0"}
    await server.upload(manifest("lob", "1.10.0.0"))  # numeric compare: 1.10 > 1.9
    await until(lambda: agent.entitlements()[x].version == "1.10.0.0", what="update received")
    await settled(agent, server)
    assert agent.pending[(Host.WORD, x)].action == "update"
    assert agent.installed()[Host.WORD] == {x: "1.9.0.0"}
    assert await agent.launch(Host.WORD) == {x: "1.10.0.0"}
    body = await server.upload(manifest("lob", "1.2.0.0"), expect=409)
    assert "1.2.0.0" in body["detail"]
    await settled(agent, server)
    assert await agent.launch(Host.WORD) == {x: "1.10.0.0"}


async def test_permission_change_is_held_until_consent(
    server: ServerProcess, make_agent: MakeAgent
) -> None:
    x = addin_id("perm")
    await server.upload(manifest("perm", "1.0.0.0", permissions="ReadDocument"))
    await server.assign(x, "everyone")
    agent = await make_agent()
    await settled(agent, server)
    assert await agent.launch(Host.WORD) == {x: "1.0.0.0"}
    r = await server.upload(manifest("perm", "2.0.0.0", permissions="ReadWriteDocument"))
    assert r["state"] == "needs_consent"
    await settled(agent, server)
    assert await agent.launch(Host.WORD) == {x: "1.0.0.0"}  # the old version stays
    await server.call("POST", f"/v1/addins/{x}/consent")
    await until(lambda: agent.entitlements()[x].version == "2.0.0.0", what="consented update")
    await settled(agent, server)
    assert await agent.launch(Host.WORD) == {x: "2.0.0.0"}


async def test_host_filter(server: ServerProcess, make_agent: MakeAgent) -> None:
    mail, doc = addin_id("mail"), addin_id("doc")
    await server.upload(manifest("mail", hosts=("Outlook",)))
    await server.upload(manifest("doc", hosts=("Word", "Excel")))
    await server.assign(mail, "everyone")
    await server.assign(doc, "everyone")
    agent = await make_agent(hosts=["Word", "Outlook"])
    await settled(agent, server)
    assert agent.entitlements()[doc].hosts == (Host.WORD,)
    assert agent.entitlements()[mail].hosts == (Host.OUTLOOK,)
    assert await agent.launch(Host.WORD) == {doc: "1.0.0.0"}
    assert await agent.launch(Host.OUTLOOK) == {mail: "1.0.0.0"}
    assert await agent.launch(Host.EXCEL) == {}  # Excel is not installed on this computer
    conn = open_readonly(agent.config.cache_path)
    assert why(conn, "mail", Host.WORD).cause == "host_unsupported"
    assert why(conn, "doc", Host.EXCEL).cause == "host_not_installed"


async def test_why_names_the_removal_and_the_group_left_after_they_were_applied(
    server: ServerProcess, make_agent: MakeAgent
) -> None:
    gone, grp, every = addin_id("Contoso Gone"), addin_id("Sales Sheet"), addin_id("Everywhere")
    for name in ("Contoso Gone", "Sales Sheet", "Everywhere"):
        await server.upload(manifest(name))
    await server.group("sales")
    await server.join("sales", "ann")
    await server.assign(gone, "everyone")
    await server.assign(every, "everyone")
    await server.assign(grp, "group", "sales")
    agent = await make_agent(watch_hosts=False)
    await settled(agent, server)
    assert set(await agent.launch(Host.WORD)) == {gone, grp, every}
    removal = int((await server.call("DELETE", f"/v1/addins/{gone}"))["revision"])
    left = await server.leave("sales", "ann")
    unassigned = await server.unassign(every, "everyone")
    await until(lambda: agent.entitlements() == {}, what="all three taken away")
    await settled(agent, server)
    assert await agent.launch(Host.WORD) == {}  # every removal applied
    conn = open_readonly(agent.config.cache_path)
    for q in ("Contoso Gone", "contoso gone", gone):
        rep = why(conn, q, Host.WORD, running=True)
        assert (rep.cause, rep.name) == ("removed", "Contoso Gone"), (q, rep.verdict)
        assert rep.verdict.startswith("Contoso Gone was removed from the catalog by the admin at ")
        assert rep.verdict.endswith(f"(revision {removal}).") and gone not in rep.verdict
    rep = why(conn, "Sales Sheet", Host.WORD, running=True)
    assert rep.cause == "left_group", rep.verdict
    assert rep.verdict.startswith("You left group sales at ")
    assert f"(revision {left}); it carried Sales Sheet." in rep.verdict
    rep = why(conn, "Everywhere", Host.WORD, running=True)
    assert rep.cause == "unassigned", rep.verdict
    assert "unassigned Everywhere from Everyone at " in rep.verdict
    assert f"(revision {unassigned})" in rep.verdict
    conn.close()


async def test_why_with_the_daemon_stopped_since_before_an_assignment_says_as_of(
    server: ServerProcess, make_agent: MakeAgent
) -> None:
    from click.testing import CliRunner

    from agent.cli import main

    late = addin_id("late")
    await server.upload(manifest("late"))
    agent = await make_agent(watch_hosts=False)
    await settled(agent, server)
    await agent.stop()
    await server.assign(late, "everyone")  # the stopped agent never hears of it
    r = CliRunner().invoke(main, ["--cache", agent.config.cache_path, "why", "late", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["cause"] == "not_assigned"
    assert rep["verdict"].startswith("late is not assigned to you as of ")
    assert "; this machine has not synced since then (the agent is not running)" in rep["verdict"]
    f = rep["freshness"]
    assert f["daemon_running"] is False and f["stale"] is True and f["broker_at"] is not None


async def test_the_installed_aiomqtt_allows_direct_delivery() -> None:
    """`Transport` takes messages straight from paho through three aiomqtt internals (half the
    CPU per message of aiomqtt's iterator); an aiomqtt upgrade that drops them must fail here,
    not quietly fall back to the slow path."""
    import aiomqtt

    from addin_runtime.mqtt import has_direct_delivery

    assert has_direct_delivery(aiomqtt.Client("127.0.0.1", 1))

"""An update withheld for consent (its permissions or hosts changed) is visible to the agent
and never installed by it: the real server in a subprocess, a real Mosquitto, an in-process
agent with a real SQLite cache and folder applier, HTTP on 127.0.0.1.

The catalog entry keeps the consented version and names the withheld one (`withheld`);
`addin-agent why` and `addin-server explain` say the user keeps the old version and why;
after consent (or an update that needs none) the entry no longer names it.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from agent_helpers import (
    ServerProcess,
    addin_id,
    agent_config,
    lab_agent_toml,
    manifest,
    settled,
    until,
)
from click.testing import CliRunner

from addin_core.protocol import (
    Assignment,
    CatalogEntry,
    Host,
    Mode,
    Source,
    Topic,
    WithheldVersion,
)
from agent.cache import open_readonly
from agent.cli import main as agent_main
from agent.config import AgentConfig
from agent.daemon import Agent
from agent.fetcher import verify
from agent.readmodel import ReadModel
from agent.why import why
from simulator.mosquitto import MosquittoBroker

NAME = "perm"
X = addin_id(NAME)


@pytest.fixture
async def server(
    tmp_path: Path, broker: MosquittoBroker, db_target: str
) -> AsyncIterator[ServerProcess]:
    srv = ServerProcess(tmp_path, broker, db=db_target)
    await srv.user("ann")
    yield srv
    await srv.aclose()


@pytest.fixture
async def agent(
    tmp_path: Path, broker: MosquittoBroker, server: ServerProcess
) -> AsyncIterator[Agent]:
    # The same cache and client as `lab_agent_toml`, so the CLI reads this agent's cache.
    a = Agent(
        agent_config(
            tmp_path,
            broker,
            server,
            client_id="ann-laptop",
            cache_path=str(tmp_path / "cache.sqlite"),
            applier_dir=str(tmp_path / "wef"),
            hosts=["Word", "Excel"],
            watch_hosts=False,
        )
    )
    await a.start()
    yield a
    await a.stop()


def version_xml(version: str, permissions: str, hosts: tuple[str, ...] = ("Word",)) -> bytes:
    return manifest(NAME, version, hosts, permissions=permissions)


def agent_why(cfg: Path) -> str:
    r = CliRunner().invoke(agent_main, ["--config", str(cfg), "why", NAME, "--host", "Word"])
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    return " ".join(r.output.split())  # as one line: the terminal renderer wraps


def server_explain(server: ServerProcess) -> str:
    r = subprocess.run(
        [sys.executable, "-m", "server_stub", "explain", "--user", "ann", "--addin", NAME,
         "--db", str(server.db)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return r.stdout


def assert_nothing_fetched_or_staged(agent: Agent, withheld: bytes, version: str) -> None:
    """The withheld version's manifest is not in the cache, no download is in flight and no
    change to it is pending in any host."""
    sha = hashlib.sha256(withheld).hexdigest()
    rm = ReadModel(open_readonly(agent.config.cache_path))
    assert rm.manifest(sha) is None
    assert sha not in agent._fetching
    assert not any(p.to_version == version for p in agent.pending.values()), agent.pending
    for h in Host:
        p = rm.pending_in(h, X)
        assert p is None or p.to_version != version, p


async def wait_withheld(agent: Agent, server: ServerProcess, version: str | None) -> None:
    def shown() -> bool:
        e = agent.state.catalog.get(X)
        return e is not None and (e.withheld.version if e.withheld else None) == version

    await until(shown, what=f"the catalog entry names withheld version {version}")
    await settled(agent, server)


async def test_withheld_update_is_shown_never_installed_and_flows_after_consent(
    tmp_path: Path, broker: MosquittoBroker, server: ServerProcess, agent: Agent
) -> None:
    cfg = lab_agent_toml(tmp_path, broker, server)
    await server.upload(version_xml("1.0.0.0", "ReadDocument"))
    await server.assign(X, "everyone")
    await settled(agent, server)
    assert await agent.launch(Host.WORD) == {X: "1.0.0.0"}

    # 2.0 asks for more: the server holds it and the entry names it, keeping 1.0.
    v2 = version_xml("2.0.0.0", "ReadWriteDocument")
    assert (await server.upload(v2))["state"] == "needs_consent"
    await wait_withheld(agent, server, "2.0.0.0")
    entry = agent.state.catalog[X]
    assert (entry.version, entry.permissions) == ("1.0.0.0", "ReadDocument")
    assert entry.withheld is not None and entry.withheld.permissions == "ReadWriteDocument"
    assert_nothing_fetched_or_staged(agent, v2, "2.0.0.0")
    assert await agent.launch(Host.WORD) == {X: "1.0.0.0"}
    rep = why(open_readonly(agent.config.cache_path), NAME, Host.WORD)
    assert rep.cause == "withheld_for_consent", rep
    assert rep.verdict == (
        f"Version 2.0.0.0 of {NAME} waits for admin consent "
        "(permissions ReadDocument → ReadWriteDocument); you keep 1.0.0.0."
    )
    out = agent_why(cfg)
    assert "waits for admin consent (permissions ReadDocument → ReadWriteDocument)" in out
    assert "you keep 1.0.0.0" in out
    text = server_explain(server)
    assert (
        "Consent: version 2.0.0.0 waits for admin consent "
        "(permissions ReadDocument → ReadWriteDocument); ann keeps 1.0.0.0 until "
        f"`addin-server addin consent {X}`"
    ) in text, text

    # 3.0 supersedes it and also adds a host: the entry names 3.0 and both changes.
    v3 = version_xml("3.0.0.0", "ReadWriteDocument", ("Word", "Excel"))
    assert (await server.upload(v3))["state"] == "needs_consent"
    await wait_withheld(agent, server, "3.0.0.0")
    assert_nothing_fetched_or_staged(agent, v2, "2.0.0.0")
    assert_nothing_fetched_or_staged(agent, v3, "3.0.0.0")
    assert await agent.launch(Host.WORD) == {X: "1.0.0.0"}
    assert await agent.launch(Host.EXCEL) == {}
    changes = "permissions ReadDocument → ReadWriteDocument; hosts Word → Excel, Word"
    rep = why(open_readonly(agent.config.cache_path), NAME, Host.WORD)
    assert rep.verdict == (
        f"Version 3.0.0.0 of {NAME} waits for admin consent ({changes}); you keep 1.0.0.0."
    )
    assert f"Consent: version 3.0.0.0 waits for admin consent ({changes})" in server_explain(server)

    # The admin consents: 3.0 flows like any update and nothing mentions consent any more.
    await server.call("POST", f"/v1/addins/{X}/consent")
    await wait_withheld(agent, server, None)
    assert agent.state.catalog[X].version == "3.0.0.0"
    assert await agent.launch(Host.WORD) == {X: "3.0.0.0"}
    rep = why(open_readonly(agent.config.cache_path), NAME, Host.WORD)
    assert rep.cause == "installed" and "consent" not in rep.verdict, rep
    assert "consent" not in agent_why(cfg)
    assert "Consent:" not in server_explain(server)


async def test_an_update_that_needs_no_consent_supersedes_the_withheld_one(
    server: ServerProcess, agent: Agent
) -> None:
    await server.upload(version_xml("1.0.0.0", "ReadDocument"))
    await server.assign(X, "everyone")
    await settled(agent, server)
    assert await agent.launch(Host.WORD) == {X: "1.0.0.0"}
    v2 = version_xml("2.0.0.0", "ReadWriteDocument")
    await server.upload(v2)
    await wait_withheld(agent, server, "2.0.0.0")
    # 2.1 keeps the consented permissions and hosts: it is current at once, 2.0 is dropped.
    assert (await server.upload(version_xml("2.1.0.0", "ReadDocument")))["state"] == "current"
    await wait_withheld(agent, server, None)
    assert agent.state.catalog[X].version == "2.1.0.0"
    assert_nothing_fetched_or_staged(agent, v2, "2.0.0.0")
    rep = why(open_readonly(agent.config.cache_path), NAME, Host.WORD)
    assert rep.cause == "pending_update" and "consent" not in rep.verdict, rep
    assert await agent.launch(Host.WORD) == {X: "2.1.0.0"}


async def test_why_adds_the_withheld_version_to_a_change_still_on_its_way(tmp_path: Path) -> None:
    """Not installed yet: the verdict stays the pending install and adds the waiting version;
    a withheld version that keeps permissions and hosts (its manifest type changed) says so."""
    agent = Agent(
        AgentConfig(
            tenant="contoso",
            user_id="ann",
            client_id="ann-pc",
            insecure=True,
            cache_path=str(tmp_path / "cache.sqlite"),
            hosts=(Host.WORD,),
            applier="folder",
            applier_dir=str(tmp_path / "wef"),
        )
    )
    await agent.open()
    try:
        xml = version_xml("1.0.0.0", "ReadDocument")
        sha = hashlib.sha256(xml).hexdigest()

        def entry(revision: int, withheld: WithheldVersion) -> CatalogEntry:
            return CatalogEntry(
                revision=revision,
                addin_id=X,
                name=NAME,
                source=Source.LOB,
                version="1.0.0.0",
                manifest_sha256=sha,
                manifest_url=f"/v1/manifests/{sha}",
                hosts=[Host.WORD],
                permissions="ReadDocument",
                enabled=True,
                withheld=withheld,
            )

        first = entry(
            1, WithheldVersion(version="2.0", permissions="ReadWriteDocument", hosts=[Host.WORD])
        )
        await agent.accept(Topic.catalog("contoso", X), first)
        await agent.accept(
            Topic.assign_everyone("contoso", X), Assignment(revision=2, mode=Mode.FIXED)
        )
        await agent._record_manifest(first, verify(first, xml))
        rep = why(open_readonly(agent.config.cache_path), NAME)
        assert rep.cause == "pending_install", rep
        assert rep.verdict.endswith(
            f" Also, version 2.0 of {NAME} waits for admin consent "
            "(permissions ReadDocument → ReadWriteDocument); until then you get 1.0.0.0."
        ), rep.verdict
        same = entry(
            3, WithheldVersion(version="2.0", permissions="ReadDocument", hosts=[Host.WORD])
        )
        await agent.accept(Topic.catalog("contoso", X), same)
        assert await agent.launch(Host.WORD) == {X: "1.0.0.0"}
        rep = why(open_readonly(agent.config.cache_path), NAME)
        assert (rep.cause, rep.verdict) == (
            "withheld_for_consent",
            f"Version 2.0 of {NAME} waits for admin consent (its manifest type changed); "
            "you keep 1.0.0.0.",
        )
        assert ("withheld", False) in [(s.label, s.ok) for s in rep.steps]
    finally:
        await agent.stop()

"""Faults: an agent offline while changes happen, a broker restart, SIGKILL during apply."""

from __future__ import annotations

import asyncio
import hashlib
import multiprocessing
import os
import random
import shutil
import signal
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from agent_helpers import ServerProcess, addin_id, agent_config, manifest, settled, until

from addin_core.protocol import Assignment, CatalogEntry, Host, Mode, Source, Topic
from agent.config import AgentConfig
from agent.daemon import Agent
from agent.fetcher import verify
from simulator.mosquitto import MosquittoBroker


@pytest.fixture
async def server(tmp_path: Path, broker: MosquittoBroker) -> AsyncIterator[ServerProcess]:
    srv = ServerProcess(tmp_path, broker)
    await srv.user("ann")
    yield srv
    await srv.aclose()


async def test_offline_during_three_changes_then_back_converges(
    tmp_path: Path, broker: MosquittoBroker, server: ServerProcess
) -> None:
    a, b, c = addin_id("a"), addin_id("b"), addin_id("c")
    for name in ("a", "b", "c"):
        await server.upload(manifest(name))
    await server.assign(a, "everyone")
    await server.assign(b, "everyone", mode="optional")
    cfg = agent_config(tmp_path, broker, server)
    agent = Agent(cfg)
    await agent.start()
    await settled(agent, server)
    assert set(await agent.launch(Host.WORD)) == {a, b}
    await agent.stop()

    # Three changes while the computer is off: an update, an unassignment, a new assignment.
    await server.upload(manifest("a", "1.1.0.0"))
    await server.unassign(b, "everyone")
    await server.assign(c, "everyone", mode="fixed")

    # Offline, the cache still serves the last good state: nothing removed or changed.
    offline = Agent(cfg)
    assert await offline.launch(Host.WORD) == {a: "1.0.0.0", b: "1.0.0.0"}
    await offline.stop()

    back = Agent(cfg)
    await back.start()
    try:
        await until(lambda: set(back.entitlements()) == {a, c}, what="convergence")
        await settled(back, server)
        assert await back.launch(Host.WORD) == {a: "1.1.0.0", c: "1.0.0.0"}
        # The session was persistent: only the very first connect used clean start.
        rows = await back.cache.fetchall("SELECT value FROM sync WHERE key='session_started'")  # type: ignore[union-attr]
        assert rows and rows[0]["value"] == "1"
        assert back.transport.clean_start is False
    finally:
        await back.stop()


async def test_broker_restart_converges(
    tmp_path: Path, broker: MosquittoBroker, server: ServerProcess
) -> None:
    a, b = addin_id("a"), addin_id("b")
    await server.upload(manifest("a"))
    await server.upload(manifest("b"))
    await server.assign(a, "everyone")
    agent = Agent(agent_config(tmp_path, broker, server))
    await agent.start()
    try:
        await settled(agent, server)
        assert set(agent.entitlements()) == {a}
        # A hard restart without persistence: the broker forgets sessions and retained state.
        broker.restart(hard=True)
        await server.assign(b, "everyone")
        await until(lambda: set(agent.entitlements()) == {a, b}, timeout=30, what="convergence")
        await until(lambda: agent.connected, what="reconnected")
        await settled(agent, server)
        assert set(await agent.launch(Host.WORD)) == {a, b}
    finally:
        await agent.stop()


# -- SIGKILL during apply -------------------------------------------------------------------

N_ADDINS = 16
KILLS = 50


async def _prepare(cfg: AgentConfig) -> None:
    """A cache with N_ADDINS verified, ready installs for Word (no broker, no server)."""
    agent = Agent(cfg)
    await agent.open()
    rev = 0
    for i in range(N_ADDINS):
        xml = manifest(f"k{i}")
        digest = hashlib.sha256(xml).hexdigest()
        rev += 1
        entry = CatalogEntry(
            revision=rev,
            addin_id=addin_id(f"k{i}"),
            name=f"k{i}",
            source=Source.LOB,
            version="1.0.0.0",
            manifest_sha256=digest,
            manifest_url=f"/v1/manifests/{digest}",
            hosts=[Host.WORD],
            permissions="ReadDocument",
            enabled=True,
        )
        await agent.accept(Topic.catalog(cfg.tenant, entry.addin_id), entry)
        await agent._record_manifest(entry, verify(entry, xml))
        rev += 1
        await agent.accept(
            Topic.assign_everyone(cfg.tenant, entry.addin_id),
            Assignment(revision=rev, mode=Mode.FIXED),
        )
    await agent.stop()


def _launch_child(cfg_json: str) -> None:
    cfg = AgentConfig.model_validate_json(cfg_json)

    async def go() -> None:
        agent = Agent(cfg)
        await agent.launch(Host.WORD)
        await agent.stop()

    asyncio.run(go())
    os._exit(0)


def _snapshot(path: str) -> tuple[str, int, int]:
    conn = sqlite3.connect(path)
    try:
        check = conn.execute("PRAGMA integrity_check").fetchone()[0]
        installed = conn.execute("SELECT count(*) FROM installed").fetchone()[0]
        pending = conn.execute("SELECT count(*) FROM pending WHERE host='Word'").fetchone()[0]
        return check, installed, pending
    finally:
        conn.close()


def test_sigkill_during_apply_leaves_before_or_after(tmp_path: Path) -> None:
    pristine = tmp_path / "pristine.sqlite"
    base: dict[str, Any] = dict(
        tenant="contoso", user_id="ann", client_id="ann-pc", insecure=True, applier="folder"
    )
    asyncio.run(
        _prepare(
            AgentConfig(
                **base, cache_path=str(pristine), applier_dir=str(tmp_path / "pristine-wef")
            )
        )
    )
    ctx = multiprocessing.get_context("fork")
    work = tmp_path / "work.sqlite"
    wef = tmp_path / "wef"
    cfg = AgentConfig(**base, cache_path=str(work), applier_dir=str(wef))

    def reset() -> None:
        for suffix in ("", "-wal", "-shm"):
            Path(str(work) + suffix).unlink(missing_ok=True)
        shutil.copy(pristine, work)
        shutil.rmtree(wef, ignore_errors=True)

    # One undisturbed run measures how long a launch takes, to aim the kills inside it.
    reset()
    t0 = time.monotonic()
    p = ctx.Process(target=_launch_child, args=(cfg.model_dump_json(),))
    p.start()
    p.join(30)
    full = time.monotonic() - t0
    assert p.exitcode == 0
    assert _snapshot(str(work)) == ("ok", N_ADDINS, 0)

    rng = random.Random(4)
    outcomes = {"before": 0, "after": 0}
    for i in range(KILLS):
        reset()
        p = ctx.Process(target=_launch_child, args=(cfg.model_dump_json(),))
        p.start()
        time.sleep(rng.uniform(0, full))
        if p.pid is not None and p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
        p.join(30)
        check, installed, pending = _snapshot(str(work))
        assert check == "ok"
        assert (installed, pending) in ((0, N_ADDINS), (N_ADDINS, 0)), (installed, pending)
        outcomes["before" if installed == 0 else "after"] += 1

        if i % 5:
            continue

        # Whatever the instant, the next launch converges cache and folder to the full set.
        async def relaunch() -> dict[str, str]:
            agent = Agent(cfg)
            try:
                return await agent.launch(Host.WORD)
            finally:
                await agent.stop()

        assert len(asyncio.run(relaunch())) == N_ADDINS
        assert len(list((wef / "Word").glob("*.xml"))) == N_ADDINS
        assert not list((wef / "Word").glob(".tmp-*"))
    # Both outcomes happened, so kills really landed before and after the commit.
    assert outcomes["before"] > 0 and outcomes["after"] > 0, outcomes

"""Fault suite, agent side: agents killed with SIGKILL at random points (50 times), 20% of
clients offline across five changes, messages duplicated and reordered on the wire.

After each: every cache passes `PRAGMA integrity_check`, every client converges to the
oracle's entitlements and installed set, and no agent ever removed or downgraded an add-in
(the rollouts are monotone, so any removal would be a bug). Real Mosquitto, the real server
process, real agents with SQLite caches and folder appliers.
"""

from __future__ import annotations

import asyncio
import random
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import pytest
from fault_helpers import (
    USERS,
    Admin,
    Rollout,
    Server,
    agent_config,
    converge,
    integrity,
    regressions,
    spawn_agent,
    start_agents,
    start_system,
    stop_agents,
)
from server_helpers import Collector, eventually

from agent.daemon import Agent
from simulator.mosquitto import MosquittoBroker


@pytest.fixture
async def system(
    tmp_path: Path, broker: MosquittoBroker
) -> AsyncIterator[tuple[MosquittoBroker, Server, Admin]]:
    server, admin, _ = await start_system(tmp_path, broker)
    try:
        yield broker, server, admin
    finally:
        server.kill()


def check_caches(tmp: Path, users: tuple[str, ...]) -> None:
    for u in users:
        cache = tmp / f"{u}-pc.sqlite"
        assert integrity(cache) == "ok", cache
        assert regressions(cache) == [], (u, regressions(cache))


KILLS = 50


async def test_agents_sigkilled_50_times_at_random_points(
    tmp_path: Path, system: tuple[MosquittoBroker, Server, Admin]
) -> None:
    broker, server, admin = system
    rollout = Rollout(seed=650)
    for _ in range(6):
        await admin.apply(rollout.step())
    users = USERS[::2]  # five agent processes
    cfgs = {u: agent_config(tmp_path, broker, server, u) for u in users}
    procs = {u: spawn_agent(cfgs[u], tmp_path / f"{u}.log") for u in users}
    rng = random.Random(651)
    lives = dict.fromkeys(users, 0)
    try:
        for k in range(KILLS):
            u = users[k % len(users)]
            # Each life gets past the imports (the cache records its start), then dies at a
            # random instant of its work: resubscription, retained state, manifest fetch,
            # launches (the process launches every host every 30 ms).
            await eventually(
                lambda u=u: _count_events(cfgs[u].cache_path)[0] > lives[u], 30, f"{u} to start"
            )
            lives[u] += 1
            await asyncio.sleep(rng.uniform(0.0, 0.6))
            if k % 2 == 0:
                await admin.apply(rollout.step())
            procs[u].send_signal(signal.SIGKILL)
            procs[u].wait(10)
            assert integrity(cfgs[u].cache_path) == "ok", f"kill {k}: {u}'s cache is corrupt"
            procs[u] = spawn_agent(cfgs[u], tmp_path / f"{u}.log")
    finally:
        for p in procs.values():
            p.kill()
            p.wait(10)
    check_caches(tmp_path, users)
    agents = await start_agents(tmp_path, broker, server, users)
    try:
        assert await converge(agents, admin.truth) == {}
    finally:
        await stop_agents(agents)
    check_caches(tmp_path, users)
    # The kills landed in the middle of real work: every life started, and changes applied.
    counts = {u: _count_events(cfgs[u].cache_path) for u in users}
    assert sum(started for started, _ in counts.values()) >= KILLS, counts
    assert sum(applied for _, applied in counts.values()) > 0, counts


def _count_events(path: str) -> tuple[int, int]:
    import sqlite3

    if not Path(path).exists():
        return 0, 0
    with sqlite3.connect(path) as c:
        if not c.execute("SELECT 1 FROM sqlite_master WHERE name='events'").fetchone():
            return 0, 0
        started = c.execute("SELECT count(*) FROM events WHERE kind='started'").fetchone()[0]
        applied = c.execute("SELECT count(*) FROM events WHERE kind='applied'").fetchone()[0]
    return int(started), int(applied)


async def test_twenty_percent_offline_across_five_changes(
    tmp_path: Path, system: tuple[MosquittoBroker, Server, Admin]
) -> None:
    broker, server, admin = system
    rollout = Rollout(seed=660)
    for _ in range(3):
        await admin.apply(rollout.step())
    agents = await start_agents(tmp_path, broker, server, USERS)
    try:
        assert await converge(agents, admin.truth) == {}
        offline = USERS[3:5]  # 2 of 10
        await stop_agents({u: agents[u] for u in offline})
        online = {u: a for u, a in agents.items() if u not in offline}
        for _ in range(5):
            await admin.apply(rollout.step())
            assert await converge(online, admin.truth) == {}
        for u in offline:
            agents[u] = Agent(agent_config(tmp_path, broker, server, u))
            await agents[u].start()
        assert await converge(agents, admin.truth) == {}
    finally:
        await stop_agents(agents)
    check_caches(tmp_path, USERS)


async def test_duplicated_and_reordered_messages(
    tmp_path: Path, system: tuple[MosquittoBroker, Server, Admin]
) -> None:
    broker, server, admin = system
    rollout = Rollout(seed=670)
    users = USERS[:6]
    async with Collector(broker.port) as wire:
        agents = await start_agents(tmp_path, broker, server, users)
        try:
            for _ in range(6):
                await admin.apply(rollout.step())
            assert await converge(agents, admin.truth) == {}
            rng = random.Random(671)
            async with aiomqtt.Client("127.0.0.1", broker.port) as replayer:
                for round_ in range(4):
                    # Every message seen so far comes again, shuffled and some twice, while
                    # new changes keep coming: duplicates, and stale messages arriving after
                    # fresher ones.
                    old = [(t, p) for t, p, _ in wire.messages if "/report/" not in t]
                    burst = old + rng.sample(old, len(old) // 2)
                    rng.shuffle(burst)
                    for i, (topic, payload) in enumerate(burst):
                        await replayer.publish(topic, _json(payload), qos=1, retain=False)
                        if i == len(burst) // 2:
                            await admin.apply(rollout.step())
                    await admin.apply(rollout.step())
                    assert await converge(agents, admin.truth) == {}, f"round {round_}"
            stale = sum(a.stats["stale"] for a in agents.values())
            assert stale > 0  # the replays did reach the agents and were ignored
        finally:
            await stop_agents(agents)
    check_caches(tmp_path, users)


def _json(payload: dict[str, object]) -> bytes:
    import json

    return json.dumps(payload).encode()


async def test_concurrent_cache_commits_do_not_interleave(tmp_path: Path) -> None:
    """Regression (found by the kill test): two transitions committed at once by different
    tasks (a launch and a connection event) interleaved on the aiosqlite path — the second
    BEGIN failed and its ROLLBACK undid the first one's half-written transaction."""
    from agent.cache import Cache, Tx

    cache = await Cache.open(tmp_path / "c.sqlite")
    try:

        async def transition(i: int) -> None:
            tx = Tx()
            for j in range(5):
                tx.event("test", f"{i}.{j}")
            await cache.commit(tx)

        await asyncio.gather(*(transition(i) for i in range(30)))
        rows = await cache.fetchall("SELECT count(*) AS n FROM events WHERE kind='test'")
        assert rows[0]["n"] == 150
    finally:
        await cache.close()

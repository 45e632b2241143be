"""Fault suite, broker side: Mosquitto killed with SIGKILL at random moments of a rollout
(10 times), and restarted gracefully with and without persistence while changes happen.

After each: the broker's retained state equals the server's (0 lost changes), the outbox is
drained, every cache passes `PRAGMA integrity_check`, every client converges to the
oracle, and no add-in was removed or downgraded on the way.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from fault_helpers import (
    USERS,
    Admin,
    Rollout,
    Server,
    agent_config,
    converge,
    integrity,
    org_actions,
    regressions,
)
from server_helpers import eventually, retained_state

from agent.daemon import Agent
from simulator.mosquitto import MosquittoBroker


async def _setup(
    tmp: Path, broker: MosquittoBroker, users: tuple[str, ...]
) -> tuple[Server, Admin, dict[str, Agent]]:
    server = Server(tmp, broker)
    server.start()
    agents: dict[str, Agent] = {}
    try:
        admin = Admin(server)
        for a in org_actions():
            await admin.apply(a)
        agents = {u: Agent(agent_config(tmp, broker, server, u)) for u in users}
        await asyncio.gather(*(a.start() for a in agents.values()))
    except BaseException:  # the caller's cleanup only covers a setup that succeeded
        await asyncio.gather(*(a.stop() for a in agents.values()), return_exceptions=True)
        server.kill()
        raise
    return server, admin, agents


async def _nothing_lost(server: Server, broker: MosquittoBroker) -> None:
    await eventually(lambda: server.unpublished() == 0, 20, "the outbox to drain")
    on_broker = await retained_state(broker.port)
    assert on_broker == server.retained_rows()


def _caches_ok(tmp: Path, users: tuple[str, ...]) -> None:
    for u in users:
        cache = tmp / f"{u}-pc.sqlite"
        assert integrity(cache) == "ok"
        assert regressions(cache) == [], (u, regressions(cache))


async def test_broker_sigkilled_10_times_during_rollout(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    users = USERS[:6]
    server, admin, agents = await _setup(tmp_path, broker, users)
    rollout = Rollout(seed=610)
    rng = random.Random(611)
    try:
        for _ in range(10):
            # Changes keep coming, and the kill lands at a random moment among them: while
            # the server publishes, while agents fetch or resubscribe, or while it is down.
            for _ in range(rng.randint(1, 3)):
                await admin.apply(rollout.step())
                await asyncio.sleep(rng.uniform(0, 0.15))
            broker.kill()
            await asyncio.sleep(rng.uniform(0, 0.3))
            if rng.random() < 0.5:
                await admin.apply(rollout.step())  # committed while the broker is down
            broker.restart()
        assert await converge(agents, admin.truth, timeout=60) == {}
        await _nothing_lost(server, broker)
    finally:
        await asyncio.gather(*(a.stop() for a in agents.values()), return_exceptions=True)
        server.kill()
    _caches_ok(tmp_path, users)


@pytest.mark.parametrize("persistence", [False, True], ids=["no-persistence", "persistence"])
async def test_broker_restarted_with_and_without_persistence(
    tmp_path: Path, broker_factory: Callable[..., MosquittoBroker], persistence: bool
) -> None:
    broker = broker_factory(persistence=persistence)
    users = USERS[:5]
    server, admin, agents = await _setup(tmp_path, broker, users)
    rollout = Rollout(seed=620)
    try:
        for _ in range(4):
            await admin.apply(rollout.step())
        assert await converge(agents, admin.truth) == {}
        for _ in range(2):
            broker.stop()
            for _ in range(3):
                await admin.apply(rollout.step())  # committed while the broker is down
            broker.restart()
            assert await converge(agents, admin.truth, timeout=60) == {}
            await _nothing_lost(server, broker)
    finally:
        await asyncio.gather(*(a.stop() for a in agents.values()), return_exceptions=True)
        server.kill()
    log = server.log.read_text()
    republished = log.count("republishing")
    # Without persistence the broker forgets everything and the server gives it all again;
    # with it, the broker keeps the server's session and retained state.
    if persistence:
        assert republished == 1, log  # only the very first connect
    else:
        assert republished == 3, log
    _caches_ok(tmp_path, users)

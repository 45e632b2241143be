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
    Rollout,
    converge,
    eventually,
    integrity,
    nothing_lost,
    regressions,
    start_system,
    stop_agents,
)
from server_helpers import retained_state

from simulator.mosquitto import MosquittoBroker


def _caches_ok(tmp: Path, users: tuple[str, ...]) -> None:
    for u in users:
        cache = tmp / f"{u}-pc.sqlite"
        assert integrity(cache) == "ok"
        assert regressions(cache) == [], (u, regressions(cache))


async def test_broker_sigkilled_10_times_during_rollout(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    users = USERS[:6]
    server, admin, agents = await start_system(tmp_path, broker, users)
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
        await nothing_lost(server, broker)
    finally:
        await stop_agents(agents)
        server.kill()
    _caches_ok(tmp_path, users)


@pytest.mark.parametrize("persistence", [False, True], ids=["no-persistence", "persistence"])
async def test_broker_restarted_with_and_without_persistence(
    tmp_path: Path, broker_factory: Callable[..., MosquittoBroker], persistence: bool
) -> None:
    broker = broker_factory(persistence=persistence)
    users = USERS[:5]
    server, admin, agents = await start_system(tmp_path, broker, users)
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
            await nothing_lost(server, broker)
    finally:
        await stop_agents(agents)
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


@pytest.mark.parametrize("persistence", [True, False], ids=["persistence", "no-persistence"])
async def test_broker_sigkilled_after_acknowledging_changes_it_had_not_saved(
    tmp_path: Path, broker_factory: Callable[..., MosquittoBroker], persistence: bool
) -> None:
    # A long autosave: what the broker acknowledges after its last save is only in memory.
    broker = broker_factory(
        persistence=persistence, extra_config="autosave_interval 3600" if persistence else ""
    )
    server, admin, _ = await start_system(tmp_path, broker)
    rollout = Rollout(seed=630)
    try:
        await eventually(lambda: server.unpublished() == 0, 20, "the organisation to publish")
        # A graceful restart saves the broker's state, the server's session in it ...
        broker.stop()
        broker.restart()
        for _ in range(5):
            await admin.apply(rollout.step())
        # ... then it acknowledges changes it never saves, and dies.
        await eventually(lambda: server.unpublished() == 0, 20, "the changes to publish")
        broker.kill()
        broker.restart()
        # A fresh subscriber gets the server's state within seconds, not at anti-entropy.
        want = server.retained_rows()
        got: dict[str, object] = {}
        for _ in range(20):
            got = await retained_state(broker.port, quiet=0.3)
            if got == want:
                break
            await asyncio.sleep(0.2)
        assert got == want, sorted(t for t in want.keys() | got.keys() if want.get(t) != got.get(t))
    finally:
        server.kill()
    if persistence:
        assert "broker lost state" in server.log.read_text()

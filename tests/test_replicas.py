"""Two `addin-server serve` replicas on one PostgreSQL database, a real Mosquitto, a real
agent: admin writes on both, the replica draining the outbox SIGKILLed mid-stream, the other
takes over; every revision reaches the broker once and in order, the agent ends equal to the
server, and the agents' reports are shared between the replicas (each stored once).

Real processes throughout (docs/server.md, "PostgreSQL and several servers")."""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import psycopg
import pytest
from agent_helpers import addin_id, agent_config, manifest, settled
from conftest import postgres_database
from harness import ADMIN_TOKEN, ServerProcess
from server_helpers import Collector, eventually

from addin_core.protocol import AgentReport, Topic
from agent.daemon import Agent
from server_stub.pg import LEADER_LOCK
from simulator.mosquitto import MosquittoBroker

pytestmark = pytest.mark.postgresql

ADDINS = [addin_id(f"r{i}") for i in range(4)]
WRITES_PER_REPLICA = 30
KILL_AFTER = 24
"""Writes committed (both replicas together) before the leader is SIGKILLed."""
TAKEOVER_WITHIN = 10.0
"""Seconds the standby has to drain what the killed leader left (it polls every 0.5 s)."""


@pytest.fixture
def pg_url() -> Any:
    with postgres_database() as url:
        yield url


class Replica(ServerProcess):
    def __init__(self, url: str, broker: MosquittoBroker, log: Path) -> None:
        super().__init__(url, broker.url, log=log, admin_user="ann")

    def leads(self, since: int = 0) -> bool:
        return "this replica drains the outbox now" in self._log_since(since)

    def stands_by(self, since: int) -> bool:
        return "standing by" in self._log_since(since)

    async def revision(self) -> int:
        async with httpx.AsyncClient(timeout=5) as h:
            return int((await h.get(f"{self.url}/healthz")).json()["revision"])


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def _outbox(url: str) -> tuple[list[tuple[str, int]], int]:
    """Every (topic, revision) committed to the outbox, and how many are not published."""
    with psycopg.connect(url) as c:
        rows = c.execute("SELECT topic, revision FROM outbox ORDER BY id").fetchall()
        (waiting,) = c.execute(
            "SELECT count(*) FROM outbox WHERE published_at IS NULL"
        ).fetchone() or (0,)
    return [(str(t), int(r)) for t, r in rows], int(waiting)


def _leaders(url: str) -> int:
    """Sessions holding the outbox lock (server_stub/pg.py LEADER_LOCK) on this database."""
    with psycopg.connect(url) as c:
        row = c.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype='advisory' AND granted "
            "AND database=(SELECT oid FROM pg_database WHERE datname=current_database()) "
            "AND classid=%s AND objid=%s AND objsubid=2",
            LEADER_LOCK,
        ).fetchone()
    return int(row[0]) if row else 0


def _stored_reports(url: str, prefix: str) -> int:
    with psycopg.connect(url) as c:
        row = c.execute(
            "SELECT count(*) FROM reports WHERE client_id LIKE %s", (prefix + "%",)
        ).fetchone()
    return int(row[0]) if row else 0


PAUSE_ENV = "ADDIN_SERVER_PAUSE_BEFORE_MARK"
PAUSED = "not marked yet"


@pytest.fixture(params=["anywhere", "after publishing, before marking"])
def kill_at(request: pytest.FixtureRequest) -> str:
    """Where the leader is SIGKILLed: wherever it is after KILL_AFTER writes, or (through a
    pause it logs) after the broker acknowledged a batch and before the outbox says so."""
    return str(request.param)


@pytest.fixture
async def replicas(
    tmp_path: Path, pg_url: str, broker: MosquittoBroker, kill_at: str
) -> AsyncIterator[list[Replica]]:
    made = [Replica(pg_url, broker, tmp_path / f"replica{i}.log") for i in range(2)]
    try:
        made[0].start(env={PAUSE_ENV: "2"} if kill_at != "anywhere" else {})
        await eventually(made[0].leads, 15, "the first replica to take the outbox")
        made[1].start()
        yield made
    finally:
        for r in made:
            r.stop()


async def _write(urls: list[str], method: str, path: str, body: Any = None) -> int:
    """One admin write on the first replica that answers (a killed one does not)."""
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    for _ in range(40):
        for url in urls:
            try:
                async with httpx.AsyncClient(base_url=url, headers=headers, timeout=10) as h:
                    if isinstance(body, bytes):
                        r = await h.request(method, path, content=body,
                                            headers={"Content-Type": "application/xml"})  # fmt: skip
                    else:
                        r = await h.request(method, path, json=body)
            except httpx.TransportError:
                continue
            assert r.status_code == 200, f"{method} {path}: {r.status_code} {r.text}"
            return int(r.json()["revision"])
        await asyncio.sleep(0.1)
    raise AssertionError(f"no replica answered {method} {path}")


async def _writer(
    urls: list[str], mine: list[str], done: list[int], policy: bool
) -> None:
    """Assign, change the mode of, and unassign `mine` for ann, WRITES_PER_REPLICA times."""
    held: dict[str, str] = {}
    for i in range(WRITES_PER_REPLICA):
        if policy and i % 5 == 4:
            await _write(urls, "PUT", "/v1/policy", {"nested_groups": i % 10 == 4})
        else:
            a = mine[i % len(mine)]
            if held.get(a) == "optional":
                await _write(urls, "POST", f"/v1/addins/{a}/unassign",
                             {"target": "user", "target_id": "ann"})  # fmt: skip
                held.pop(a)
            else:
                mode = "fixed" if a not in held else "optional"
                await _write(urls, "POST", f"/v1/addins/{a}/assign",
                             {"target": "user", "target_id": "ann", "mode": mode})  # fmt: skip
                held[a] = mode
        done.append(1)


async def _send_reports(port: int, prefix: str, n: int) -> None:
    async with aiomqtt.Client("127.0.0.1", port, identifier=f"{prefix}sender") as c:
        for i in range(n):
            report = AgentReport(client_id=f"{prefix}{i}", user_id="bob", revision=1,
                                 reported_at=time.time(), applied=[])  # fmt: skip
            topic = str(Topic.report("contoso", f"{prefix}{i}"))
            await c.publish(topic, report.to_bytes(), qos=1)


async def test_replicas_share_writes_reports_and_the_outbox_across_a_sigkill(
    tmp_path: Path, pg_url: str, broker: MosquittoBroker, replicas: list[Replica], kill_at: str
) -> None:
    first, second = replicas
    urls = [first.url, second.url]
    assert not second.leads(), "only one replica drains the outbox"
    await _write(urls, "POST", "/v1/users", {"id": "ann", "name": "ann"})
    await _write([second.url], "POST", "/v1/users", {"id": "bob", "name": "bob"})
    for i, _ in enumerate(ADDINS):
        await _write([urls[i % 2]], "POST", "/v1/addins", manifest(f"r{i}"))

    # Reports: each one stored once, the two replicas sharing them.
    before = [_metric(u, "addin_agent_reports_received_total") for u in urls]
    await _send_reports(broker.port, "sim-", 40)
    await eventually(lambda: _stored_reports(pg_url, "sim-") == 40, 15, "40 reports stored")
    got = [_metric(u, "addin_agent_reports_received_total") - b for u, b in zip(urls, before, strict=True)]
    assert sum(got) == 40 and min(got) > 0, f"reports taken per replica: {got}"

    agent = Agent(agent_config(tmp_path, broker, second, "ann"))  # type: ignore[arg-type]
    await agent.start()
    try:
        async with Collector(broker.port) as seen:
            done: list[int] = []
            writers = [
                asyncio.create_task(_writer([first.url, second.url], ADDINS[:2], done, True)),
                asyncio.create_task(_writer([second.url, first.url], ADDINS[2:], done, False)),
            ]
            await eventually(lambda: len(done) >= KILL_AFTER, 60, f"{KILL_AFTER} writes")
            if kill_at != "anywhere":
                paused = first.log.stat().st_size
                await eventually(lambda: PAUSED in first._log_since(paused), 10, "a pause")
            first.kill()  # SIGKILL, mid-stream: the other writer goes on
            killed_at = time.monotonic()
            await eventually(second.leads, TAKEOVER_WITHIN, "the standby to take the outbox")
            took = time.monotonic() - killed_at
            offset = first.log.stat().st_size
            first.start()  # back, as a standby
            await asyncio.gather(*writers)
            await eventually(lambda: first.stands_by(offset), 10, "the restarted one to stand by")
            assert not first.leads(offset)
            assert _leaders(pg_url) == 1

            def drained() -> bool:
                rows, waiting = _outbox(pg_url)
                wanted = {(t, r) for t, r in rows}
                return not waiting and wanted <= {(t, p["revision"]) for t, p, _ in seen.messages}

            await eventually(drained, 30, "every committed message published")
            await asyncio.sleep(0.5)  # a duplicate would arrive right behind
            committed, _ = _outbox(pg_url)
            state = [(t, p["revision"]) for t, p, _ in seen.messages if "/report/" not in t]
            by_topic: dict[str, list[int]] = defaultdict(list)
            for t, r in state:
                by_topic[t].append(r)
            for t, revs in by_topic.items():
                assert revs == sorted(set(revs)), f"{t}: published {revs}"
            order = [r for _, r in state]
            assert order == sorted(order), f"revisions out of commit order: {order}"
            assert sorted(state) == sorted(committed), "each committed message once"
            if kill_at != "anywhere":
                assert "already had the" in second.log.read_text(), second.log_tail()

            await settled(agent, second, timeout=30)  # type: ignore[arg-type]
            auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
            async with httpx.AsyncClient(base_url=second.url, headers=auth, timeout=5) as h:
                user = (await h.get("/v1/users/ann")).json()
            expected = {a["addin_id"]: a["mode"] for a in user["assignments"]}
            assert {k: e.mode.value for k, e in agent.entitlements().items()} == expected
            print(json.dumps({"takeover_s": round(took, 2), "messages": len(state),
                              "revisions": len({r for _, r in state})}))  # fmt: skip
    finally:
        await agent.stop()


async def test_replicas_ride_out_postgresql_dropping_every_connection(
    tmp_path: Path, pg_url: str, broker: MosquittoBroker
) -> None:
    """pg_terminate_backend on every connection of three replicas (a PostgreSQL restart or
    failover, as they see it): the leader's lock is gone, one replica takes the outbox again,
    and writes on any are published."""
    made = [Replica(pg_url, broker, tmp_path / f"replica{i}.log") for i in range(3)]
    try:
        made[0].start()
        await eventually(made[0].leads, 15, "the first replica to take the outbox")
        made[1].start()
        made[2].start()
        urls = [r.url for r in made]
        assert _leaders(pg_url) == 1
        await _write(urls, "POST", "/v1/users", {"id": "ann", "name": "ann"})
        offsets = [r.log.stat().st_size for r in made]
        with psycopg.connect(pg_url, autocommit=True) as c:
            c.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        await eventually(lambda: any(r.leads(o) for r, o in zip(made, offsets, strict=True)),
                         15, "a replica to take the outbox again")  # fmt: skip
        async with Collector(broker.port) as seen:
            revisions = [
                await _write([urls[i % 3], urls[(i + 1) % 3]], "POST", "/v1/users",
                             {"id": f"u{i}", "name": f"u{i}"})
                for i in range(6)
            ]
            await eventually(lambda: {p["revision"] for _, p, _ in seen.messages} >= set(revisions),
                             15, "the writes after the drop published")  # fmt: skip
        assert all(r.proc is not None and r.proc.poll() is None for r in made)
        # Marked done right after the PUBACKs: a moment after the subscriber has them.
        await eventually(lambda: _outbox(pg_url)[1] == 0, 10, "the outbox marked done")
        assert _leaders(pg_url) == 1
    finally:
        for r in made:
            r.stop()

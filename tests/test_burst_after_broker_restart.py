"""A broker restart under load, against a running `addin-server serve` and a real Mosquitto:
the server gives the broker its whole state again and the fleet reports at once while admin
writes go on. `serve` runs that MQTT work on an event loop of its own
(`server_stub/loop_thread.py`) and stores the reports from the loop that serves HTTP; nothing
may be lost across the two: every report stored, every write answered and published, every
retained topic back on the broker at the database's revision."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import httpx
import pytest
from harness import ADMIN_TOKEN, ServerProcess
from server_helpers import TASKPANE_ID, TASKPANE_V1, query, retained_state

from addin_core.protocol import AgentReport, AppliedAddin, Filters, Host, Topic
from simulator.mosquitto import MosquittoBroker

USERS = 1000
"""Enough retained topics that the restore is still running when the reports arrive."""
WRITERS = 8
WRITES_EACH = 10


@pytest.fixture
def server(tmp_path: Path, broker: MosquittoBroker, db_target: str) -> Iterator[ServerProcess]:
    target = db_target if "://" in db_target else Path(db_target)
    srv = ServerProcess(target, broker.url, log=tmp_path / "server.log")
    srv.start()
    yield srv
    srv.stop()


def _report(user: str, revision: int) -> AgentReport:
    return AgentReport(
        client_id=f"dev-{user}",
        user_id=user,
        revision=revision,
        reported_at=time.time(),
        applied=[AppliedAddin(addin_id=TASKPANE_ID, version="1.0.0.0", host=Host.WORD)],
    )


async def _first_state_message(port: int) -> None:
    """Wait until the server has begun giving the restarted broker its state: it subscribes
    to the reports before it starts, so reports published from now on reach it."""
    for _ in range(200):
        try:
            async with aiomqtt.Client("127.0.0.1", port) as c:
                await c.subscribe(Filters.everything("contoso"), qos=1)
                async with asyncio.timeout(30):
                    await anext(c.messages)
                return
        except aiomqtt.MqttError:
            await asyncio.sleep(0.05)  # the broker is still starting
    raise AssertionError("the restarted broker never got any state from the server")


async def _reports_stored_again(port: int, db: str, revision: int) -> None:
    """Wait until a report published now is stored: the server's report subscription is
    back (on PostgreSQL a connection of its own, reconnecting on its own backoff; a report
    published before it is gone, and its agent would report again)."""
    canary = _report("u0000", revision).model_copy(update={"client_id": "canary"})
    async with aiomqtt.Client("127.0.0.1", port, identifier="canary") as c:
        for _ in range(60):
            await c.publish(str(Topic.report("contoso", "canary")), canary.to_bytes(), qos=1)
            for _ in range(10):
                if query(db, "SELECT 1 FROM reports WHERE client_id='canary'"):
                    return
                await asyncio.sleep(0.1)
    raise AssertionError("no report stored after the broker restart")


async def _fleet_reports(port: int, reports: list[AgentReport]) -> None:
    """The fleet reconnecting: every report at once, over two connections."""

    async def one(part: list[AgentReport], i: int) -> None:
        async with aiomqtt.Client("127.0.0.1", port, identifier=f"fleet-{i}") as c:
            await asyncio.gather(
                *(c.publish(str(Topic.report("contoso", r.client_id)), r.to_bytes(), qos=1)
                  for r in part)
            )  # fmt: skip

    await asyncio.gather(*(one(reports[i::2], i) for i in range(2)))


async def _writes(http: httpx.AsyncClient, writer: int) -> list[int]:
    """One admin's writes in a row: the revision of each (every reply must be a success)."""
    revisions = []
    for i in range(WRITES_EACH):
        r = await http.post("/v1/users", json={"id": f"w{writer}-{i}"})
        assert r.status_code == 200, r.text
        revisions.append(int(r.json()["revision"]))
    return revisions


async def test_a_broker_restart_loses_no_report_write_or_retained_topic(
    server: ServerProcess, broker: MosquittoBroker, db_target: str
) -> None:
    users = [f"u{i:04d}" for i in range(USERS)]
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with httpx.AsyncClient(base_url=server.url, headers=admin, timeout=60) as http:
        org = {
            "users": [{"id": u} for u in users],
            "addins": [{"manifest_xml": TASKPANE_V1.read_text()}],
            "assignments": [{"addin": TASKPANE_ID, "target": "everyone", "mode": "fixed"}],
        }
        r = await http.post("/v1/org", json=org)
        assert r.status_code == 200, r.text
        revision = int(query(db_target, "SELECT value FROM meta WHERE key='revision'")[0][0])

        await asyncio.to_thread(broker.restart, hard=True)  # no persistence: all state gone
        writes = [asyncio.create_task(_writes(http, w)) for w in range(WRITERS)]
        await _first_state_message(broker.port)
        await _reports_stored_again(broker.port, db_target, revision)
        await _fleet_reports(broker.port, [_report(u, revision) for u in users])
        revisions = sorted(rev for revs in await asyncio.gather(*writes) for rev in revs)

    assert len(set(revisions)) == WRITERS * WRITES_EACH
    # Every report stored (bounded wait: the intake stores them in batches).
    want = {(f"dev-{u}", revision) for u in users} | {("canary", revision)}
    stored: set[tuple[str, int]] = set()
    for _ in range(600):
        stored = {(str(c), int(r)) for c, r in query(db_target, "SELECT client_id, revision FROM reports")}  # fmt: skip
        if stored >= want:
            break
        await asyncio.sleep(0.1)
    assert stored == want
    # Every retained topic back on the broker at the database's revision: the restore
    # completed and every write of the burst was published after it.
    db_state = {
        str(t).removeprefix("addins/v1/contoso/"): int(r)
        for t, r in query(db_target, "SELECT topic, revision FROM retained")
    }
    assert {f"member/w{w}-{i}" for w in range(WRITERS) for i in range(WRITES_EACH)} <= set(db_state)
    on_broker: dict[str, int] = {}
    for _ in range(20):
        on_broker = {t: p["revision"] for t, p in (await retained_state(broker.port)).items()}
        if on_broker == db_state:
            break
        await asyncio.sleep(0.5)
    assert on_broker == db_state
    assert max(db_state.values()) == revisions[-1]

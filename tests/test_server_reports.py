"""Agents' reports, published over a real Mosquitto to a running `addin-server serve`:
ordered by what the server can trust (revision, then its own receive time), and bound to
the user of the client id's first report."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import pytest
from harness import ADMIN_TOKEN, ServerProcess
from server_helpers import TASKPANE_ID, TASKPANE_V1

from addin_core.protocol import AgentReport, AppliedAddin, Host, Topic
from simulator.mosquitto import MosquittoBroker

YEAR = 365 * 86400.0


@pytest.fixture
def server(tmp_path: Path, broker: MosquittoBroker, db_target: str) -> Iterator[ServerProcess]:
    target = db_target if "://" in db_target else Path(db_target)
    srv = ServerProcess(target, broker.url, admin_user="ann", log=tmp_path / "server.log")
    srv.start()
    yield srv
    srv.stop()


async def _setup(http: httpx.AsyncClient) -> int:
    """ann and bob, both entitled to the task pane (fixed); the revision it took."""
    for user in ("ann", "bob", "carl"):
        assert (await http.post("/v1/users", json={"id": user})).status_code == 200
    r = await http.post(
        "/v1/addins", content=TASKPANE_V1.read_bytes(), headers={"Content-Type": "application/xml"}
    )
    assert r.status_code == 200, r.text
    r = await http.post(
        f"/v1/addins/{TASKPANE_ID}/assign", json={"target": "everyone", "mode": "fixed"}
    )
    assert r.status_code == 200, r.text
    return int(r.json()["revision"])


def _report(
    client_id: str, user_id: str, revision: int, *, applied: bool, at: float | None = None
) -> AgentReport:
    return AgentReport(
        client_id=client_id,
        user_id=user_id,
        revision=revision,
        reported_at=time.time() if at is None else at,
        applied=[AppliedAddin(addin_id=TASKPANE_ID, version="1.0.0.0", host=Host.WORD)]
        if applied
        else [],
    )


async def _publish(broker: MosquittoBroker, *reports: AgentReport) -> None:
    """Publish in order over one connection, so the server receives them in this order."""
    async with aiomqtt.Client("127.0.0.1", broker.port, identifier="test-reporter") as c:
        for r in reports:
            await c.publish(str(Topic.report("contoso", r.client_id)), r.to_bytes(), qos=1)


async def _reports(http: httpx.AsyncClient, user: str) -> dict[str, dict[str, Any]]:
    ex = (await http.get("/v1/explain", params={"user": user, "addin": TASKPANE_ID})).json()
    return {r["client_id"]: r for r in ex["reports"]}


async def _until(http: httpx.AsyncClient, user: str, client_id: str, revision: int) -> None:
    """Wait (bounded) until `client_id`'s stored report for `user` has `revision`: the
    server has processed everything published before it on the same connection."""
    for _ in range(200):
        got = (await _reports(http, user)).get(client_id)
        if got is not None and got["revision"] == revision:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the server never stored {client_id}'s report at revision {revision}")


async def _reported_current(http: httpx.AsyncClient) -> int:
    st = (await http.get("/v1/status", params={"addin": TASKPANE_ID})).json()
    return int(st["addins"][0]["reported_current"])


async def test_a_report_from_a_clock_a_year_ahead_does_not_freeze_later_ones(
    server: ServerProcess, broker: MosquittoBroker
) -> None:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=10) as http:
        rev = await _setup(http)
        ahead = time.time() + YEAR
        # The clock is a year ahead, then fixed: the later reports must win anyway.
        await _publish(broker, _report("ann-laptop", "ann", rev, applied=False, at=ahead))
        await _until(http, "ann", "ann-laptop", rev)
        await _publish(broker, _report("ann-laptop", "ann", rev, applied=True))
        for _ in range(200):
            if (await _reports(http, "ann"))["ann-laptop"]["applied"]:
                break
            await asyncio.sleep(0.05)
        stored = (await _reports(http, "ann"))["ann-laptop"]
        assert stored["applied"], "a report with a correct clock was ignored"
        assert stored["reported_at"] < ahead
        assert await _reported_current(http) == 1

        # A higher revision wins whatever its clock; a lower one, received later, never does.
        await _publish(
            broker,
            _report("ann-laptop", "ann", rev + 1, applied=True, at=time.time() - YEAR),
            _report("ann-laptop", "ann", rev, applied=False, at=time.time() + YEAR),
            _report("carl-desk", "carl", 7, applied=False),  # marker: all of the above seen
        )
        await _until(http, "carl", "carl-desk", 7)
        stored = (await _reports(http, "ann"))["ann-laptop"]
        assert stored["revision"] == rev + 1 and stored["applied"]


async def test_a_forged_report_for_another_user_does_not_change_status(
    server: ServerProcess, broker: MosquittoBroker
) -> None:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=10) as http:
        rev = await _setup(http)
        # bob's workstation reports for bob (binding bob-laptop to bob), then claims ann.
        await _publish(
            broker,
            _report("bob-laptop", "bob", rev, applied=False),
            _report("bob-laptop", "ann", rev + 1, applied=True),
            _report("carl-desk", "carl", 7, applied=False),  # marker: all of the above seen
        )
        await _until(http, "carl", "carl-desk", 7)
        assert await _reported_current(http) == 0
        assert await _reports(http, "ann") == {}
        bob = (await _reports(http, "bob"))["bob-laptop"]
        assert bob["revision"] == rev and bob["applied"] == []
    server.stop()
    assert "refused a report from client 'bob-laptop' claiming user 'ann'" in server.log_tail(50)


async def test_reports_waiting_to_be_stored_are_one_per_device() -> None:
    """While the database is busy, what waits is the newest report of each device (the
    one the database would keep), not every report the broker delivered; past the cap a
    new device's report is dropped and counted."""
    from server_stub.reports import ReportIntake

    stored: list[list[AgentReport]] = []
    busy = asyncio.Event()
    free = asyncio.Event()

    async def sink(batch: list[AgentReport]) -> None:
        stored.append(batch)
        busy.set()
        await free.wait()

    intake = ReportIntake(sink, max_pending=3)
    task = asyncio.create_task(intake.run())
    try:
        intake.offer(_report("first-pc", "ann", 1, applied=False))
        await asyncio.wait_for(busy.wait(), 10)  # the writer holds its first batch
        for revision in range(2, 5002):  # a flood from one device, newest revision last
            intake.offer(_report("ann-pc", "ann", revision, applied=True))
        intake.offer(_report("ann-pc", "ann", 7, applied=True))  # older: not kept
        intake.offer(_report("bob-pc", "bob", 3, applied=False))
        intake.offer(_report("carl-pc", "carl", 3, applied=False))
        intake.offer(_report("dan-pc", "dan", 3, applied=False))  # a 4th device: dropped
        assert intake.dropped == 1
        busy.clear()
        free.set()
        for _ in range(100):  # bounded: the writer takes the next batch at once
            if len(stored) == 2:
                break
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert [(r.client_id, r.revision) for r in stored[1]] == [
        ("ann-pc", 5001), ("bob-pc", 3), ("carl-pc", 3),
    ]  # fmt: skip


async def test_a_report_nested_past_the_parsers_depth_is_refused_and_reports_go_on(
    server: ServerProcess, broker: MosquittoBroker
) -> None:
    """A device may publish anything on its report topic: JSON nested deeper than the parser
    goes is an invalid payload like any other, and the next report is stored."""
    from addin_core.protocol import InvalidPayload, decode_message

    for hostile in (b"[" * 60_000, b'{"a":' * 12_000):
        with pytest.raises(InvalidPayload, match="too deeply"):
            decode_message(str(Topic.report("contoso", "eve-pc")), hostile)
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=10) as http:
        rev = await _setup(http)
        async with aiomqtt.Client("127.0.0.1", broker.port, identifier="eve-pc") as c:
            for hostile in (b"[" * 60_000, b'{"a":' * 12_000):
                await c.publish(str(Topic.report("contoso", "eve-pc")), hostile, qos=1)
        await _publish(broker, _report("ann-laptop", "ann", rev, applied=True))
        await _until(http, "ann", "ann-laptop", rev)
    assert server.proc is not None and server.proc.poll() is None


@pytest.mark.parametrize("hostile", [b"[" * 60_000, b'{"revision": ' * 12_000, b"\xff\xfe"])
async def test_a_hostile_marker_left_on_the_broker_does_not_stall_the_publisher(
    tmp_path: Path, broker: MosquittoBroker, hostile: bytes
) -> None:
    """The server reads its own retained marker (`server/published`) when it reconnects to
    a session; on a broker without an ACL anyone may have replaced it. JSON nested past the
    parser's depth raised RecursionError out of the receive loop, which ended: no marker, no
    reports, /readyz never ready again, nothing published, nothing logged."""
    from addin_core.protocol import server_topic

    marker = server_topic("contoso", "published")
    srv = ServerProcess(tmp_path / "server.db", broker.url)
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    async def ready(http: httpx.AsyncClient) -> None:
        for _ in range(200):  # bounded: ready once the broker session is up
            if (await http.get("/readyz")).status_code == 200:
                return
            await asyncio.sleep(0.1)
        raise AssertionError((await http.get("/readyz")).text)

    srv.start()
    try:
        async with httpx.AsyncClient(base_url=srv.url, headers=headers, timeout=10) as http:
            await ready(http)
            rev = await _setup(http)
        srv.stop()  # the broker keeps its session; the intruder replaces its marker
        async with aiomqtt.Client("127.0.0.1", broker.port, identifier="intruder") as c:
            await c.publish(marker, hostile, qos=1, retain=True)
        srv.start()
        async with httpx.AsyncClient(base_url=srv.url, headers=headers, timeout=10) as http:
            await ready(http)
            await _publish(broker, _report("ann-laptop", "ann", rev, applied=True))
            await _until(http, "ann", "ann-laptop", rev)  # reports are still taken
            r = await http.post("/v1/users", json={"id": "dora"})
            assert r.status_code == 200, r.text
            written = int(r.json()["revision"])
        # ... and published: the server's own marker replaces the intruder's.
        async with aiomqtt.Client("127.0.0.1", broker.port, identifier="reader") as c:
            await c.subscribe(marker, qos=1)
            async with asyncio.timeout(10):
                async for m in c.messages:
                    if m.payload != hostile and b'"revision": %d' % written in bytes(m.payload):
                        break
    finally:
        srv.stop()

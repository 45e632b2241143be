"""Every admin operation produces exactly the expected retained messages on a real Mosquitto;
the publisher republishes everything to a broker that lost its state."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from server_helpers import (
    GIFME_ID,
    TASKPANE_ID,
    TASKPANE_V1,
    TASKPANE_V2_PERMS,
    Collector,
    eventually,
    retained_state,
)

from addin_core.protocol import Topic, decode
from server_stub.publisher import Publisher
from server_stub.service import Conflict, NotFound, Service
from simulator.mosquitto import MosquittoBroker


async def _start_publisher(
    service: Service, db_path: str | Path, broker: MosquittoBroker
) -> tuple[Publisher, asyncio.Task[None]]:
    pub = Publisher(db_path, "contoso", broker.url, report_sink=service.record_reports)
    service.on_commit = pub.wake
    task = asyncio.create_task(pub.run())
    async with asyncio.timeout(10):
        await pub.connected.wait()
    return pub, task


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_every_operation_publishes_exactly_its_messages(
    service: Service, db_target: str, broker: MosquittoBroker
) -> None:
    _, task = await _start_publisher(service, db_target, broker)
    async with Collector(broker.port) as col:
        steps: list[tuple[Callable[[], Any], dict[str, Callable[[dict[str, Any]], bool]]]] = [
            (
                lambda: service.create_user("ann", "Ann"),
                {"member/ann": lambda p: p["groups"] == []},
            ),
            (lambda: service.create_user("bob"), {"member/bob": lambda p: p["groups"] == []}),
            (
                lambda: service.create_group("sales"),
                {"group/sales/parents": lambda p: p["parents"] == []},
            ),
            (
                lambda: service.create_group("staff"),
                {"group/staff/parents": lambda p: p["parents"] == []},
            ),
            (
                lambda: service.add_member("sales", "ann"),
                {"member/ann": lambda p: p["groups"] == ["sales"]},
            ),
            (
                lambda: service.nest("sales", "staff"),
                {"group/sales/parents": lambda p: p["parents"] == ["staff"]},
            ),
            (lambda: service.set_policy(True), {"policy": lambda p: p["nested_groups"] is True}),
            (
                lambda: service.add_lob(TASKPANE_V1.read_bytes()),
                {f"catalog/{TASKPANE_ID}": lambda p: p["version"] == "1.0.0.0" and p["enabled"]},
            ),
            (
                lambda: service.assign(TASKPANE_ID, "everyone", None, "fixed"),
                {f"assign/everyone/{TASKPANE_ID}": lambda p: p["mode"] == "fixed"},
            ),
            (
                lambda: service.assign(TASKPANE_ID, "group", "sales", "optional"),
                {f"assign/group/sales/{TASKPANE_ID}": lambda p: p["mode"] == "optional"},
            ),
            (
                lambda: service.assign(TASKPANE_ID, "user", "bob", "available"),
                {f"assign/user/bob/{TASKPANE_ID}": lambda p: p["mode"] == "available"},
            ),
            (
                lambda: service.set_enabled(TASKPANE_ID, False),
                {f"catalog/{TASKPANE_ID}": lambda p: p["enabled"] is False},
            ),
            (
                lambda: service.set_enabled(TASKPANE_ID, True),
                {f"catalog/{TASKPANE_ID}": lambda p: p["enabled"] is True},
            ),
            # Permissions changed: stored as needs_consent; the entry keeps the consented
            # version and names the withheld one.
            (
                lambda: service.add_lob(TASKPANE_V2_PERMS.read_bytes()),
                {
                    f"catalog/{TASKPANE_ID}": lambda p: (
                        p["version"] == "1.0.0.0" and p["withheld"]["version"] == "2.0.0.0"
                    )
                },
            ),
            (
                lambda: service.consent(TASKPANE_ID),
                {
                    f"catalog/{TASKPANE_ID}": lambda p: (
                        p["version"] == "2.0.0.0" and "withheld" not in p
                    )
                },
            ),
            (
                lambda: service.add_store("WA104379501"),
                {
                    f"catalog/{GIFME_ID}": lambda p: (
                        p["source"] == "store" and p["version"] == "1.0.0"
                    )
                },
            ),
            (
                lambda: service.store_publish("WA104379501", "1.1.0"),
                {f"catalog/{GIFME_ID}": lambda p: p["version"] == "1.1.0"},
            ),
            (
                lambda: service.unassign(TASKPANE_ID, "user", "bob"),
                {f"assign/user/bob/{TASKPANE_ID}": lambda p: p["deleted"] is True},
            ),
            (
                lambda: service.remove_member("sales", "ann"),
                {"member/ann": lambda p: p["groups"] == []},
            ),
            (
                lambda: service.unnest("sales", "staff"),
                {"group/sales/parents": lambda p: p["parents"] == []},
            ),
            (
                lambda: service.delete_group("staff"),
                {"group/staff/parents": lambda p: p["deleted"]},
            ),
            (
                lambda: service.assign(GIFME_ID, "group", "sales", "fixed"),
                {f"assign/group/sales/{GIFME_ID}": lambda p: p["mode"] == "fixed"},
            ),
            (
                lambda: service.add_member("sales", "ann"),
                {"member/ann": lambda p: p["groups"] == ["sales"]},
            ),
            (
                lambda: service.delete_group("sales"),
                {
                    "member/ann": lambda p: p["groups"] == [],
                    "group/sales/parents": lambda p: p["deleted"],
                    f"assign/group/sales/{GIFME_ID}": lambda p: p["deleted"],
                    f"assign/group/sales/{TASKPANE_ID}": lambda p: p["deleted"],
                },
            ),
            (
                lambda: service.remove_addin(TASKPANE_ID),
                {
                    f"catalog/{TASKPANE_ID}": lambda p: p["deleted"],
                    f"assign/everyone/{TASKPANE_ID}": lambda p: p["deleted"],
                },
            ),
            (lambda: service.delete_user("bob"), {"member/bob": lambda p: p["deleted"]}),
        ]
        for i, (op, expected) in enumerate(steps):
            result = await op()
            rev = result["revision"]
            assert rev == i + 1, result
            await col.wait_for(rev, set(expected))
        # A refused operation commits nothing and publishes nothing.
        with pytest.raises(Conflict):
            await service.create_user("ann")
        with pytest.raises(NotFound):
            await service.add_member("nosuchgroup", "ann")
        await service.create_user("last")  # a marker: everything before it has been delivered
        await col.wait_for(len(steps) + 1, {"member/last"})
        for i, (_, expected) in enumerate(steps):
            got = col.by_revision(i + 1)
            assert set(got) == set(expected), f"step {i + 1}: {sorted(got)}"
            for topic, check in expected.items():
                assert check(got[topic]), (topic, got[topic])
                decode(Topic.parse(f"addins/v1/contoso/{topic}"), _json(got[topic]))
        # Each commit's payloads carry its revision and commit time.
        assert all("committed_at" in p for _, p, _ in col.messages)
    await _stop(task)

    # A fresh subscriber sees the final state, tombstones included.
    state = await retained_state(broker.port)
    assert state["member/ann"]["groups"] == []
    assert state[f"catalog/{TASKPANE_ID}"] == {
        "deleted": True,
        "revision": 25,
        "committed_at": state[f"catalog/{TASKPANE_ID}"]["committed_at"],
    }
    assert state[f"catalog/{GIFME_ID}"]["version"] == "1.1.0"
    assert state["policy"]["nested_groups"] is True


def _json(p: dict[str, Any]) -> bytes:
    import json

    return json.dumps(p).encode()


async def test_group_assignment_is_one_publish_whatever_the_group_size(
    service: Service, db_target: str, broker: MosquittoBroker
) -> None:
    org = {
        "users": [{"id": f"u{i:04d}"} for i in range(500)],
        "groups": [{"id": "big", "members": [f"u{i:04d}" for i in range(500)]}],
        "addins": [{"manifest_xml": TASKPANE_V1.read_text()}],
    }
    loaded = await service.load_org(org)
    assert loaded["memberships"] == 500
    _, task = await _start_publisher(service, db_target, broker)
    async with Collector(broker.port) as col:
        r = await service.assign(TASKPANE_ID, "group", "big", "fixed")
        await col.wait_for(r["revision"], {f"assign/group/big/{TASKPANE_ID}"})
        marker = await service.create_user("marker")
        await col.wait_for(marker["revision"], {"member/marker"})
        assert set(col.by_revision(r["revision"])) == {f"assign/group/big/{TASKPANE_ID}"}
    await _stop(task)


async def test_broker_restarted_without_persistence_gets_full_state_again(
    service: Service, db_target: str, broker: MosquittoBroker
) -> None:
    await service.create_user("ann")
    await service.create_group("sales")
    await service.add_member("sales", "ann")
    await service.add_lob(TASKPANE_V1.read_bytes())
    await service.assign(TASKPANE_ID, "group", "sales", "fixed")
    await service.create_user("gone")
    await service.delete_user("gone")
    pub, task = await _start_publisher(service, db_target, broker)
    before = await retained_state(broker.port)
    assert set(before) == {
        "member/ann",
        "member/gone",
        "group/sales/parents",
        f"catalog/{TASKPANE_ID}",
        f"assign/group/sales/{TASKPANE_ID}",
    }
    assert before["member/gone"]["deleted"] is True

    broker.restart(hard=True)  # SIGKILL, no persistence: retained state and sessions gone
    assert await retained_state(broker.port, quiet=0.3) == {}
    await eventually(lambda: pub.republished_all == 2, what="republish after broker restart")
    after = await retained_state(broker.port)
    assert after == before
    await _stop(task)


async def test_broker_restart_with_session_kept_does_not_republish(
    service: Service, db_target: str, broker_factory: Callable[..., MosquittoBroker]
) -> None:
    broker = broker_factory(persistence=True)
    await service.create_user("ann")
    pub, task = await _start_publisher(service, db_target, broker)
    await asyncio.sleep(0.3)
    broker.restart()  # graceful: Mosquitto saves sessions and retained messages
    await eventually(lambda: pub.connections == 2 and pub.connected.is_set(), what="reconnect")
    r = await service.create_user("bob")
    async with Collector(broker.port) as col:
        await col.wait_for(r["revision"], {"member/bob"})
        assert col.count("member/ann") == 1  # the retained copy only
    assert pub.republished_all == 1
    await _stop(task)


async def test_agent_reports_are_stored_and_explained(
    service: Service, db_target: str, broker: MosquittoBroker
) -> None:
    import time

    import aiomqtt

    from addin_core.protocol import AgentReport, AppliedAddin, Host

    await service.create_user("ann")
    await service.add_lob(TASKPANE_V1.read_bytes())
    await service.assign(TASKPANE_ID, "user", "ann", "fixed")
    _, task = await _start_publisher(service, db_target, broker)
    report = AgentReport(
        client_id="ann-laptop",
        user_id="ann",
        revision=3,
        reported_at=time.time(),
        applied=[AppliedAddin(addin_id=TASKPANE_ID, version="1.0.0.0", host=Host.WORD)],
    )
    async with aiomqtt.Client("127.0.0.1", broker.port) as c:
        await c.publish(str(Topic.report("contoso", "ann-laptop")), report.to_bytes(), qos=1)
    for _ in range(200):
        st = await service.status(TASKPANE_ID)
        if st["addins"][0]["reported_current"] == 1:
            break
        await asyncio.sleep(0.05)
    assert st["addins"][0]["to_install"] == 1
    ex = await service.explain("ann", TASKPANE_ID)
    assert ex["entitled"] and ex["mode"] == "fixed"
    assert ex["reports"][0]["client_id"] == "ann-laptop"
    assert ex["reports"][0]["applied"] == [
        {"addin_id": TASKPANE_ID, "version": "1.0.0.0", "host": "Word"}
    ]
    await _stop(task)


async def test_a_burst_of_reports_is_stored_in_batches_newest_wins(
    service: Service, db_target: str, broker: MosquittoBroker
) -> None:
    """After a rollout thousands of agents report at once: every one is stored (batched
    transactions), and a client's older report never replaces its newer one."""
    import aiomqtt

    from addin_core.protocol import AgentReport

    _, task = await _start_publisher(service, db_target, broker)

    def report(client: str, at: float, revision: int) -> bytes:
        return AgentReport(
            client_id=client, user_id="u", revision=revision, reported_at=at, applied=[]
        ).to_bytes()

    async with aiomqtt.Client("127.0.0.1", broker.port) as c:
        for i in range(400):
            await c.publish(
                str(Topic.report("contoso", f"ws{i}")), report(f"ws{i}", 10.0, 1), qos=1
            )
        # ws7's newer report, then an older one arriving late (reordered)
        await c.publish(str(Topic.report("contoso", "ws7")), report("ws7", 20.0, 5), qos=1)
        await c.publish(str(Topic.report("contoso", "ws7")), report("ws7", 15.0, 3), qos=1)
    rows: list[Any] = []
    for _ in range(200):
        rows = list(await service.database.rows("SELECT client_id, revision FROM reports"))
        if len(rows) == 400:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)  # let the late, older ws7 report be written (or refused)
    rows = list(await service.database.rows("SELECT client_id, revision FROM reports"))
    by_client = {r[0]: r[1] for r in rows}
    assert len(by_client) == 400
    assert by_client["ws7"] == 5 and by_client["ws0"] == 1
    await _stop(task)

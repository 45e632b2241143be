"""The generated Mosquitto password and ACL files, enforced by a real Mosquitto."""

from __future__ import annotations

import asyncio
import json
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from server_helpers import TASKPANE_ID, TASKPANE_V1, Collector, eventually

from addin_core.protocol import Filters, Topic
from server_stub import db
from server_stub.broker_config import hash_password
from server_stub.publisher import Publisher
from server_stub.service import Service
from simulator.mosquitto import MosquittoBroker

T = "addins/v1/contoso"


def _client(port: int, creds: dict[str, Any], user: str, client_id: str) -> aiomqtt.Client:
    return aiomqtt.Client(
        "127.0.0.1",
        port,
        username=user,
        password=creds["agents"][user],
        identifier=client_id,
        protocol=aiomqtt.ProtocolVersion.V5,
    )


async def _drain(c: aiomqtt.Client, quiet: float = 0.5) -> dict[str, Any]:
    got: dict[str, Any] = {}
    for _ in range(10_000):
        try:
            async with asyncio.timeout(quiet):
                m = await anext(c.messages)
        except TimeoutError:
            break
        got[str(m.topic).removeprefix(T + "/")] = json.loads(bytes(m.payload))  # type: ignore[arg-type]
    return got


async def test_agent_accounts_read_only_their_topics_and_cannot_write_state(
    tmp_path: Path, broker_factory: Callable[..., MosquittoBroker], db_target: str
) -> None:
    dbfile = db_target
    database = await db.Database.open(dbfile)
    await database.bind_tenant("contoso")
    service = Service(database, "contoso")
    for u in ("ann", "bob"):
        await service.create_user(u)
    await service.create_group("sales")
    await service.add_member("sales", "bob")
    await service.add_lob(TASKPANE_V1.read_bytes())
    await service.assign(TASKPANE_ID, "user", "ann", "fixed")
    await service.assign(TASKPANE_ID, "user", "bob", "optional")
    await service.assign(TASKPANE_ID, "group", "sales", "available")
    await database.close()

    cfg = tmp_path / "brokercfg"
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "server_stub", "broker-config", str(cfg), "--db", str(dbfile)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "2 agent accounts" in out.stdout
    creds = json.loads((cfg / "credentials.json").read_text())
    assert stat.S_IMODE((cfg / "credentials.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((cfg / "passwd").stat().st_mode) == 0o600
    broker = broker_factory(password_file=cfg / "passwd", acl_file=cfg / "acl")

    server = creds["server"]
    pub = Publisher(
        dbfile, "contoso", broker.url, username=server["username"], password=server["password"]
    )
    task = asyncio.create_task(pub.run())
    await eventually(lambda: pub.republished_all == 1, what="server publishes its state")

    async with _client(broker.port, creds, "ann", "ann-laptop") as ann:
        granted = await ann.subscribe(
            [
                (Filters.catalog("contoso"), 1),
                (f"{T}/member/ann", 1),
                (Filters.assign_user("contoso", "ann"), 1),
                (Filters.assign_group("contoso", "sales"), 1),
            ]
        )
        assert [int(getattr(r, "value", r)) for r in granted] == [1, 1, 1, 1]
        seen = await _drain(ann)
        assert set(seen) == {
            f"catalog/{TASKPANE_ID}",
            "member/ann",
            f"assign/user/ann/{TASKPANE_ID}",
            f"assign/group/sales/{TASKPANE_ID}",
        }
        # Another user's topics. Mosquitto 2 answers SUBACK with a failure code or (as the
        # Debian/Ubuntu 2.0 builds do for `pattern` ACLs) grants it and then filters every
        # delivery through the ACL; either way nothing of bob's may reach ann.
        denied = await ann.subscribe(
            [
                (Filters.assign_user("contoso", "bob"), 1),
                (f"{T}/member/bob", 1),
                (f"{T}/assign/user/+/+", 1),
            ]
        )
        assert all(int(getattr(r, "value", r)) in (1, 0x80, 0x87) for r in denied)
        # `assign/user/+/+` matches ann's own topic too, so that one may come again.
        assert set(await _drain(ann, quiet=0.3)) <= {f"assign/user/ann/{TASKPANE_ID}"}
        await ann.subscribe(f"{T}/#", 1)
        everything = await _drain(ann)
        # Retained copies of exactly what ann may read: tenant-wide topics and her own.
        assert set(everything) == set(seen) | {"group/sales/parents"}
        assert not any("bob" in t for t in everything)

        # Forged state and another client's report: dropped by the broker. Own report: delivered.
        async with Collector(
            broker.port, username=server["username"], password=server["password"]
        ) as watcher:
            await ann.publish(
                str(Topic.assign_everyone("contoso", TASKPANE_ID)),
                b'{"revision": 999, "mode": "fixed"}',
                qos=1,
                retain=True,
            )
            await ann.publish(f"{T}/member/ann", b'{"revision": 999, "groups": []}', qos=1)
            await ann.publish(f"{T}/report/bob-pc", b"{}", qos=1)
            await ann.publish(f"{T}/report/ann-laptop", b'{"marker": 1}', qos=1)
            await eventually(lambda: watcher.count("report/ann-laptop") == 1, what="own report")
            assert watcher.count(f"assign/everyone/{TASKPANE_ID}") == 0
            assert all(p.get("revision") != 999 for _, p, _ in watcher.messages)
            assert watcher.count("report/bob-pc") == 0

    # Bad password: refused at CONNECT.
    bad = {"agents": {"ann": "wrong"}}
    with pytest.raises(aiomqtt.MqttError):
        async with _client(broker.port, bad, "ann", "ann-x"):
            pass
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def test_password_hash_format_is_mosquittos() -> None:
    h = hash_password("secret", salt=b"\x00" * 12)
    parts = h.split("$")
    assert parts[:3] == ["", "7", "101"]
    assert parts[3] == "AAAAAAAAAAAAAAAA"
    assert len(parts[4]) == 88  # 64-byte digest in base64


def test_rerun_keeps_existing_passwords(tmp_path: Path) -> None:
    from server_stub.broker_config import write_broker_config

    first = write_broker_config(tmp_path, "contoso", ["ann"])
    second = write_broker_config(tmp_path, "contoso", ["ann", "bob"])
    assert second["agents"]["ann"] == first["agents"]["ann"]  # type: ignore[index]
    assert second["server"] == first["server"]
    assert "bob" in second["agents"]  # type: ignore[operator]

"""The private-broker harness: starts, stops, kills and restarts a real Mosquitto."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiomqtt
import pytest

from simulator.mosquitto import MosquittoBroker


async def publish_retained(b: MosquittoBroker, topic: str, payload: bytes) -> None:
    async with aiomqtt.Client(b.host, b.port, identifier="pub") as c:
        await c.publish(topic, payload, qos=1, retain=True)


async def read_retained(b: MosquittoBroker, topic: str, timeout: float = 1.0) -> bytes | None:
    async with aiomqtt.Client(b.host, b.port) as c:
        await c.subscribe(topic, qos=1)
        try:
            async with asyncio.timeout(timeout):
                async for m in c.messages:
                    return bytes(m.payload)  # type: ignore[arg-type]
        except TimeoutError:
            return None
    return None


async def test_broker_is_private_and_accepts_connections(broker: MosquittoBroker) -> None:
    assert broker.port != 1883
    assert broker.running
    await publish_retained(broker, "t/x", b"hello")
    assert await read_retained(broker, "t/x") == b"hello"


async def test_kill_and_restart_on_same_port_loses_state_without_persistence(
    broker: MosquittoBroker,
) -> None:
    port = broker.port
    await publish_retained(broker, "t/x", b"v1")
    broker.kill()
    assert not broker.running
    with pytest.raises(aiomqtt.MqttError):
        await publish_retained(broker, "t/y", b"v2")
    broker.restart()
    assert broker.port == port
    assert await read_retained(broker, "t/x", timeout=0.5) is None


async def test_graceful_restart_with_persistence_keeps_retained_state(
    broker_factory: Callable[..., MosquittoBroker],
) -> None:
    b = broker_factory(persistence=True)
    await publish_retained(b, "t/x", b"kept")
    b.stop()
    b.restart()
    assert await read_retained(b, "t/x") == b"kept"


async def test_password_file_and_acl_are_enforced(
    broker_factory: Callable[..., MosquittoBroker], tmp_path: pytest.TempPathFactory
) -> None:
    import shutil
    import subprocess
    from pathlib import Path

    tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    pw = Path(str(tmp_path)) / "passwd"
    pw.touch()
    await asyncio.to_thread(subprocess.run, [tool, "-b", str(pw), "alice", "secret"], check=True)
    acl = Path(str(tmp_path)) / "acl"
    acl.write_text("user alice\ntopic read t/#\n")
    b = broker_factory(password_file=pw, acl_file=acl)
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client(b.host, b.port, username="alice", password="wrong"):
            pass
    async with aiomqtt.Client(b.host, b.port, username="alice", password="secret") as c:
        await c.subscribe("t/#")

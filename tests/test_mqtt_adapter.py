"""addin_runtime/mqtt.py: the aiomqtt/paho internals it reads are still there, and its guards
fall back cleanly when they are not."""

from __future__ import annotations

import asyncio
from importlib.metadata import version
from types import SimpleNamespace
from typing import Any

import aiomqtt
import pytest
from paho.mqtt.client import MQTT_LOG_ERR

from addin_runtime import mqtt
from addin_runtime.reconnect import SESSION_TAKEN_OVER, disconnect_code


@pytest.mark.parametrize("dist", sorted(mqtt.CHECKED_AGAINST))
def test_installed_versions_are_the_ones_the_adapter_was_checked_against(dist: str) -> None:
    """Fails on purpose after an upgrade: re-read aiomqtt's client.py for ``_client``,
    ``_queue``, ``_disconnected`` and ``_connected`` (and paho's ``on_connect``,
    ``on_message``, ``on_disconnect`` and ``on_log`` signatures), then update
    `CHECKED_AGAINST`."""
    assert version(dist) == mqtt.CHECKED_AGAINST[dist], (
        f"{dist} {version(dist)} is installed, addin_runtime/mqtt.py was checked against "
        f"{mqtt.CHECKED_AGAINST[dist]}: check the private attributes it reads, then update it"
    )


async def test_the_installed_aiomqtt_has_every_internal_the_adapter_reads() -> None:
    client = aiomqtt.Client("127.0.0.1", 1)
    assert mqtt.paho_client(client) is not None
    assert mqtt.disconnected_future(client) is not None
    assert mqtt.has_direct_delivery(client)
    assert mqtt.watch_session_present(client, lambda _present: None)
    assert mqtt.fail_fast_before_connack(client)


async def test_a_loss_before_the_connack_fails_the_connect_with_pahos_words() -> None:
    client = aiomqtt.Client("127.0.0.1", 1)
    assert mqtt.fail_fast_before_connack(client)
    paho = mqtt.paho_client(client)
    assert paho is not None and paho.on_log is not None and paho.on_disconnect is not None
    alert = "failed to receive on socket: [SSL: SSLV3_ALERT_CERTIFICATE_REVOKED] revoked"
    paho.on_log(paho, None, MQTT_LOG_ERR, alert)
    paho.on_disconnect(paho, None, None, 7, None)
    waiting = client._connected
    with pytest.raises(aiomqtt.MqttError, match="CERTIFICATE_REVOKED"):
        await asyncio.wait_for(waiting, 5)


async def test_after_the_connack_paho_formats_no_log_line_for_us() -> None:
    """An on_log makes paho format every log line (one per packet): it goes at the CONNACK."""
    client = aiomqtt.Client("127.0.0.1", 1)
    assert mqtt.fail_fast_before_connack(client)
    paho = mqtt.paho_client(client)
    assert paho is not None and paho.on_log is not None and paho.on_connect is not None
    paho.on_connect(paho, None, SimpleNamespace(session_present=False), 0, None)
    assert paho.on_log is None
    assert client._connected.done() and client._connected.exception() is None


async def test_session_present_is_seen_before_aiomqtt_handles_the_connack() -> None:
    client = aiomqtt.Client("127.0.0.1", 1)
    paho = mqtt.paho_client(client)
    assert paho is not None
    order: list[str] = []
    paho.on_connect = lambda *_a: order.append("aiomqtt")
    assert mqtt.watch_session_present(client, lambda present: order.append(f"seen {present}"))
    paho.on_connect(paho, None, SimpleNamespace(session_present=True), 0, None)
    assert order == ["seen True", "aiomqtt"]


async def test_direct_delivery_hands_over_queued_messages_first_then_paho_callbacks() -> None:
    client = aiomqtt.Client("127.0.0.1", 1)
    queue: asyncio.Queue[Any] = client._queue
    queue.put_nowait(SimpleNamespace(topic="t/1", payload=b"one"))
    got: list[tuple[str, bytes]] = []
    gone = mqtt.deliver_directly(client, lambda t, p: got.append((t, p)))
    assert gone is mqtt.disconnected_future(client)
    paho = mqtt.paho_client(client)
    assert paho is not None
    paho.on_message(paho, None, SimpleNamespace(topic="t/2", payload="two"))
    assert got == [("t/1", b"one"), ("t/2", b"two")]


def test_guards_fall_back_when_the_internals_are_gone(caplog: pytest.LogCaptureFixture) -> None:
    bare = SimpleNamespace()  # an aiomqtt that renamed every internal
    assert mqtt.paho_client(bare) is None
    assert not mqtt.has_direct_delivery(bare)
    assert mqtt.deliver_directly(bare, lambda t, p: None) is None
    assert not mqtt.watch_session_present(bare, lambda _present: None)
    assert not mqtt.fail_fast_before_connack(bare)
    assert "session-present flag is unknown" in caplog.text
    # Without the future the reason comes from the exception alone, never a crash.
    err = SimpleNamespace(rc=SESSION_TAKEN_OVER)
    assert disconnect_code(None, bare) is None
    assert disconnect_code(_with_rc(err.rc), bare) == SESSION_TAKEN_OVER


def _with_rc(rc: int) -> Exception:
    e = Exception("lost")
    e.rc = rc  # type: ignore[attr-defined]
    return e

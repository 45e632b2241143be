"""addin_runtime/mqtt.py: the aiomqtt/paho internals it reads are still there, and its guards
fall back cleanly when they are not."""

from __future__ import annotations

import asyncio
from importlib.metadata import version
from types import SimpleNamespace
from typing import Any

import aiomqtt
import pytest
from paho.mqtt.client import MQTT_LOG_ERR, time_func

from addin_runtime import mqtt
from addin_runtime.reconnect import SESSION_TAKEN_OVER, disconnect_code
from simulator.mosquitto import MosquittoBroker


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
    assert mqtt.wake_only_when_due(client)


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
    assert not mqtt.wake_only_when_due(bare)
    assert "session-present flag is unknown" in caplog.text
    # Without the future the reason comes from the exception alone, never a crash.
    err = SimpleNamespace(rc=SESSION_TAKEN_OVER)
    assert disconnect_code(None, bare) is None
    assert disconnect_code(_with_rc(err.rc), bare) == SESSION_TAKEN_OVER


def test_the_keepalive_loop_sleeps_until_pahos_check_is_due() -> None:
    """What `loop_misc` waits for: a keepalive without traffic either way, or the answer to
    a PINGREQ; never longer than one keepalive, never a busy loop."""
    inner = SimpleNamespace(_keepalive=60, _last_msg_out=0.0, _last_bytes_received=0.0, _ping_t=0)
    now = time_func()
    inner._last_msg_out, inner._last_bytes_received = now - 10, now - 20  # quiet for 20 s in
    assert 39 < mqtt._until_due(inner) <= 40  # type: ignore[arg-type]
    inner._last_bytes_received = now
    assert 49 < mqtt._until_due(inner) <= 50  # type: ignore[arg-type]
    inner._ping_t = now - 55  # a PINGREQ unanswered for 55 s: look again in 5 s
    inner._last_msg_out = now
    assert 4 < mqtt._until_due(inner) <= 5  # type: ignore[arg-type]
    inner._ping_t, inner._last_msg_out = 0, now - 100  # overdue: at once, but not a spin
    assert mqtt._until_due(inner) == mqtt.MIN_MISC_SLEEP  # type: ignore[arg-type]
    inner._keepalive = 0
    assert mqtt._until_due(inner) == mqtt.IDLE_MISC_SLEEP  # type: ignore[arg-type]


async def test_an_idle_connection_is_kept_alive_by_a_timely_ping(broker: MosquittoBroker) -> None:
    """A real broker drops a client silent for 1.5 keepalives: across two keepalives of
    silence the PINGREQs keep the connection, and paho's check ran a handful of times, not
    once a second (aiomqtt's own loop: 11 times in these 11 s)."""
    client = aiomqtt.Client(broker.host, broker.port, keepalive=5, identifier="idle-ping")
    assert mqtt.wake_only_when_due(client)
    paho = mqtt.paho_client(client)
    assert paho is not None
    checks = 0
    real_loop_misc = paho.loop_misc

    def counted() -> Any:
        nonlocal checks
        checks += 1
        return real_loop_misc()

    paho.loop_misc = counted  # type: ignore[method-assign]
    async with client:
        await client.subscribe("idle/echo", qos=1)
        await asyncio.sleep(11)
        assert paho.is_connected()
        await client.publish("idle/echo", b"still here", qos=1)
        async with asyncio.timeout(5):
            async for message in client.messages:
                assert message.payload == b"still here"
                break
    assert 2 <= checks <= 5, checks


def _with_rc(rc: int) -> Exception:
    e = Exception("lost")
    e.rc = rc  # type: ignore[attr-defined]
    return e

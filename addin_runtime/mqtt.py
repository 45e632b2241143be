"""The one module that reads aiomqtt's and paho's private attributes.

aiomqtt wraps a paho client and exposes none of the five things the agent and the
server need, so both reach into it here and nowhere else:

- the CONNACK session-present flag (the server's publisher must give a broker that lost
  its session all retained state again): paho's ``on_connect`` callback, held by aiomqtt
  as ``Client._client``, is wrapped;
- delivery straight from paho's message callback (`deliver_directly`): aiomqtt's
  ``messages`` iterator costs a Task and an ``asyncio.wait`` per message, most of a
  fan-out's CPU with thousands of agents in one process; this reads ``Client._client``,
  ``Client._queue`` (what arrived before the switch) and ``Client._disconnected``;
- the reason code of a lost connection (`disconnected_future`): recorded only in
  ``Client._disconnected``, not in the fresh error the message iterator raises;
- why a connection was lost before the broker's CONNACK (`fail_fast_before_connack`): a
  broker refusing the client's certificate sends its TLS alert only then (TLS 1.3), paho
  only logs it, and aiomqtt ignores that loss and waits for its timeout; this wraps paho's
  ``on_disconnect`` and ``on_log`` and ends ``Client._connected`` with paho's words;
- an idle connection that does not wake the process every second (`wake_only_when_due`):
  aiomqtt calls paho's ``loop_misc`` (keepalive pings, a missing PINGRESP) once a second
  whatever the keepalive; this replaces ``Client._misc_loop`` with one that sleeps until
  the moment paho's keepalive check has something to do, from paho's ``_keepalive``,
  ``_last_msg_out``, ``_last_bytes_received`` and ``_ping_t``.

Each access is guarded: it checks the attribute exists and has the expected type, and
otherwise says so (`watch_session_present` and `deliver_directly` return False/None and
the caller uses its slower public path; `disconnected_future` returns None). The guard
keeps an upgrade from crashing the programs; tests/test_mqtt_adapter.py keeps it from
passing unnoticed: it pins the versions below and fails until someone has re-read
aiomqtt's client.py and updated `CHECKED_AGAINST`. Every read is marked ``# private:``
with the attribute it reads, as aiomqtt marks its own reads of paho's internals.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import aiomqtt
import paho.mqtt.client as paho

log = logging.getLogger("addin_runtime.mqtt")

CHECKED_AGAINST = {"aiomqtt": "2.5.1", "paho-mqtt": "2.2.0"}
"""The versions whose internals this module was written against (see the module doc)."""


def paho_client(client: object) -> paho.Client | None:
    """The paho client inside an aiomqtt client, or None if this aiomqtt holds none."""
    inner = getattr(client, "_client", None)  # private: aiomqtt.Client._client
    return inner if isinstance(inner, paho.Client) else None


def disconnected_future(client: object | None) -> asyncio.Future[None] | None:
    """aiomqtt's future that completes (with the broker's reason) when the link is lost."""
    gone = getattr(client, "_disconnected", None)  # private: aiomqtt.Client._disconnected
    return gone if isinstance(gone, asyncio.Future) else None


def _queued(client: object) -> asyncio.Queue[Any] | None:
    queue = getattr(client, "_queue", None)  # private: aiomqtt.Client._queue
    return queue if isinstance(queue, asyncio.Queue) else None


def watch_session_present(client: object, seen: Callable[[bool], None]) -> bool:
    """Call ``seen(session_present)`` at every CONNACK, then aiomqtt's own handler.

    False (and a warning) when this aiomqtt has no paho ``on_connect`` to wrap: the caller
    must then assume no session is present, which is always safe (it republishes)."""
    inner_client = paho_client(client)
    inner = getattr(inner_client, "on_connect", None)
    if inner_client is None or not callable(inner):
        log.warning(
            "this aiomqtt hides paho's on_connect (checked against %s): the broker's "
            "session-present flag is unknown and taken as absent",
            CHECKED_AGAINST,
        )
        return False

    def on_connect(c: Any, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        seen(bool(getattr(flags, "session_present", False)))
        inner(c, userdata, flags, rc, props)

    inner_client.on_connect = on_connect
    return True


def has_direct_delivery(client: object) -> bool:
    """Whether this aiomqtt has the internals `deliver_directly` uses."""
    return (
        hasattr(paho_client(client), "on_message")
        and _queued(client) is not None
        and disconnected_future(client) is not None
    )


def deliver_directly(
    client: object, on_message: Callable[[str, bytes], None]
) -> asyncio.Future[None] | None:
    """Route paho's message callback to ``on_message(topic, payload)``, in order, after
    handing over what aiomqtt had queued; return the future that completes when the
    connection is lost. None, with nothing changed, when this aiomqtt lacks the internals:
    the caller then iterates ``client.messages``.

    PUBACK timing is unchanged: paho acknowledges when its callback returns, as it does
    with aiomqtt's."""
    inner, queue, gone = paho_client(client), _queued(client), disconnected_future(client)
    if inner is None or queue is None or gone is None:
        return None

    def on_paho_message(_client: object, _userdata: object, message: Any) -> None:
        on_message(message.topic, payload_bytes(message.payload))

    inner.on_message = on_paho_message
    while not queue.empty():
        m = queue.get_nowait()
        on_message(str(m.topic), payload_bytes(m.payload))
    return gone


def fail_fast_before_connack(client: object) -> bool:
    """When paho loses the connection before the broker's CONNACK, make aiomqtt's connect
    fail at once with ``MqttError(paho's error text)`` (e.g. ``failed to receive on socket:
    [SSL: SSLV3_ALERT_CERTIFICATE_REVOKED] ...``) instead of "Operation timed out" at its
    timeout. False, with nothing changed, when this aiomqtt lacks the internals: the connect
    then times out as before."""
    inner = paho_client(client)
    aiomqtt_on_disconnect = getattr(inner, "on_disconnect", None)
    aiomqtt_on_connect = getattr(inner, "on_connect", None)
    if (
        inner is None
        or not callable(aiomqtt_on_disconnect)
        or not callable(aiomqtt_on_connect)
        or not isinstance(getattr(client, "_connected", None), asyncio.Future)
    ):
        return False
    last_error: list[str] = []

    def on_connect(c: Any, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        # With an on_log paho formats every log line, one per packet: CPU per message for
        # thousands of agents in one process. Only the errors before the CONNACK matter.
        inner.on_log = None
        aiomqtt_on_connect(c, userdata, flags, rc, props)

    def on_log(_c: object, _userdata: object, level: int, text: str) -> None:
        if level == paho.MQTT_LOG_ERR:
            last_error[:] = [text]

    def on_disconnect(c: Any, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        waiting = getattr(client, "_connected", None)  # private: aiomqtt.Client._connected
        if isinstance(waiting, asyncio.Future) and not waiting.done():
            why = last_error[0] if last_error else f"connection lost before the CONNACK ({rc})"

            def fail() -> None:
                if not waiting.done():
                    waiting.set_exception(aiomqtt.MqttError(why))
                    # Marked as retrieved: when aiomqtt's connect had already timed out,
                    # nobody awaits it and asyncio logged "Future exception was never
                    # retrieved" (seen in a NATS connect storm).
                    waiting.exception()

            # paho calls back on the event loop's thread under aiomqtt, but not promised.
            waiting.get_loop().call_soon_threadsafe(fail)
        aiomqtt_on_disconnect(c, userdata, flags, rc, props)

    inner.on_log = on_log
    inner.on_disconnect = on_disconnect
    inner.on_connect = on_connect
    return True


MIN_MISC_SLEEP = 0.05
"""Never loop faster than this (a deadline just reached, rounding of the clocks)."""
IDLE_MISC_SLEEP = 60.0
"""With keepalive 0 (none) paho's check does nothing: look once a minute anyway."""

_DUE_ATTRS = ("_keepalive", "_last_msg_out", "_last_bytes_received", "_ping_t")


def wake_only_when_due(client: object) -> bool:
    """Make aiomqtt call paho's ``loop_misc`` when paho's keepalive check can next act,
    instead of every second: an idle agent then wakes once per keepalive (60 s by default)
    to send its PINGREQ, at the moment paho would have sent it, and a missing PINGRESP is
    noticed at the same moment as before (paho's timestamps only ever move forward, so
    nothing falls due before the computed time). False, with nothing changed, when this
    aiomqtt or paho lacks the internals: the once-a-second loop stays."""
    inner = paho_client(client)
    if (
        inner is None
        or not callable(getattr(client, "_misc_loop", None))  # private: aiomqtt.Client._misc_loop
        or not all(isinstance(getattr(inner, a, None), int | float) for a in _DUE_ATTRS)
    ):
        return False

    async def misc_loop() -> None:
        # A deadline, not a condition to poll for: the timestamps are paho's, moved by its
        # own reads and writes, with no event to wait on.
        while inner.loop_misc() == paho.MQTT_ERR_SUCCESS:  # noqa: ASYNC110
            await asyncio.sleep(_until_due(inner))

    client._misc_loop = misc_loop  # type: ignore[attr-defined]  # private: aiomqtt.Client._misc_loop
    return True


def _until_due(inner: paho.Client) -> float:
    """Seconds until paho's `loop_misc` can next act (the sums mirror its checks)."""
    keepalive = inner._keepalive  # private: paho.Client._keepalive
    if not keepalive:
        return IDLE_MISC_SLEEP
    due = min(
        inner._last_msg_out,  # private: paho.Client._last_msg_out
        inner._last_bytes_received,  # private: paho.Client._last_bytes_received
    )
    ping_t = inner._ping_t  # private: paho.Client._ping_t (a PINGREQ awaiting its answer)
    if ping_t > 0:
        due = min(due, ping_t)
    return min(max(due + keepalive - paho.time_func(), MIN_MISC_SLEEP), float(keepalive))


def payload_bytes(payload: object) -> bytes:
    """A message payload as bytes, whichever type the client handed over."""
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    if isinstance(payload, str):
        return payload.encode()
    if payload is None:
        return b""
    return str(payload).encode()

"""MQTT transport (aiomqtt, MQTT 5 or 3.1.1): persistent session, QoS 1, reconnect forever.

Knows nothing of add-ins: it delivers (topic, payload) to a callback, keeps the broker's
subscriptions equal to the set it is given, and publishes reports. Session expiry is at
least 7 days; clean start only on the very first connect of this agent (the caller
remembers that in the cache), so messages published while it is offline are queued.
On every reconnect it re-subscribes (retain handling 0: send retained state), so the
agent converges even when the broker lost its sessions. A broker that speaks only MQTT
3.1.1 gets 3.1.1 (``mqtt_version``; addin_runtime/mqtt_version.py says what each MQTT 5
feature becomes).

With a `tls_context` (an ``mqtts://`` broker, agent/tls.py) the link is TLS with the device
certificate; a TLS failure (the broker's certificate not trusted, the device's refused:
revoked, expired, another CA) is logged as an error saying so and reported as kind
``tls_failed``, and the agent keeps retrying with its last state, as for any loss.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Literal

import aiomqtt
from paho.mqtt.client import MQTT_CLEAN_START_FIRST_ONLY
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from addin_runtime.mqtt import (
    deliver_directly,
    fail_fast_before_connack,
    payload_bytes,
    wake_only_when_due,
)
from addin_runtime.mqtt_version import MqttVersion, VersionChoice
from addin_runtime.reconnect import (
    Backoff,
    LossClassifier,
    LossKind,
    disconnect_code,
    flapping_text,
    taken_over_text,
)
from addin_runtime.tasks import cancel_and_wait
from agent import tls
from agent.subscriptions import reconcile

log = logging.getLogger("addin_agent.transport")

MIN_BACKOFF, MAX_BACKOFF = 0.5, 60.0
"""Reconnect delay: from ~`MIN_BACKOFF` s, doubling (jittered) up to `MAX_BACKOFF` s."""
STABLE_AFTER = 30.0
"""A connection must last this many seconds before the backoff starts again from the
bottom; a shorter one (a broker that accepts and then drops us) keeps it growing."""
STOP_TIMEOUT = 10.0
"""Seconds `Transport.stop` waits for the connection task before giving up on it."""
SUBSCRIBE_RETRY = (2.0, 120.0)
"""First and longest wait (seconds, doubling) before subscribing again to filters the broker
refused in its SUBACK, on the same connection."""


def refused_filters(filters: Sequence[str], granted: Sequence[object]) -> list[str]:
    """The filters whose SUBACK code is a failure (0x80 and up: 3.1.1's "failure", MQTT 5's
    "not authorized", "quota exceeded", ...). paho gives ReasonCode objects or ints."""
    out = []
    for f, rc in zip(filters, granted, strict=False):
        code = getattr(rc, "value", rc)
        if not isinstance(code, int) or code >= 0x80:
            out.append(f)
    # A SUBACK listing fewer codes than filters leaves the rest unconfirmed: refused too.
    return out + list(filters[len(granted) :])


MessageHandler = Callable[[str, bytes], Awaitable[None]]
ConnectHandler = Callable[[bool], Awaitable[None]]
"""Called after each (re)connect and subscribe; the argument is the session-present flag."""
Loss = LossKind | Literal["tls_failed"]
DisconnectHandler = Callable[[str, Loss], Awaitable[None]]
RefusedHandler = Callable[[list[str]], Coroutine[Any, Any, None]]
"""Called with the filters a SUBACK refused (they are subscribed again later), and with an
empty list once a later round has them all granted."""
"""Called after each failed attempt or lost connection: what happened, in words, and its
kind: ``session_taken_over`` when the broker said another client connected with our id
(MQTT 5 reason 0x8E), ``connection_flapping`` when it keeps closing our connection right
after accepting it without saying why (probably the same), ``tls_failed`` when TLS refused
the link (either side's certificate), else ``disconnected``."""


class Transport:
    def __init__(
        self,
        *,
        host: str,
        port: int,
        client_id: str,
        username: str | None,
        password: str | None,
        session_expiry: int,
        keepalive: int,
        on_message: MessageHandler,
        on_connect: ConnectHandler,
        on_disconnect: DisconnectHandler,
        desired: Callable[[], set[str]],
        clean_start_first: bool,
        min_backoff: float | None = None,
        max_backoff: float | None = None,
        tls_context: ssl.SSLContext | None = None,
        mqtt_version: MqttVersion = "auto",
        on_refused: RefusedHandler | None = None,
        source_address: str | None = None,
    ) -> None:
        self.host, self.port, self.client_id = host, port, client_id
        self.source_address = source_address
        self.version = VersionChoice(mqtt_version)
        self.tls_context = tls_context
        self.username, self.password = username, password
        self.session_expiry, self.keepalive = session_expiry, keepalive
        self.on_message, self.on_connect, self.on_disconnect = on_message, on_connect, on_disconnect
        self.desired = desired
        self.clean_start = clean_start_first
        self.backoff = Backoff(
            MIN_BACKOFF if min_backoff is None else min_backoff,
            MAX_BACKOFF if max_backoff is None else max_backoff,
            stable_after=STABLE_AFTER,
        )
        self.taken_over = 0
        """Times the broker disconnected us because another client took our client id."""
        self.losses = LossClassifier(STABLE_AFTER)
        """What each lost connection most likely was (a client id clash or not)."""
        self.client: aiomqtt.Client | None = None
        self.subscribed: set[str] = set()
        self.connected = asyncio.Event()
        self.first_attempt = asyncio.Event()
        self.attempts = 0
        self._task: asyncio.Task[None] | None = None
        self._sub_lock = asyncio.Lock()
        self.on_refused = on_refused
        self.refused_subscriptions = 0
        """Filters the broker refused in a SUBACK so far (each retried later)."""
        self._sub_retry: asyncio.Task[None] | None = None
        self._side_tasks: set[asyncio.Task[None]] = set()
        self._sub_retry_delay = SUBSCRIBE_RETRY[0]
        self._stopping = False
        self._wake: asyncio.Event | None = None
        """Set by `stop` so a delivery loop that lost its cancellation still sees it."""

    def start(self) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name=f"mqtt-{self.client_id}")

    async def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """End the connection task: within `timeout` seconds, or log it and move on."""
        task, self._task = self._task, None
        if self._sub_retry is not None:
            self._sub_retry.cancel()
        if task is not None:
            self._stopping = True
            if self._wake is not None:
                self._wake.set()
            await cancel_and_wait(task, timeout, f"MQTT task of {self.client_id}")
        self.connected.clear()

    def _make_client(self) -> aiomqtt.Client:
        v311 = self.version.v311
        props = None
        if not v311:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.session_expiry
        client = aiomqtt.Client(
            self.host,
            self.port,
            identifier=self.client_id,
            username=self.username,
            password=self.password,
            protocol=self.version.protocol,
            # 3.1.1 has no session expiry: the session lasts as long as the broker keeps it.
            clean_session=self.clean_start if v311 else None,
            clean_start=MQTT_CLEAN_START_FIRST_ONLY if v311 else self.clean_start,
            properties=props,
            keepalive=self.keepalive,
            timeout=10,
            tls_context=self.tls_context,
            bind_address=self.source_address or "",
        )
        # A broker refusing our certificate says so only after the handshake: without this
        # the attempt would end 10 s later as "Operation timed out".
        fail_fast_before_connack(client)
        # aiomqtt's keepalive loop woke every agent once a second; now once per keepalive.
        wake_only_when_due(client)
        return client

    async def _run(self) -> None:
        while not self._stopping:
            self.attempts += 1
            client: aiomqtt.Client | None = None
            try:
                client = self._make_client()
                async with client:
                    self.backoff.connected()
                    self.client = client
                    # After the first successful connect the session must persist.
                    self.clean_start = False
                    self.subscribed = set()
                    await self.sync_subscriptions()
                    self.connected.set()
                    self.first_attempt.set()
                    log.info(
                        "connected to %s:%d as %s (MQTT %s)",
                        self.host,
                        self.port,
                        self.client_id,
                        self.version.name,
                    )
                    await self.on_connect(True)
                    if not await self._deliver_directly(client):
                        # an aiomqtt without the internals: its public iterator
                        async for message in client.messages:
                            await self.on_message(
                                str(message.topic), payload_bytes(message.payload)
                            )
                # The message iterator only ends when the connection does.
                raise aiomqtt.MqttError("connection closed")
            except asyncio.CancelledError:
                raise
            except Exception as e:  # every failure of the link, incl. auth, reconnects
                self.client = None
                if self.version.fall_back(e):
                    log.warning(
                        "broker %s:%d refused MQTT 5 (%s): speaking MQTT 3.1.1 from now on",
                        self.host,
                        self.port,
                        e,
                    )
                    continue
                was = self.connected.is_set()
                self.connected.clear()
                self.first_attempt.set()
                delay = self.backoff.failed()
                what, kind = self._explain_loss(e, client, was, delay)
                with contextlib.suppress(Exception):
                    await self.on_disconnect(what, kind)
                await asyncio.sleep(delay)

    def _explain_loss(
        self, e: Exception, client: aiomqtt.Client | None, was: bool, delay: float
    ) -> tuple[str, Loss]:
        """Log why the link failed, in words a helpdesk can act on; return them and the
        kind of loss (the event recorded)."""
        up = self.backoff.last_uptime
        kind = self.losses.classify(disconnect_code(e, client), up if was else None)
        retry = (
            f"reconnect attempt {self.attempts + 1} in {delay:.1f}s "
            f"({self.backoff.failures} failures in a row)"
        )
        tls_words = tls.explain(e, "broker") if self.tls_context is not None else None
        if tls_words is not None:
            log.error("broker %s:%d: %s; %s", self.host, self.port, tls_words, retry)
            return tls_words, "tls_failed"
        if kind == "session_taken_over":
            self.taken_over += 1
            what = taken_over_text(self.client_id)
        elif kind == "connection_flapping":
            what = flapping_text(self.client_id, up or 0.0, self.losses.short_drops)
        else:
            state = "connection lost" if was else "unreachable"
            log.warning("broker %s:%d %s (%s); %s", self.host, self.port, state, e, retry)
            return str(e), kind
        log.error("broker %s:%d: %s; %s", self.host, self.port, what, retry)
        return what, kind

    async def _deliver_directly(self, client: aiomqtt.Client) -> bool:
        """Hand each message to `on_message`, in order, straight from paho's callback;
        False when this aiomqtt lacks the internals (`addin_runtime.mqtt`).

        aiomqtt's `messages` iterator builds a `Message` and, for every message, a Task for
        its queue and an `asyncio.wait` on it and the disconnect future. With thousands of
        agents in one process (the simulator) that was most of a fan-out's cost: 10,000
        clients, Everyone-step notified p99 1.9 s this way vs 1.05 s directly, against a bare
        aiomqtt fan-out of ~1.0 s.
        """
        inbox: collections.deque[tuple[str, bytes]] = collections.deque()
        wake = asyncio.Event()

        def arrived(topic: str, payload: bytes) -> None:
            inbox.append((topic, payload))
            wake.set()

        gone = deliver_directly(client, arrived)
        if gone is None:
            return False
        gone.add_done_callback(lambda _f: wake.set())
        self._wake = wake
        while not self._stopping:
            while inbox and not self._stopping:
                topic, payload = inbox.popleft()
                await self.on_message(topic, payload)
            if gone.done():
                cause = None if gone.cancelled() else gone.exception()
                # aiomqtt's own words, so the log reads the same with either path.
                raise aiomqtt.MqttError("Disconnected during message iteration") from cause
            wake.clear()
            if not inbox and not self._stopping:
                await wake.wait()
        raise asyncio.CancelledError()  # stopping: a lost cancellation, raised again

    async def sync_subscriptions(self) -> None:
        """Make the broker's subscriptions equal `desired()` (no-op while offline). A filter
        the broker refuses (an ACL, a NATS node that could not make the JetStream consumer in
        time) is not counted as held: it is logged and subscribed again later, with backoff,
        on the same connection (the others keep delivering meanwhile)."""
        client = self.client
        if client is None:
            return
        async with self._sub_lock:
            diff = reconcile(self.subscribed, self.desired())
            if diff.subscribe:
                # 3.1.1 has no subscribe options; it always sends retained messages.
                if self.version.v311:
                    granted = await client.subscribe([(f, 1) for f in diff.subscribe])
                else:
                    opts = SubscribeOptions(qos=1, retainHandling=0)
                    granted = await client.subscribe([(f, opts) for f in diff.subscribe])
                refused = refused_filters(diff.subscribe, list(granted))
                self.subscribed |= set(diff.subscribe) - set(refused)
                log.debug("subscribed %s", ", ".join(diff.subscribe))
                if refused:
                    self._retry_subscriptions(client, refused)
                elif self._sub_retry_delay != SUBSCRIBE_RETRY[0]:  # earlier refusals cleared
                    self._sub_retry_delay = SUBSCRIBE_RETRY[0]
                    self._tell_refused([])
            if diff.unsubscribe:
                await client.unsubscribe(list(diff.unsubscribe))
                self.subscribed -= set(diff.unsubscribe)
                log.debug("unsubscribed %s", ", ".join(diff.unsubscribe))

    def _tell_refused(self, refused: list[str]) -> None:
        if self.on_refused is not None:
            task: asyncio.Task[None] = asyncio.create_task(self.on_refused(refused))
            self._side_tasks.add(task)
            task.add_done_callback(self._side_tasks.discard)

    def _retry_subscriptions(self, client: aiomqtt.Client, refused: list[str]) -> None:
        self.refused_subscriptions += len(refused)
        delay = self._sub_retry_delay
        self._sub_retry_delay = min(delay * 2, SUBSCRIBE_RETRY[1])
        log.warning(
            "broker %s:%d refused the subscription to %s; subscribing again in %.1f s",
            self.host,
            self.port,
            ", ".join(refused),
            delay,
        )
        self._tell_refused(refused)
        if self._sub_retry is not None and not self._sub_retry.done():
            return

        async def again() -> None:
            await asyncio.sleep(delay)
            self._sub_retry = None  # a refusal again schedules the next try
            if self.client is client and not self._stopping:  # same connection, still up
                with contextlib.suppress(aiomqtt.MqttError):  # a lost link reconnects anyway
                    await self.sync_subscriptions()

        self._sub_retry = asyncio.create_task(again(), name=f"resubscribe-{self.client_id}")

    async def publish(self, topic: str, payload: bytes) -> bool:
        client = self.client
        if client is None:
            return False
        try:
            await client.publish(topic, payload, qos=1, retain=False)
            return True
        except aiomqtt.MqttError as e:
            log.info("publish to %s failed: %s", topic, e)
            return False

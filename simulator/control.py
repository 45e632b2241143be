"""The simulator's own control channel over the broker (never the product's topics).

Coordinator and workers talk through messages under ``addin-sim/v1/{run}/``::

    addin-sim/v1/{run}/cmd/{seq}             coordinator -> workers   {"seq", "cmd", "args"}
    addin-sim/v1/{run}/worker/{wid}/hello    worker -> coordinator    {"wid", "pid", "host"}
    addin-sim/v1/{run}/worker/{wid}/reply    worker -> coordinator    {"wid", "replies"}
    addin-sim/v1/{run}/worker/{wid}/alive    worker -> coordinator    {"wid", "seen"} each second
    addin-sim/v1/{run}/worker/{wid}/progress worker -> coordinator    {"seq", "done", "total"}
    addin-sim/v1/{run}/baseline/{subscriber} the bare fan-out probe (paho, then aiomqtt)

Commands, hellos and replies are state, not events: each is retained and re-published by its
owner after every reconnect, so a broker restart in the middle of a scenario (a fault the
simulator injects on purpose) loses none of them. Every command has its own topic until all
workers answered it, because several run at once (convergence polling while launches
happen): one topic for "the latest command" kept only the newer of two commands published
while the broker was down. Workers obey each sequence number once, in whatever order the
broker delivers them. The heartbeat lists the commands a worker has received: the
coordinator publishes again a command a live worker has not seen, and gives up on a worker
whose heartbeat stops, instead of waiting out a command's whole timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import aiomqtt

from addin_runtime.mqtt_version import VersionChoice
from addin_runtime.tasks import cancel_and_wait
from simulator.results import RunError

log = logging.getLogger(__name__)

PREFIX = "addin-sim/v1"


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        u = urlparse(url)
        if u.scheme not in ("mqtt", "tcp") or not u.hostname:
            raise ValueError(f"broker URL {url!r}: expected mqtt://HOST:PORT")
        return cls(u.hostname, u.port or 1883, u.username, u.password)

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"


def cmd_topic(run: str, seq: int) -> str:
    return f"{PREFIX}/{run}/cmd/{seq}"


def cmd_filter(run: str) -> str:
    return f"{PREFIX}/{run}/cmd/+"


def hello_topic(run: str, wid: str) -> str:
    return f"{PREFIX}/{run}/worker/{wid}/hello"


def reply_topic(run: str, wid: str) -> str:
    return f"{PREFIX}/{run}/worker/{wid}/reply"


def alive_topic(run: str, wid: str) -> str:
    return f"{PREFIX}/{run}/worker/{wid}/alive"


def worker_filter(run: str) -> str:
    return f"{PREFIX}/{run}/worker/+/+"


def baseline_topic(run: str) -> str:
    return f"{PREFIX}/{run}/baseline"


def parse_worker_topic(run: str, topic: str) -> tuple[str, str] | None:
    parts = topic.split("/")
    if len(parts) == 6 and parts[:4] == [*PREFIX.split("/"), run, "worker"]:
        return parts[4], parts[5]
    return None


Handler = Callable[[str, Any], Awaitable[None]]
"""handler(topic, data): the payload parsed from JSON, or its bytes with ``raw=True``."""

CLOSE_TIMEOUT = 10.0


class ControlChannel:
    """One reconnecting MQTT client that keeps its own retained messages published.

    With `deliver_clears`, a retained message deleted by its owner reaches the handler as
    ``{}`` (the worker learns that the coordinator has every answer to a command)."""

    def __init__(
        self,
        broker: BrokerAddress,
        name: str,
        subscriptions: list[str],
        handler: Handler,
        *,
        deliver_clears: bool = False,
        raw: bool = False,
    ):
        self.broker = broker
        self.identifier = f"addin-sim-{name}-{uuid.uuid4().hex[:6]}"
        self.subscriptions = subscriptions
        self.handler = handler
        self.deliver_clears = deliver_clears
        self.raw = raw
        """Hand the handler the payload's bytes, unparsed (a signed state payload must be
        sent again byte for byte)."""
        self._sticky: dict[str, bytes] = {}
        self._client: aiomqtt.Client | None = None
        self._version = VersionChoice("auto")
        """MQTT 5, or 3.1.1 on a broker that refuses 5 (NATS)."""
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.connected_since = 0.0
        """`time.monotonic()` of the latest (re)connect; 0 while disconnected."""
        self._last_error = ""
        """Why the latest connection attempt failed, for `start`'s error."""

    async def start(self, timeout: float = 30.0) -> None:
        self._task = asyncio.create_task(self._run(), name=f"control-{self.identifier}")
        try:
            async with asyncio.timeout(timeout):
                await self._connected.wait()
        except TimeoutError:
            await self.close()
            why = f": {self._last_error}" if self._last_error else ""
            raise RunError(
                f"cannot reach the broker {self.broker.host}:{self.broker.port} "
                f"in {timeout:g} s{why}"
            ) from None

    async def _run(self) -> None:
        delay = 0.2
        while not self._closing:
            try:
                async with aiomqtt.Client(
                    self.broker.host,
                    self.broker.port,
                    identifier=self.identifier,
                    username=self.broker.username,
                    password=self.broker.password,
                    protocol=self._version.protocol,
                    timeout=30,
                    max_queued_outgoing_messages=0,
                ) as client:
                    for s in self.subscriptions:
                        await client.subscribe(s, qos=1)
                    # State published meanwhile found no client: loop until nothing is new,
                    # then hand the client over without an await in between.
                    sent: dict[str, bytes] = {}
                    while todo := [(t, p) for t, p in self._sticky.items() if sent.get(t) != p]:
                        for topic, payload in todo:
                            await client.publish(topic, payload, qos=1, retain=True)
                            sent[topic] = payload
                    self._client = client
                    self.connected_since = time.monotonic()
                    self._connected.set()
                    delay = 0.2
                    async for message in client.messages:
                        data: Any
                        if self.raw:
                            if message.payload:
                                await self.handler(str(message.topic), bytes(message.payload))
                            continue
                        if not message.payload:
                            if not self.deliver_clears:
                                continue
                            data = {}
                        else:
                            try:
                                data = json.loads(bytes(message.payload))
                            except ValueError:
                                log.warning(
                                    "ignoring malformed control message on %s", message.topic
                                )
                                continue
                        await self.handler(str(message.topic), data)
            except aiomqtt.MqttError as e:
                if self._closing:
                    return
                self._last_error = str(e)
                if self._version.fall_back(e):
                    continue
                log.info(
                    "control channel %s lost the broker (%s); reconnecting", self.identifier, e
                )
            finally:
                self._client = None
                self.connected_since = 0.0
                self._connected.clear()
            await asyncio.sleep(delay)
            delay = min(2.0, delay * 2)

    async def publish_state(self, topic: str, data: dict[str, Any]) -> None:
        """Publish retained and remember it, so it is published again after a reconnect:
        while the broker is away there is nothing to wait for."""
        payload = json.dumps(data, separators=(",", ":")).encode()
        self._sticky[topic] = payload
        await self._publish_once(topic, payload, retain=True)

    async def publish(self, topic: str, data: dict[str, Any] | bytes) -> None:
        """A plain message (bytes as they are), retried for up to 60 s while the broker is
        away."""
        payload = data if isinstance(data, bytes) else json.dumps(data).encode()
        for _ in range(600):
            if await self._publish_once(topic, payload, retain=False):
                return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"control channel could not publish on {topic} for 60 s")

    async def publish_if_connected(self, topic: str, data: dict[str, Any]) -> None:
        """A plain message whose next one supersedes it (progress, heartbeat): never waits."""
        await self._publish_once(topic, json.dumps(data).encode(), retain=False)

    async def _publish_once(self, topic: str, payload: bytes, retain: bool) -> bool:
        client = self._client
        if client is None:
            return False
        try:
            await client.publish(topic, payload, qos=1, retain=retain)
            return True
        except aiomqtt.MqttError:
            return False  # the connection is going; a reconnect republishes sticky state

    async def clear(self, topic: str) -> None:
        """Forget a retained message and delete it from the broker (best effort: a broker
        that lost it, or a run that ends, needs nothing more)."""
        self._sticky.pop(topic, None)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await self._publish_once(topic, b"", retain=True)

    async def close(self) -> None:
        self._closing = True
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task, CLOSE_TIMEOUT, f"control channel {self.identifier}")

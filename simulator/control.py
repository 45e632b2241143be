"""The simulator's own control channel over the broker (never the product's topics).

Coordinator and workers talk through retained messages under ``addin-sim/v1/{run}/``::

    addin-sim/v1/{run}/cmd                   coordinator -> workers   {"seq", "cmd", "args"}
    addin-sim/v1/{run}/worker/{wid}/hello    worker -> coordinator    {"wid", "pid", "host"}
    addin-sim/v1/{run}/worker/{wid}/reply    worker -> coordinator    {"seq", "result"}
    addin-sim/v1/{run}/baseline              the bare fan-out probe

Every message is state, not an event: the latest command and each worker's latest reply are
retained and re-published by their owner after every reconnect. So a broker restart in the
middle of a scenario (a fault the simulator injects on purpose) loses nothing — each side
sees the other's latest state again, and sequence numbers make repeats harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import aiomqtt

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


def cmd_topic(run: str) -> str:
    return f"{PREFIX}/{run}/cmd"


def hello_topic(run: str, wid: str) -> str:
    return f"{PREFIX}/{run}/worker/{wid}/hello"


def reply_topic(run: str, wid: str) -> str:
    return f"{PREFIX}/{run}/worker/{wid}/reply"


def worker_filter(run: str) -> str:
    return f"{PREFIX}/{run}/worker/+/+"


def baseline_topic(run: str) -> str:
    return f"{PREFIX}/{run}/baseline"


def parse_worker_topic(run: str, topic: str) -> tuple[str, str] | None:
    parts = topic.split("/")
    if len(parts) == 6 and parts[:4] == [*PREFIX.split("/"), run, "worker"]:
        return parts[4], parts[5]
    return None


Handler = Callable[[str, dict[str, Any]], Awaitable[None]]


class ControlChannel:
    """One reconnecting MQTT client that keeps its own retained messages published."""

    def __init__(
        self, broker: BrokerAddress, name: str, subscriptions: list[str], handler: Handler
    ):
        self.broker = broker
        self.identifier = f"addin-sim-{name}-{uuid.uuid4().hex[:6]}"
        self.subscriptions = subscriptions
        self.handler = handler
        self._sticky: dict[str, bytes] = {}
        self._client: aiomqtt.Client | None = None
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    async def start(self, timeout: float = 30.0) -> None:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._connected.wait(), timeout)

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
                    protocol=aiomqtt.ProtocolVersion.V5,
                    timeout=30,
                    max_queued_outgoing_messages=0,
                ) as client:
                    for s in self.subscriptions:
                        await client.subscribe(s, qos=1)
                    for topic, payload in list(self._sticky.items()):
                        await client.publish(topic, payload, qos=1, retain=True)
                    self._client = client
                    self._connected.set()
                    delay = 0.2
                    async for message in client.messages:
                        if not message.payload:
                            continue
                        try:
                            data = json.loads(bytes(message.payload))
                        except ValueError:
                            log.warning("ignoring malformed control message on %s", message.topic)
                            continue
                        await self.handler(str(message.topic), data)
            except aiomqtt.MqttError as e:
                if self._closing:
                    return
                log.info(
                    "control channel %s lost the broker (%s); reconnecting", self.identifier, e
                )
            finally:
                self._client = None
                self._connected.clear()
            await asyncio.sleep(delay)
            delay = min(2.0, delay * 2)

    async def publish_state(self, topic: str, data: dict[str, Any]) -> None:
        """Publish retained and remember it, so it is published again after a reconnect."""
        payload = json.dumps(data, separators=(",", ":")).encode()
        self._sticky[topic] = payload
        await self._publish(topic, payload, retain=True)

    async def publish(self, topic: str, data: dict[str, Any]) -> None:
        await self._publish(topic, json.dumps(data).encode(), retain=False)

    async def _publish(self, topic: str, payload: bytes, retain: bool) -> None:
        for _ in range(600):
            client = self._client
            if client is not None:
                try:
                    await client.publish(topic, payload, qos=1, retain=retain)
                    return
                except aiomqtt.MqttError:
                    pass  # a reconnect republishes sticky state; plain messages retry here
            await asyncio.sleep(0.1)
        raise RuntimeError(f"control channel could not publish on {topic} for 60 s")

    async def clear(self, topic: str) -> None:
        self._sticky.pop(topic, None)
        with contextlib.suppress(Exception):
            await self._publish(topic, b"", retain=True)

    async def close(self) -> None:
        self._closing = True
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

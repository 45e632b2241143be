"""Bare MQTT fan-out: the floor the agents' propagation is compared with.

One bare subscriber per client (no agent, no SQLite, no HTTP), one QoS 1 publish, and the
time until every subscriber has it. Two kinds of subscriber, same connection settings (MQTT 5
falling back to 3.1.1, QoS 1, the same topic):

- `paho`: plain paho-mqtt callbacks driven by the event loop's own readers and writers, the
  cheapest subscriber an agent could be; the floor the notify ratio is computed against.
- `aiomqtt`: aiomqtt's message iterator (a Task and an `asyncio.wait` per message), the
  earlier floor, kept beside it for continuity.
- `download`: the paho subscriber that, on the message, GETs one real manifest from the
  run's server through one HTTP pool per worker process (the agents' `HttpPool` with the
  worker's settings): the floor of the agents' "cached" stage, which is the same fan-out plus
  one manifest download (plus what the agent adds: checks, its state, its cache).

Run inside a simulation (each worker process hosts its share, next to its agents, so the
baseline is measured on the same broker and machine) or on its own with
`addin-sim baseline --clients N`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import socket
import ssl
import struct
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import aiomqtt
import httpx
import paho.mqtt.client as paho
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.enums import CallbackAPIVersion

from addin_runtime.mqtt import paho_client
from addin_runtime.mqtt_version import VersionChoice
from addin_runtime.tasks import wait_event
from agent.http_pool import HttpPool
from simulator.control import BrokerAddress
from simulator.metrics import LatencyHistogram
from simulator.sources import source_address

CONNECT_CONCURRENCY = 50
"""Mosquitto drops connects beyond about 100 in flight; stay well below."""

Subscriber = Literal["paho", "aiomqtt", "download"]
"""A run measures paho (the floor) first, then aiomqtt, then download, one after the other:
two at once would double the broker's connections."""

HTTP_CONNECTIONS = 64
"""Connections of a worker's shared manifest pool (the agents' and the download baseline's)."""

HTTP_TIMEOUT = 30.0
"""Seconds per manifest request in a worker (the agents' and the download baseline's)."""


@dataclass(frozen=True)
class Download:
    """What the download baseline fetches: a manifest the run's server holds, as an agent
    would (`url` is the server's URL plus the catalog's manifest_url), with an agent's token;
    `ca` is the run's CA file when the server speaks https (--tls)."""

    url: str
    token: str | None = None
    ca: str | None = None

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.ca is None:
            return None
        ctx = ssl.create_default_context(cafile=self.ca)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx


class Shard(Protocol):
    received: int
    hist: LatencyHistogram

    async def connect(self) -> None: ...
    async def wait(self, timeout: float) -> None: ...
    async def close(self) -> None: ...


def make_shard(
    kind: Subscriber,
    broker: BrokerAddress,
    topic: str,
    n: int,
    prefix: str,
    download: Download | None = None,
) -> Shard:
    if kind == "paho":
        return PahoShard(broker, topic, n, prefix)
    if kind == "download":
        if download is None:
            raise ValueError("the download baseline needs a manifest URL")
        return DownloadShard(broker, topic, n, prefix, download)
    return BaselineShard(broker, topic, n, prefix)


class BaselineShard:
    """`n` bare aiomqtt subscribers on one event loop."""

    def __init__(self, broker: BrokerAddress, topic: str, n: int, prefix: str) -> None:
        self.broker, self.topic, self.n, self.prefix = broker, topic, n, prefix
        self.hist = LatencyHistogram()
        self.received = 0
        self._clients: list[aiomqtt.Client] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._all_in = asyncio.Event()

    async def connect(self) -> None:
        sem = asyncio.Semaphore(CONNECT_CONCURRENCY)

        version = VersionChoice("auto")

        def make(i: int) -> aiomqtt.Client:
            return aiomqtt.Client(
                self.broker.host,
                self.broker.port,
                identifier=f"{self.prefix}-{i}",
                username=self.broker.username,
                password=self.broker.password,
                protocol=version.protocol,
                timeout=30,
                bind_address=source_address(i, self.broker.host) or "",
            )

        async def one(i: int) -> None:
            async with sem:
                client = make(i)
                for attempt in range(10):
                    try:
                        await client.__aenter__()
                        break
                    except aiomqtt.MqttError as e:
                        # A 3.1.1-only broker (NATS): the same subscriber over 3.1.1.
                        if version.fall_back(e) or version.v311:
                            client = make(i)
                        await asyncio.sleep(0.2 * (attempt + 1))
                else:
                    raise RuntimeError(f"baseline subscriber {i} could not connect")
                await client.subscribe(self.topic, qos=1)
                self._clients.append(client)
                self._tasks.append(asyncio.create_task(self._listen(client)))

        await asyncio.gather(*(one(i) for i in range(self.n)))

    async def _listen(self, client: aiomqtt.Client) -> None:
        with contextlib.suppress(aiomqtt.MqttError, asyncio.CancelledError):
            async for message in client.messages:
                now = time.time()
                sent = json.loads(bytes(message.payload))["sent_at"]
                self.hist.record(now - sent)
                self.received += 1
                if self.received >= self.n:
                    self._all_in.set()
                return

    async def wait(self, timeout: float) -> None:
        await wait_event(self._all_in, timeout)

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for c in self._clients:
            with contextlib.suppress(Exception):
                inner = paho_client(c)
                abort_on_close(inner.socket() if inner is not None else None)
                await c.__aexit__(None, None, None)
        self._clients.clear()


class PahoShard:
    """`n` bare paho subscribers on one event loop: each socket's reads and writes are the
    loop's readers and writers, and the message callback records the latency, nothing more."""

    def __init__(self, broker: BrokerAddress, topic: str, n: int, prefix: str) -> None:
        self.broker, self.topic, self.n, self.prefix = broker, topic, n, prefix
        self.hist = LatencyHistogram()
        self.received = 0
        self._clients: list[paho.Client] = []
        self._all_in = asyncio.Event()
        self._misc: asyncio.Task[None] | None = None

    def _client(self, i: int, version: VersionChoice) -> paho.Client:
        loop = asyncio.get_running_loop()
        c = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"{self.prefix}-{i}",
            protocol=paho.MQTTv311 if version.v311 else paho.MQTTv5,
            reconnect_on_failure=False,
        )
        if self.broker.username:
            c.username_pw_set(self.broker.username, self.broker.password)

        def closed(_c: paho.Client, _u: Any, sock: Any) -> None:
            loop.remove_reader(sock)

        def written(_c: paho.Client, _u: Any, sock: Any) -> None:
            loop.remove_writer(sock)

        c.on_socket_open = lambda cl, _u, sock: loop.add_reader(sock, cl.loop_read)
        c.on_socket_close = closed
        c.on_socket_register_write = lambda cl, _u, sock: loop.add_writer(sock, cl.loop_write)
        c.on_socket_unregister_write = written
        c.on_message = self._on_message
        return c

    def _on_message(self, _c: paho.Client, _u: Any, message: paho.MQTTMessage) -> None:
        now = time.time()
        self.hist.record(now - json.loads(message.payload)["sent_at"])
        self.received += 1
        if self.received >= self.n:
            self._all_in.set()

    async def _connect_one(self, i: int, version: VersionChoice) -> paho.Client:
        loop = asyncio.get_running_loop()
        last: BaseException | None = None
        for attempt in range(10):
            c = self._client(i, version)
            connacked: asyncio.Future[Any] = loop.create_future()
            subacked: asyncio.Future[None] = loop.create_future()
            c.on_connect = lambda _c, _u, _f, rc, _p, f=connacked: f.done() or f.set_result(rc)
            c.on_subscribe = lambda _c, _u, _m, _rc, _p, f=subacked: f.done() or f.set_result(None)
            try:
                # A blocking TCP connect (as paho does it); the CONNACK comes through the loop.
                c.connect(
                    self.broker.host,
                    self.broker.port,
                    keepalive=60,
                    bind_address=source_address(i, self.broker.host) or "",
                )
                rc = await asyncio.wait_for(connacked, 30)
                if rc.is_failure:
                    raise MqttConnectError(rc)
                c.subscribe(self.topic, qos=1)
                await asyncio.wait_for(subacked, 30)
                return c
            except (OSError, TimeoutError, MqttConnectError) as e:
                last = e
                c.disconnect()
                version.fall_back(e)
                await asyncio.sleep(0.2 * (attempt + 1))
        why = f"{type(last).__name__}: {last}" if last is not None else "no attempt"
        raise RuntimeError(f"baseline subscriber {i} could not connect in 10 attempts ({why})")

    async def connect(self) -> None:
        sem = asyncio.Semaphore(CONNECT_CONCURRENCY)
        version = VersionChoice("auto")

        async def one(i: int) -> None:
            async with sem:
                self._clients.append(await self._connect_one(i, version))

        self._misc = asyncio.create_task(self._keepalive())
        await asyncio.gather(*(one(i) for i in range(self.n)))

    async def _keepalive(self) -> None:
        # paho's pings and retries, which its own loop would do, for all clients at once.
        while True:
            await asyncio.sleep(1.0)
            for c in self._clients:
                c.loop_misc()

    async def wait(self, timeout: float) -> None:
        await wait_event(self._all_in, timeout)

    async def close(self) -> None:
        if self._misc is not None:
            self._misc.cancel()
        for c in self._clients:
            with contextlib.suppress(Exception):
                abort_on_close(c.socket())
                c.disconnect()
        self._clients.clear()


class DownloadShard(PahoShard):
    """`n` bare paho subscribers on one event loop, each GETting the manifest when the probe
    arrives, through one `HttpPool` for all of them (as a worker's agents share one). The
    latency is from the publish until the manifest's bytes are read; `failed` counts the
    requests that got no 200 (they are not in the histogram)."""

    def __init__(
        self, broker: BrokerAddress, topic: str, n: int, prefix: str, download: Download
    ) -> None:
        super().__init__(broker, topic, n, prefix)
        self.download = download
        self.failed = 0
        self.http = HttpPool(
            max_connections=HTTP_CONNECTIONS,
            timeout=HTTP_TIMEOUT,
            ssl_context=download.ssl_context(),
        )
        self._headers = (
            {"Authorization": f"Bearer {download.token}"} if download.token is not None else {}
        )
        self._gets: set[asyncio.Task[None]] = set()
        self.notified = LatencyHistogram()
        """When each subscriber got the probe, while the others' downloads share its loop:
        the notify floor of a step in which every client downloads as it is notified."""

    def _on_message(self, _c: paho.Client, _u: Any, message: paho.MQTTMessage) -> None:
        sent = float(json.loads(message.payload)["sent_at"])
        self.notified.record(time.time() - sent)
        t = asyncio.get_running_loop().create_task(self._get(sent))
        self._gets.add(t)
        t.add_done_callback(self._gets.discard)

    async def _get(self, sent: float) -> None:
        try:
            resp = await self.http.get(self.download.url, headers=self._headers)
            ok = resp.status_code == 200
        except httpx.HTTPError:
            ok = False
        if ok:
            self.hist.record(time.time() - sent)
            self.received += 1
        else:
            self.failed += 1
        if self.received + self.failed >= self.n:
            self._all_in.set()

    async def close(self) -> None:
        for t in list(self._gets):
            t.cancel()
        await super().close()
        await self.http.aclose()


def abort_on_close(sock: object) -> None:
    """Close `sock` with a reset rather than the usual handshake: no TIME_WAIT is left.

    The bare subscribers connect from one address to one broker port, and each closed
    connection keeps its local port in TIME_WAIT for a minute. Three fan-outs of 19,000
    subscribers in a row left 19,000 of the 28,232 ports of Linux's default range
    (32768-60999) waiting, and the next fan-out or the agents got EADDRINUSE
    (bench/bench_growth.py at 19,000 clients)."""
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def publish_probe(broker: BrokerAddress, topic: str) -> None:
    version = VersionChoice("auto")
    for _ in range(2):
        try:
            async with aiomqtt.Client(
                broker.host,
                broker.port,
                identifier=f"addin-sim-probe-{uuid.uuid4().hex[:8]}",
                username=broker.username,
                password=broker.password,
                protocol=version.protocol,
            ) as c:
                await c.publish(topic, json.dumps({"sent_at": time.time()}).encode(), qos=1)
                return
        except aiomqtt.MqttError as e:
            if not version.fall_back(e):
                raise


def _shard_process(
    kind: Subscriber,
    url: str,
    topic: str,
    n: int,
    prefix: str,
    ready: Any,
    go: Any,
    out: Any,
    timeout: float,
) -> None:
    async def main() -> None:
        shard = make_shard(kind, BrokerAddress.parse(url), topic, n, prefix)
        await shard.connect()
        ready.put(n)
        await asyncio.get_running_loop().run_in_executor(None, go.wait)
        await shard.wait(timeout)
        out.put((shard.hist.encode(), shard.received))
        await shard.close()

    asyncio.run(main())


def run_baseline(
    url: str,
    clients: int,
    processes: int = 1,
    timeout: float = 60.0,
    progress: Callable[[int], None] | None = None,
    kind: Subscriber = "paho",
) -> dict[str, Any]:
    """Connect `clients` bare subscribers over `processes` processes, publish once, measure."""
    broker = BrokerAddress.parse(url)
    topic = f"addin-sim/v1/baseline-{uuid.uuid4().hex[:8]}/probe"
    processes = max(1, min(processes, clients))
    ctx = multiprocessing.get_context("spawn")
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    shares = [
        clients // processes + (1 if i < clients % processes else 0) for i in range(processes)
    ]
    procs = [
        ctx.Process(
            target=_shard_process,
            args=(
                kind,
                url,
                topic,
                n,
                f"addin-sim-base-{i}-{uuid.uuid4().hex[:6]}",
                ready,
                go,
                out,
                timeout,
            ),
            daemon=True,
        )
        for i, n in enumerate(shares)
    ]
    for p in procs:
        p.start()
    connected = 0
    try:
        for _ in procs:
            connected += ready.get(timeout=max(60.0, clients / 50))
            if progress:
                progress(connected)
        go.set()
        asyncio.run(publish_probe(broker, topic))
        hist = LatencyHistogram()
        received = 0
        for _ in procs:
            enc, got = out.get(timeout=timeout + 30)
            hist.merge(LatencyHistogram.decode(enc))
            received += got
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return {
        "subscriber": kind,
        "clients": clients,
        "received": received,
        "processes": processes,
        **hist.summary(),
    }


async def baseline_in_loop(
    broker: BrokerAddress,
    topic: str,
    n: int,
    prefix: str,
    ready: Callable[[], Awaitable[None]],
    timeout: float,
    kind: Subscriber = "paho",
    download: Download | None = None,
) -> tuple[LatencyHistogram, int, int, LatencyHistogram | None]:
    """Used by a simulation worker: connect `n` subscribers, call `ready`, wait for the probe.
    Returns the latencies, how many were received (downloaded), how many downloads failed
    and, for the download floor, when each subscriber was notified."""
    shard = make_shard(kind, broker, topic, n, prefix, download)
    try:
        await shard.connect()
        await ready()
        await shard.wait(timeout)
        notified = shard.notified if isinstance(shard, DownloadShard) else None
        return shard.hist, shard.received, getattr(shard, "failed", 0), notified
    finally:
        await shard.close()

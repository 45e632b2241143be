"""Drains the outbox to MQTT: QoS 1, retained, a row marked done only after its PUBACK.

The publisher keeps a persistent MQTT 5 session (client id ``addin-server-<tenant>``), or a
3.1.1 one (``clean_session = false``) with a broker that speaks only 3.1.1
(``mqtt_version``; addin_runtime/mqtt_version.py).
When the broker answers CONNACK with *session present = false*, it has lost (or never
had) our state, so everything in the `retained` table is published again before the
outbox is drained. A broker with persistence that is killed comes back with the state of
its last autosave: our session is "present", but what it acknowledged after that save is
gone. So after every drained batch the publisher also publishes, retained, the revision
it has just had acknowledged (the *marker*, ``server/published``), and after every
reconnect it reads the marker back: a marker older than the server's published revision,
or none, means the broker lost state, and the retained payloads newer than the marker
(all of them without one) are published again. Rows written by other processes (CLI commands on the same database)
are found by polling; in-process writes call `wake()`.

The same MQTT session subscribes to the agents' ``report/+`` topics and hands each valid
report to the report intake (`server_stub/reports.py`), which stores them; the outbox and
retained reads and writes are `server_stub.db.Database` methods.

With a signer (``serve --signing-key``) every state payload is signed as it is published, the
outbox's and the republished ones alike (`server_stub/signer.py` says why there); the
marker and probe on the server's own topics are not state and stay unsigned.

Test hooks: with ``ADDIN_SERVER_CRASH_AFTER_COMMIT=1`` in the environment the process exits
with status 70 (``os._exit``, no cleanup) the moment it has committed rows to publish and
before publishing any of them: the "killed between commit and publish" case. With
``ADDIN_SERVER_PAUSE_BEFORE_MARK=SECONDS`` it waits that long after each batch's PUBACKs and
before marking the batch done, saying so in its log: a test SIGKILLs it there, the case of
messages the broker has and the outbox does not know it has.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import ssl
import time
from pathlib import Path
from urllib.parse import urlsplit

import aiomqtt
from paho.mqtt.client import MQTT_CLEAN_START_FIRST_ONLY
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from addin_core.protocol import (
    AgentReport,
    Filters,
    ProtocolError,
    decode_message,
    server_identity,
    server_topic,
)
from addin_runtime.logs import context
from addin_runtime.mqtt import watch_session_present
from addin_runtime.mqtt_version import MqttVersion, VersionChoice
from addin_runtime.reconnect import (
    Backoff,
    LossClassifier,
    disconnect_code,
    flapping_text,
    taken_over_text,
)
from addin_runtime.tasks import cancel_and_wait, wait_event
from server_stub.db import TRANSIENT_ERRORS, Database
from server_stub.db_target import is_url
from server_stub.loop_thread import WritesFirst
from server_stub.reports import ReportIntake, ReportSink
from server_stub.signer import StateSigner, sign_all

log = logging.getLogger("addin_server.publisher")

CRASH_ENV = "ADDIN_SERVER_CRASH_AFTER_COMMIT"
PAUSE_ENV = "ADDIN_SERVER_PAUSE_BEFORE_MARK"
SESSION_EXPIRY_S = 7 * 24 * 3600
BATCH = 500
PUBLISH_CHUNK = 100
"""Publishes started in one go: each chunk runs without a pause on the event loop (500 held
HTTP requests ~50 ms while a broker restart's whole state was published again)."""
YIELD_EVERY = 20
"""Messages received between two turns given to the event loop's other tasks."""

BACKOFF = (0.2, 5.0)
"""Reconnect delay: from ~0.2 s, doubling (jittered) up to 5 s."""
STABLE_AFTER = 30.0
"""Seconds a broker session must last before the backoff starts again from the bottom."""
_RETRIED: tuple[type[Exception], ...] = (aiomqtt.MqttError, *TRANSIENT_ERRORS)
"""A lost broker, or a locked or full database: reconnect after a delay."""
MARKER_READ_TIMEOUT = 30.0
"""Seconds the broker has to hand back the marker after a reconnect before we reconnect."""
TASK_STOP_TIMEOUT = 10.0
"""Seconds to wait for a session's receive and drain tasks to end before reconnecting."""


def parse_broker_url(url: str, *, tls: bool = False) -> tuple[str, int]:
    """``mqtt://HOST[:PORT]`` (or ``tcp://``), or with `tls` ``mqtts://HOST[:PORT]``
    -> (host, port); ValueError saying what to write."""
    scheme = "mqtts" if tls else "mqtt"
    u = urlsplit(url)
    if u.scheme not in (("mqtts",) if tls else ("mqtt", "tcp")) or not u.netloc:
        missing = "" if "://" in url else " (the scheme is missing)"
        raise ValueError(f"{url!r} must look like {scheme}://HOST:PORT{missing}")
    try:
        port = u.port
    except ValueError:
        port = 0
    if not u.hostname or port == 0 or u.path not in ("", "/") or u.query or u.fragment:
        raise ValueError(f"{url!r} must look like {scheme}://HOST:PORT (PORT from 1 to 65535)")
    return u.hostname, port or (8883 if tls else 1883)


class Publisher:
    """Publishes the outbox to the broker, in commit order, until cancelled; and receives
    the agents' reports on the same session for the report intake."""

    def __init__(
        self,
        db_path: str | Path,
        tenant: str,
        broker_url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        poll_interval: float = 0.15,
        report_sink: ReportSink | None = None,
        signer: StateSigner | None = None,
        tls_context: ssl.SSLContext | None = None,
        reports_in_session: bool = True,
        mqtt_version: MqttVersion = "auto",
    ) -> None:
        self.db_path = db_path
        self.version = VersionChoice(mqtt_version)
        self.reports_in_session = reports_in_session
        """Whether this session takes the agents' reports (``report/+``); not when replicas
        share them (`server_stub/replicas.py`)."""
        self.standing_by = False
        """A replica waiting for the outbox another one drains (PostgreSQL)."""
        # A server on an SQLite file is alone (its lock says so); a replica leads once it
        # holds the outbox lock.
        self._leading = not is_url(db_path)
        self.signer = signer
        self.tenant = tenant
        # mqtts:// with the server's client certificate (serve --pki), else mqtt://.
        self.tls_context = tls_context
        self.host, self.port = parse_broker_url(broker_url, tls=tls_context is not None)
        self.username = username
        self.password = password
        self.poll_interval = poll_interval
        self.report_sink = report_sink
        self.writes_first: WritesFirst | None = None
        """Set by `serve`, which runs the publisher on a thread of its own: its bulk work (a
        broker's whole state, a fleet's reports) steps aside for the admin writes."""
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        """The loop `run` runs on: `wake` may be called from another one."""
        self._session_present = False
        self._marker_topic = server_topic(tenant, "published")
        self._probe_topic = server_topic(tenant, "probe")
        self._marker: int | None = None
        self._probe_nonce = b""
        self._probe_seen = asyncio.Event()
        self._collecting: set[str] = set()
        self._collected: dict[str, int] = {}
        self.connected = asyncio.Event()
        self.published = 0
        self.republished_all = 0
        self.connections = 0
        self.taken_over = 0
        """Connections the broker gave to another client with our id (said or probable)."""
        self._last_error = "not connected yet"

    def is_leader(self) -> bool:
        """Whether this process drains the outbox: a server on SQLite once it runs, on
        PostgreSQL the replica holding the outbox lock (the one that runs the timers)."""
        return self._leading

    def is_connected(self) -> bool:
        """A session is up and the broker has been given its state (readiness, metrics);
        or this replica stands by while another one publishes."""
        return self.connected.is_set() or self.standing_by

    def disconnected_reason(self) -> str:
        """Why the last session ended (or that none has started): what /readyz says."""
        return self._last_error

    def wake(self, _revision: int | None = None) -> None:
        """A commit has rows to publish; callable from any thread (`serve` runs the
        publisher on a loop of its own, `server_stub/loop_thread.py`)."""
        loop = self._loop
        try:
            same = loop is None or asyncio.get_running_loop() is loop
        except RuntimeError:
            same = False
        if same:
            self._wake.set()
        elif loop is not None:
            try:
                loop.call_soon_threadsafe(self._wake.set)
            except RuntimeError:  # that loop has closed: the server is stopping
                pass

    def _crash_hook(self) -> None:
        if os.environ.get(CRASH_ENV) == "1":
            log.warning("%s=1: exiting before publishing committed rows", CRASH_ENV)
            os._exit(70)

    def _client(self) -> aiomqtt.Client:
        v311 = self.version.v311
        props = None
        if not v311:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = SESSION_EXPIRY_S
        client = aiomqtt.Client(
            self.host,
            self.port,
            username=self.username,
            password=self.password,
            identifier=server_identity(self.tenant),
            tls_context=self.tls_context,
            protocol=self.version.protocol,
            # 3.1.1: a session kept for as long as the broker keeps it (no expiry property).
            clean_session=False if v311 else None,
            clean_start=MQTT_CLEAN_START_FIRST_ONLY if v311 else False,
            properties=props,
            max_inflight_messages=1000,
            timeout=30,
        )
        client.pending_calls_threshold = 1_000_000

        # aiomqtt does not expose CONNACK's session-present flag (addin_runtime.mqtt reads
        # it); it decides whether the broker must be given all state again.
        def seen(present: bool) -> None:
            self._session_present = present

        watch_session_present(client, seen)
        return client

    async def run(self) -> None:
        """Connect, publish, reconnect on failure; runs until cancelled. On PostgreSQL,
        only while this replica holds the outbox (`server_stub/replicas.py`)."""
        self._loop = asyncio.get_running_loop()
        database = await Database.open(self.db_path, pool_size=2)
        try:
            if database.is_postgresql:
                await self._lead(database)
            else:
                await self._publish(database)
        finally:
            self._leading = False
            await database.close()

    async def _lead(self, database: Database) -> None:
        from server_stub.replicas import Leadership, LeadershipLost

        while True:
            lead = Leadership(str(self.db_path))
            try:
                self.standing_by = True
                self._last_error = "standing by: another replica drains the outbox"
                await lead.acquire()
                self.standing_by, self._leading = False, True
                self._last_error = "not connected yet"
                log.info("this replica drains the outbox now")
                watch = asyncio.create_task(lead.watch(self.wake), name="outbox lock")
                publish = asyncio.create_task(self._publish(database), name="publish")
                try:
                    await asyncio.wait([watch, publish], return_when=asyncio.FIRST_COMPLETED)
                    if watch.done():
                        watch.result()
                    publish.result()
                except LeadershipLost as e:
                    log.error("%s: no longer publishing", e)
                finally:
                    self.connected.clear()
                    self._leading = False
                    await cancel_and_wait(publish, TASK_STOP_TIMEOUT, "the publisher")
                    await cancel_and_wait(watch, TASK_STOP_TIMEOUT, "the outbox lock watch")
            finally:
                await lead.release()

    async def _publish(self, database: Database) -> None:
        # Only a session that lasted counts as recovery: a broker that accepts us and then
        # drops us (another publisher with our client id) must not be retried 5 times a second.
        backoff = Backoff(*BACKOFF, stable_after=STABLE_AFTER)
        losses = LossClassifier(STABLE_AFTER)
        client_id = server_identity(self.tenant)
        while True:
            client: aiomqtt.Client | None = None
            try:
                client = self._client()
                async with client:
                    backoff.connected()
                    await self._session(database, client)
            except _RETRIED as e:
                if self.version.fall_back(e):
                    log.warning(
                        "broker %s:%d refused MQTT 5 (%s): publishing over MQTT 3.1.1",
                        self.host,
                        self.port,
                        e,
                    )
                    continue
                # A locked or full database must not end publication for good: rows
                # not marked done are published again (at least once) after the retry.
                self.connected.clear()
                self._last_error = f"{type(e).__name__}: {e}"
                delay = backoff.failed()
                up = backoff.last_uptime
                kind = losses.classify(disconnect_code(e, client), up)
                if kind == "disconnected":
                    log.warning("publisher interrupted (%s); retrying in %.1fs", e, delay)
                else:
                    self.taken_over += 1
                    what = (
                        taken_over_text(client_id)
                        if kind == "session_taken_over"
                        else flapping_text(client_id, up or 0.0, losses.short_drops)
                    )
                    log.error(
                        "publisher: %s (another addin-server of tenant %s, on another "
                        "database?); retrying in %.1fs (%d failures in a row)",
                        what,
                        self.tenant,
                        delay,
                        backoff.failures,
                    )
                await asyncio.sleep(delay)

    async def _session(self, database: Database, client: aiomqtt.Client) -> None:
        self.connections += 1
        if self.reports_in_session:
            await client.subscribe(Filters.reports(self.tenant), qos=1)
        else:
            # The persistent session may hold the subscription of a single server (or of a
            # --pki replica): with it this session would take every report a second time.
            await client.unsubscribe(Filters.reports(self.tenant))
        # Not a TaskGroup: its ExceptionGroup would hide the MqttError `run` reconnects on.
        receive = asyncio.create_task(self._receive(client), name="receive")
        restore = asyncio.create_task(self._restore_broker_state(database, client), name="restore")
        tasks = [receive, restore]
        try:
            # A connection lost while restoring ends the receive task at once; the restore's
            # own calls would only notice at their 30 s timeouts.
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if receive.done():
                receive.result()
                raise aiomqtt.MqttError("message stream ended")
            restore.result()
            self.connected.set()
            drain = asyncio.create_task(self._drain_forever(database, client), name="drain")
            tasks.append(drain)
            done, _ = await asyncio.wait([receive, drain], return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                t.result()
            raise aiomqtt.MqttError("message stream ended")
        finally:
            for t in tasks:
                await cancel_and_wait(t, TASK_STOP_TIMEOUT, f"publisher task {t.get_name()}")

    async def _restore_broker_state(self, database: Database, client: aiomqtt.Client) -> None:
        """Give the broker what it lost: all of it without a session, what is newer than
        its marker with one; then set the marker."""
        if not self._session_present:
            await self.republish_all(database, client)
        else:
            marker = await self._read_marker(client)
            published = await database.published_revision()
            if marker is None or marker < published:
                await self.republish_newer(database, client, marker, published)
            await self._skip_delivered(database, client)
        await self._publish_marker(client, await database.published_revision())

    async def _skip_delivered(self, database: Database, client: aiomqtt.Client) -> None:
        """Mark done the waiting rows the broker already has: those a publisher before this
        session (this process before a crash, or a replica SIGKILLed mid-batch) had sent
        and not yet marked. Publishing them again would set a topic back to an older
        revision until the newer one came again. The broker handled that publisher's
        messages in order, so what it retains is a prefix of the waiting rows: every row up
        to the last one whose topic holds its revision (or a newer one)."""
        rows = await database.outbox_batch(BATCH * 4)
        if not rows:
            return
        held = await self._read_retained(client, sorted({t for _, _, t, _ in rows}))
        done = [(i, rev) for i, rev, topic, _ in rows if held.get(topic, -1) >= rev]
        if done:
            await database.mark_published(rows[0][0], done[-1][0], time.time())
            log.info(
                "the broker already had the %d waiting message(s) up to revision %d (sent "
                "before a crash or by a former leader): not publishing them again",
                sum(1 for i, _, _, _ in rows if i <= done[-1][0]),
                done[-1][1],
            )

    async def _read_retained(self, client: aiomqtt.Client, topics: list[str]) -> dict[str, int]:
        """topic -> revision of the payload the broker retains, for `topics`."""
        self._collected = {}
        self._collecting = set(topics)
        self._probe_seen.clear()
        self._probe_nonce = secrets.token_hex(8).encode()
        try:
            for i in range(0, len(topics), 200):
                await client.subscribe([(t, 1) for t in topics[i : i + 200]])
            await client.subscribe(self._probe_topic, qos=1)
            await client.publish(self._probe_topic, self._probe_nonce, qos=1, timeout=30)
            try:
                async with asyncio.timeout(MARKER_READ_TIMEOUT):
                    await self._probe_seen.wait()
            except TimeoutError:
                raise aiomqtt.MqttError("the broker did not return its retained state") from None
            for i in range(0, len(topics), 200):
                await client.unsubscribe(topics[i : i + 200])
            await client.unsubscribe(self._probe_topic)
            return dict(self._collected)
        finally:
            self._collecting = set()

    async def _read_marker(self, client: aiomqtt.Client) -> int | None:
        """The broker's retained marker, or None when it has none. The probe we publish
        after subscribing comes back after any retained marker (one connection, one order),
        so its echo says the marker has arrived or never will."""
        self._marker = None
        self._probe_seen.clear()
        self._probe_nonce = secrets.token_hex(8).encode()
        await client.subscribe([(self._marker_topic, 1), (self._probe_topic, 1)])
        await client.publish(self._probe_topic, self._probe_nonce, qos=1, timeout=30)
        try:
            async with asyncio.timeout(MARKER_READ_TIMEOUT):
                await self._probe_seen.wait()
        except TimeoutError:
            raise aiomqtt.MqttError("the broker did not return the published marker") from None
        await client.unsubscribe([self._marker_topic, self._probe_topic])
        return self._marker

    async def _publish_marker(self, client: aiomqtt.Client, revision: int) -> None:
        marker = json.dumps({"revision": revision, "published_at": time.time()}).encode()
        await client.publish(self._marker_topic, marker, qos=1, retain=True, timeout=30)

    def _on_server_topic(self, topic: str, payload: bytes, retained: bool) -> None:
        if topic == self._probe_topic:
            if payload == self._probe_nonce:
                self._probe_seen.set()
        elif retained:
            revision = _revision_of(payload)
            self._marker = revision if revision >= 0 else None

    async def republish_all(self, database: Database, client: aiomqtt.Client) -> int:
        """Publish every current retained payload; the outbox rows it covers are done."""
        return await self._republish(database, client, 0, "broker has no session for us")

    async def republish_newer(
        self, database: Database, client: aiomqtt.Client, marker: int | None, published: int
    ) -> int:
        """The broker kept our session but lost messages it had acknowledged: publish the
        retained payloads newer than its marker (all of them without a marker)."""
        why = f"broker lost state (its marker: revision {marker}; acknowledged: {published})"
        return await self._republish(database, client, marker or 0, why, up_to=published)

    async def _republish(
        self,
        database: Database,
        client: aiomqtt.Client,
        newer_than: int,
        why: str,
        *,
        up_to: int | None = None,
    ) -> int:
        """With `up_to` (the session is present, its marker behind): only the topics whose
        latest revision the broker had acknowledged (up to `up_to`) and no longer holds.
        A marker also lags when its publisher was killed between marking rows done and
        publishing the marker, the broker holding everything; and the rows still waiting
        are the drain's, published in order after this."""
        last_id, pending, retained = await database.retained_state(newer_than, up_to)
        if pending and up_to is None:
            self._crash_hook()
        if up_to is not None and retained:
            held = await self._read_retained(client, sorted({t for t, _ in retained}))
            retained = [(t, p) for t, p in retained if held.get(t, -1) < _revision_of(p)]
        log.log(
            logging.WARNING if newer_than else logging.INFO,
            "%s: republishing %d retained topics",
            why,
            len(retained),
        )
        await self._publish_many(client, retained)
        if up_to is None:
            await database.mark_published_up_to(last_id, time.time())
        if newer_than == 0:
            self.republished_all += 1
        return len(retained)

    async def _publish_many(self, client: aiomqtt.Client, msgs: list[tuple[str, bytes]]) -> None:
        msgs = sign_all(self.signer, msgs)
        # Concurrent publishes still leave in order on the one TCP connection, so a later
        # payload for a topic always lands after an earlier one.
        for i in range(0, len(msgs), PUBLISH_CHUNK):
            chunk = msgs[i : i + PUBLISH_CHUNK]
            await asyncio.gather(
                *(client.publish(t, p, qos=1, retain=True, timeout=30) for t, p in chunk)
            )
            self.published += len(chunk)
            if self.writes_first is not None:
                self.writes_first.step_aside()

    async def drain_once(self, database: Database, client: aiomqtt.Client) -> int:
        rows = await database.outbox_batch(BATCH * 4)
        if not rows:
            return 0
        self._crash_hook()
        await self._publish_many(client, [(topic, payload) for _, _, topic, payload in rows])
        # Every publish above got its PUBACK (publish() with qos=1 waits for it).
        if os.environ.get(PAUSE_ENV):
            log.warning("%s: published up to revision %d, not marked yet", PAUSE_ENV, rows[-1][1])
            await asyncio.sleep(float(os.environ[PAUSE_ENV]))
        await database.mark_published(rows[0][0], rows[-1][0], time.time())
        await self._publish_marker(client, rows[-1][1])
        log.info(
            "published %d message(s) up to revision %d",
            len(rows),
            rows[-1][1],
            extra=context(revision=rows[-1][1]),
        )
        return len(rows)

    async def _drain_forever(self, database: Database, client: aiomqtt.Client) -> None:
        cycles = 0
        while True:
            while await self.drain_once(database, client):
                pass
            cycles += 1
            if cycles % 2000 == 0:
                # Published rows are history; keep a day of it for debugging.
                await database.forget_published(time.time() - 86400)
            self._wake.clear()
            await wait_event(self._wake, self.poll_interval)

    async def _receive(self, client: aiomqtt.Client) -> None:
        intake = ReportIntake(self.report_sink) if self.report_sink is not None else None
        store = asyncio.create_task(intake.run()) if intake is not None else None
        received = 0
        try:
            async for message in client.messages:
                received += 1
                if received % YIELD_EVERY == 0:
                    # aiomqtt hands out queued messages without yielding: a fleet's burst
                    # of reports (10,000 after a broker restart) would hold the event loop
                    # for seconds, and every HTTP request (admin writes) with it.
                    await asyncio.sleep(0)
                if self.writes_first is not None:
                    self.writes_first.step_aside()
                topic = str(message.topic)
                try:
                    self._take(topic, bytes(message.payload), bool(message.retain), intake)
                except ProtocolError as e:
                    log.warning("ignoring invalid message: %s", e)
                except Exception:
                    # One message must never end this loop: the publisher would stall
                    # silently (no marker, no reports) with the connection still up.
                    log.exception("ignoring a message on %s that could not be read", topic[:200])
        finally:
            if store is not None:
                store.cancel()

    def _take(self, topic: str, raw: bytes, retained: bool, intake: ReportIntake | None) -> None:
        """One received message: the server's own topics, a collected retained revision, or
        an agent's report (ProtocolError when it is not a valid one)."""
        if topic in (self._marker_topic, self._probe_topic):
            self._on_server_topic(topic, raw, retained)
        elif topic in self._collecting:
            if retained:
                self._collected[topic] = _revision_of(raw)
        else:
            _, payload = decode_message(topic, raw)
            if isinstance(payload, AgentReport) and intake is not None:
                intake.offer(payload)


def _revision_of(payload: bytes) -> int:
    """The revision a retained state payload carries (signed or not; -1 if none). Anyone
    who can publish on the broker may have left anything there, JSON nested past the
    parser's depth included (RecursionError)."""
    try:
        revision = json.loads(payload)["revision"]
    except (ValueError, TypeError, KeyError, IndexError, RecursionError):
        return -1
    return revision if isinstance(revision, int) and revision >= 0 else -1

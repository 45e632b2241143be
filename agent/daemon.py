"""The agent: composes config, cache, transport, resolver, fetcher and applier.

Every state transition (a message accepted, a manifest verified or refused, a launch, a
user's install/remove) runs under one lock, computes the new model in memory and commits
it to the cache as ONE transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from addin_core.protocol import (
    AgentReport,
    AnyPayload,
    CatalogEntry,
    Host,
    ProtocolError,
    Topic,
    TopicKind,
)
from addin_core.signing import SignatureRefused, load_public_key, split_state, verify_state
from addin_runtime.logs import context
from addin_runtime.tasks import cancel_and_wait
from agent.antientropy import AntiEntropy
from agent.applier import AppliedManifest, Applier
from agent.appliers import make_applier
from agent.cache import Cache, Retention, Tx, VolatileCache, open_cache
from agent.config import AgentConfig
from agent.control import ControlServer
from agent.downloads import Downloads
from agent.events import AgentEvent, EventKind
from agent.fetcher import Fetcher, FetchResult, HttpClient
from agent.hostwatch import HostEvent, HostWatcher
from agent.model import AgentModel, AgentRefusal, UserChoice, decode_remembered
from agent.pending import ManifestRecord, PendingChange, PendingKey
from agent.resolver import Entitlement, ring_entry
from agent.state import ReceivedState
from agent.subscriptions import desired_filters
from agent.tls import https_context, mirror_context, mqtt_context
from agent.transport import Transport

log = logging.getLogger("addin_agent")

REPORT_DELAY = 1.0
"""Reports after launches are coalesced over this many seconds: a user who starts Word, Excel
and Outlook together sends one report, and a fleet's server stores a third of the rows."""

CACHED_REPORT_SPREAD = 10.0
"""The report saying a change waits for its host (downloaded, or ready at once because its
manifest was cached) goes out REPORT_DELAY plus up to this many seconds (uniformly) later. A fleet-wide change makes every device download at
once; reporting one second after each download sent 10,000 reports to the server while it
was still serving the other devices their manifest (a report costs it about twice a
manifest's CPU), which tripled the fleet's download time under load (5,000 simulated
clients: cached p99 6.1 s with the reports one second after, 3.9 s spread over 8 s). An
add-in turned on again readies on every device within the fan-out itself: its reports one
second after the notification doubled the workers' notify p99 (5,000 simulated clients, the
`turn-on` step: 1,102 ms against 586 ms for `turn-off`, whose reports were not due yet).
Nothing waits for this report but the console's count of devices holding the change."""

STOP_TIMEOUT = 10.0
"""Seconds `stop` waits for cancelled manifest downloads before it goes on without them."""


@dataclass(slots=True)
class Staged:
    """What the agent last wrote to a host's add-in location for its next start."""

    files: dict[str, str]
    """{addin_id: sha256} of the complete set written."""
    at: dict[str, float]
    """{addin_id: when its file, or its absence, was last written}: a change counts as
    applied at a detected start only if it was written before the host could have started."""


class Agent:
    """One endpoint agent.

    Interface used by the simulator (thousands of agents in one process)::

        agent = Agent(config, http=shared_HttpPool_or_None,
                      applier=MemoryApplier() or None, observer=callable_or_None)
        await agent.start()        # open the cache, connect + subscribe in the background;
                                   # returns once the first connection attempt was made and
                                   # keeps reconnecting by itself
        await agent.launch(host)   # apply that host's pending changes; returns {addin_id: version}
        agent.entitlements()       # {addin_id: Entitlement(mode, version, hosts, grants, ...)}
        agent.installed()          # {Host: {addin_id: version}}
        await agent.stop()

    `observer(AgentEvent)` is called synchronously with kind ``"notified"`` (a state
    message with a newer revision was accepted), ``"manifest_cached"`` (a manifest was
    fetched and verified) or ``"applied"`` (a launch applied a change), with the revision
    and ``committed_at`` of the admin change behind it; and, for counting, ``"connected"``,
    ``"disconnected"`` (a connection attempt failed or the link was lost; not at stop) and
    ``"fetch_failed"`` (a round of download attempts failed; retried later). With
    ``config.control`` unset no local endpoint is opened.

    With ``config.watch_hosts`` a `HostWatcher` reports the host apps' starts and exits: the
    ready changes of a host that is not running are written to the applier after every
    transition, and a noticed start applies them as `launch` does (see docs/agent.md, "The
    host lifecycle watcher").
    """

    def __init__(
        self,
        config: AgentConfig,
        http: HttpClient | None = None,
        applier: Applier | None = None,
        observer: Callable[[AgentEvent], None] | None = None,
    ) -> None:
        self.config = config
        self.observer = observer
        self.applier: Applier = applier if applier is not None else make_applier(config)
        self._http = http
        self.downloads: Downloads | None = None
        self.cache: Cache | VolatileCache | None = None
        self.model = AgentModel(config.tenant, config.user_id, config.hosts)
        self._lock = asyncio.Lock()
        self._keeps_rows = True
        self._derived_unsaved = False
        """A rollback to the cache's state could not write the entitlements it computed."""
        self._store_xml = True
        self.transport: Transport | None = None
        self.control: ControlServer | None = None
        self.stats = {"accepted": 0, "stale": 0, "invalid": 0, "signature_refused": 0}
        self._signing_key = load_public_key(config.signing_key) if config.signing_key else None
        """The server's public key: with it every state message must be signed by it."""
        self._stopping = False
        self._report_task: asyncio.Task[None] | None = None
        self._report_due = 0.0
        """When the scheduled report goes out (monotonic seconds)."""
        self._report_waiting = False
        """Whether the scheduled report is still waiting (not publishing yet)."""
        self.anti_entropy: AntiEntropy | None = None  # started by start()
        self.watcher: HostWatcher | None = None  # started by start() with watch_hosts
        self._staged: dict[Host, Staged] = {}
        self._metrics_task: asyncio.Task[None] | None = None
        self.settled: Callable[[], None] | None = None
        """Called after a report goes out with no download running: the work of a change (or
        of the start) is done. The daemon's CLI gives memory back to the system there
        (agent/memory.py); None in a process running many agents."""

    # -- public interface --------------------------------------------------------------------
    def entitlements(self) -> dict[str, Entitlement]:
        return dict(self.model.ents)

    def installed(self) -> dict[Host, dict[str, str]]:
        return dict(self.model.installed_versions())

    @property
    def state(self) -> ReceivedState:
        return self.model.state

    @property
    def pending(self) -> dict[PendingKey, PendingChange]:
        return self.model.pending

    @property
    def manifests(self) -> dict[str, ManifestRecord]:
        return self.model.manifests

    @property
    def choices(self) -> dict[str, str]:
        return self.model.choices

    @property
    def fetch_errors(self) -> dict[str, str]:
        return self.model.fetch_errors

    @property
    def revision(self) -> int:
        return self.state.revision

    @property
    def fetching(self) -> int:
        """Manifests being downloaded (or waiting to retry) right now."""
        return len(self._fetching)

    @property
    def _fetching(self) -> dict[str, asyncio.Task[None]]:
        return self.downloads.running if self.downloads is not None else {}

    @property
    def fetcher(self) -> Fetcher | None:
        return self.downloads.fetcher if self.downloads is not None else None

    @property
    def connected(self) -> bool:
        return bool(self.transport is not None and self.transport.connected.is_set())

    async def open(self) -> None:
        """Open the cache and load the last good state (no network)."""
        if self.cache is not None:
            return
        self.cache = await open_cache(
            self.config.cache_path,
            Retention(days=self.config.events_keep_days, rows=self.config.events_keep_rows),
        )
        self._keeps_rows = self.cache.keeps_rows
        self._store_xml = not self.cache.memory or self.applier.needs_xml
        await self._load()

    async def start(self) -> None:
        self._stopping = False
        await self.open()
        fetcher = Fetcher(
            self.config.server_url,
            self.config.server_token,
            http=self._http,
            concurrency=self.config.fetch_concurrency,
            ssl_context=https_context(self.config),
            mirrors=self.config.manifest_mirrors,
            mirror_tls=mirror_context(self.config),
        )
        self.downloads = Downloads(
            fetcher, self._record_manifest, self._record_fetch_error, self._still_needed
        )
        assert self.cache is not None
        if self.config.control:
            # Before the broker: an endpoint that cannot be created fails the start before
            # anything connects, and a daemon refused here never connects under the client id
            # of the one that holds the endpoint.
            self.control = ControlServer(self, self.config.control)
            await self.control.start()
        if self.config.watch_hosts and self.watcher is None:
            # Before anything can change: a host already running is running (nothing is
            # written under it); the others get their ready changes now.
            self.watcher = HostWatcher(
                self.config.processes(), self.config.host_poll_interval, self._host_event
            )
            await self.watcher.start()
            async with self._lock:
                await self._note_running()
                await self._stage_idle()
        first = await self.cache.sync_value("session_started") is None
        self.transport = Transport(
            host=self.config.broker_host,
            port=self.config.broker_port,
            client_id=self.config.client_id,
            username=self.config.broker_username,
            password=self.config.broker_password,
            session_expiry=self.config.session_expiry,
            keepalive=self.config.keepalive,
            on_message=self.handle_message,
            on_connect=self._on_connect,
            on_disconnect=self._on_disconnect,
            desired=lambda: desired_filters(self.state, self.config.user_id),
            clean_start_first=first,
            tls_context=mqtt_context(self.config),
            mqtt_version=self.config.mqtt_version,
            on_refused=self._on_refused,
            source_address=self.config.mqtt_source_address,
        )
        self.transport.start()
        self._schedule_fetches()
        # None when anti_entropy_interval = 0
        if self.anti_entropy is None:
            self.anti_entropy = AntiEntropy.start_for(self)
        if self.config.metrics_file and self._metrics_task is None:
            from agent.metrics_file import write_forever

            self._metrics_task = asyncio.create_task(
                write_forever(self, Path(self.config.metrics_file), self.config.metrics_interval)
            )
        await self.transport.first_attempt.wait()

    async def stop(self) -> None:
        """Stop every task of this agent; the cache is closed whatever happens on the way
        (an open aiosqlite connection is a non-daemon thread: the process could not exit)."""
        self._stopping = True
        was_connected = False
        with contextlib.suppress(Exception):  # best effort: the stop goes on whatever happens
            was_connected = self.connected
        try:
            await self._stop_tasks()
        finally:
            await self._close_cache(was_connected)

    async def _stop_tasks(self) -> None:
        if self.watcher is not None:
            await self.watcher.stop()
            self.watcher = None
        if self.anti_entropy is not None:
            await self.anti_entropy.stop()
            self.anti_entropy = None
        if self.control is not None:
            await self.control.stop()
            self.control = None
        if self._report_task is not None:
            self._report_task.cancel()
            self._report_task = None
        if self.downloads is not None:
            await self.downloads.stop(STOP_TIMEOUT)
        if self.transport is not None:
            transport, self.transport = self.transport, None
            await transport.stop()
        if self._metrics_task is not None:
            # Last, so its final write shows the agent disconnected.
            await cancel_and_wait(self._metrics_task, 5, "the metrics file writer")
            self._metrics_task = None

    async def _close_cache(self, was_connected: bool = False) -> None:
        if self.cache is not None:
            with contextlib.suppress(Exception):
                tx = Tx()
                tx.sync("connected", 0)
                if was_connected:
                    # The last contact with the broker, for `why`'s "as of" on a stopped agent.
                    tx.sync("disconnected_at", tx.now)
                tx.event("stopped", "agent stopped")
                await self.cache.commit(tx)
            # An in-memory cache stays open so that start() again resumes from it (the
            # simulator takes agents offline and back); it is freed with the Agent.
            if not self.cache.memory:
                await self.cache.close()
                self.cache = None

    # -- loading -----------------------------------------------------------------------------
    async def _load(self) -> None:
        assert self.cache is not None
        c = self.cache
        self.model.load(await c.cached_rows())
        tx = Tx()
        self.model.recompute(tx, self.state.revision, None)
        tx.event("started", f"agent started (pid {os.getpid()})", revision=self.state.revision)
        tx.sync("pid", os.getpid())
        tx.sync("started_at", tx.now)
        tx.sync("hosts_running", None)  # written by the host watcher, when it runs
        tx.sync(
            "client",
            {
                "tenant": self.config.tenant,
                "user_id": self.config.user_id,
                "client_id": self.config.client_id,
                "hosts": [h.value for h in self.config.hosts],
                # For `why`: hosts whose add-ins this applier does not place (Outlook's come
                # from the mailbox), so it does not claim they are installed.
                "unplaced_hosts": sorted(h.value for h in self.applier.unplaced),
                # For `status`, which reads the cache only.
                "security": security(self.config),
            },
        )
        await c.commit(tx)

    async def _commit(self, tx: Tx) -> None:
        """Commit a transition already made in memory. When the cache refuses it (disk full,
        I/O error), memory goes back to what the cache holds before the error is raised: a
        message redelivered later is then new again, and a manifest whose bytes never reached
        the cache is fetched again, instead of memory believing in rows the cache lacks."""
        assert self.cache is not None
        try:
            await self.cache.commit(tx)
        except Exception:
            log.warning("cache refused a transition; memory goes back to the cache's state")
            await self._reload_model()
            raise
        if self._derived_unsaved:
            await self._reload_model()  # the disk has room again: write what was left out
        await self._stage_idle()

    async def _reload_model(self) -> None:
        assert self.cache is not None
        model = AgentModel(self.config.tenant, self.config.user_id, self.config.hosts)
        model.fetch_errors = self.model.fetch_errors
        model.load(await self.cache.cached_rows())
        self.model = model
        # Entitlements are derived: computed again from the state read back. Writing the
        # differences may fail too while the disk is full; then the next transition that
        # commits reloads again and writes them.
        tx = Tx()
        self.model.recompute(tx, self.state.revision, None)
        try:
            await self.cache.commit(tx)
            self._derived_unsaved = False
        except Exception:
            self._derived_unsaved = True
        self._schedule_fetches()

    # -- transitions -------------------------------------------------------------------------
    def _emit(
        self,
        kind: EventKind,
        revision: int,
        committed_at: float | None,
        addin_id: str | None = None,
        host: Host | None = None,
    ) -> None:
        if self.observer is not None:
            try:
                self.observer(AgentEvent(kind, revision, committed_at, addin_id, host, time.time()))
            except Exception:  # an observer bug must not break the agent
                log.exception("observer failed")

    def _log_context(self, **fields: Any) -> dict[str, Any]:
        """A log line's context: this agent's user and device, and `fields`."""
        return context(user=self.config.user_id, device=self.config.client_id, **fields)

    def _log_applied(self, p: PendingChange) -> None:
        log.info(
            "applied: %s %s %s on %s",
            p.action,
            p.addin_id,
            p.to_version or p.from_version,
            p.host.value,
            extra=self._log_context(revision=p.revision, addin=p.addin_id, host=p.host.value),
        )

    async def handle_message(self, topic_str: str, payload_bytes: bytes) -> None:
        """One message from the broker (or from anti-entropy's ``/state``). Invalid, stale
        or, with a `signing_key`, unsigned or badly signed ones change nothing."""
        try:
            topic = Topic.parse(topic_str)
            if self._signing_key is not None:
                unsigned = verify_state(self._signing_key, topic_str, payload_bytes)
            else:
                # No key (a lab): a signed payload is read without its signature.
                unsigned = split_state(bytes(payload_bytes))[0]
            payload = decode_remembered(topic, unsigned)
        except SignatureRefused as e:
            await self._refused_signature(topic, e)
            return
        except ProtocolError as e:
            self.stats["invalid"] += 1
            log.warning("refused message: %s", e)
            if self.cache is not None:
                tx = Tx()
                tx.event("invalid", str(e)[:500])
                await self.cache.commit(tx)
            return
        await self.accept(topic, payload)

    async def _refused_signature(self, topic: Topic, e: SignatureRefused) -> None:
        """Nothing changes (the last signed state is kept); the refusal is an event naming
        the topic and the reason, which `why` and `doctor` report."""
        self.stats["signature_refused"] += 1
        log.warning("refused message: %s", e)
        if self.cache is not None:
            tx = Tx()
            tx.event("signature_refused", str(e)[:500], addin_id=topic.addin_id)
            await self.cache.commit(tx)

    async def accept(self, topic: Topic, payload: AnyPayload) -> bool:
        if not self.state.is_newer(topic, payload):
            self.stats["stale"] += 1
            return False
        assert self.cache is not None
        async with self._lock:
            tx = Tx(rows=self._keeps_rows)
            ready_before = _ready_set(self.model.pending)
            if not self.model.accept(tx, topic, payload):
                self.stats["stale"] += 1
                return False
            self.stats["accepted"] += 1
            await self._commit(tx)
            if _ready_set(self.model.pending) != ready_before:
                # A change became ready to apply without a download (its manifest was
                # cached already): the report says so, as after a download, and spread
                # the same way: a fleet-wide change (an add-in turned on again) readies
                # it on every device within the fan-out.
                self._schedule_report(CACHED_REPORT_SPREAD)
        rev = int(getattr(payload, "revision", 0))
        committed_at = getattr(payload, "committed_at", None)
        self._emit("notified", rev, committed_at, topic.addin_id)
        if log.isEnabledFor(logging.INFO):  # a simulator worker hosts thousands: skip the dict
            log.info(
                "accepted %s at revision %d",
                topic.kind.value,
                rev,
                extra=self._log_context(revision=rev, addin=topic.addin_id, topic=str(topic)),
            )
        if topic.kind in (TopicKind.MEMBER, TopicKind.GROUP_PARENTS) and self.transport:
            before = set(self.transport.subscribed)
            await self.transport.sync_subscriptions()
            if self.transport.subscribed != before and self.cache is not None:
                stx = Tx()
                stx.sync("subscriptions", sorted(self.transport.subscribed))
                added = self.transport.subscribed - before
                removed = before - self.transport.subscribed
                stx.event(
                    "subscriptions",
                    f"+{len(added)} -{len(removed)}: " + ", ".join(sorted(added | removed))[:500],
                    revision=rev,
                )
                await self.cache.commit(stx)
        self._schedule_fetches(rev, committed_at)
        return True

    # -- manifests ---------------------------------------------------------------------------
    def _schedule_fetches(self, revision: int = 0, committed_at: float | None = None) -> None:
        """Start fetching every entitled manifest not cached yet. `revision`/`committed_at`
        name the change that made them needed (e.g. an assignment to an add-in uploaded long
        before): the `manifest_cached` event reports that cause, not the catalog entry's."""
        if self.downloads is None or self._stopping:
            return
        needed = []
        for e in self.model.ents.values():
            if e.sha256 not in self.manifests:
                entry = self.state.catalog.get(e.addin_id)
                if entry is not None and entry.manifest_sha256 != e.sha256:
                    entry = ring_entry(entry, e.sha256)
                if entry is not None:
                    cause = (revision, committed_at) if revision > entry.revision else None
                    needed.append((entry, cause))
        self.downloads.start(needed)

    def _still_needed(self, sha: str) -> bool:
        return any(e.sha256 == sha for e in self.model.ents.values())

    async def _record_fetch_error(self, entry: CatalogEntry, reason: str) -> None:
        assert self.cache is not None
        async with self._lock:
            self.fetch_errors[entry.manifest_sha256] = f"{time.strftime('%H:%M:%S')} {reason}"
            tx = Tx()
            tx.event("fetch_failed", reason[:500], addin_id=entry.addin_id, revision=entry.revision)
            self.model.recompute(tx, entry.revision, entry.committed_at)
            await self._commit(tx)
        self._emit("fetch_failed", entry.revision, entry.committed_at, entry.addin_id)

    async def _record_manifest(
        self,
        entry: CatalogEntry,
        r: FetchResult,
        cause: tuple[int, float | None] | None = None,
    ) -> None:
        assert self.cache is not None and r.status != "failed"
        rec = ManifestRecord(
            r.sha256,
            r.addin_id,
            r.version,
            r.status,
            r.reason,
            r.permissions,
            r.hosts,
            r.fetched_at,
        )
        async with self._lock:
            tx = Tx(rows=self._keeps_rows)
            self.model.record_manifest(tx, rec, r.xml, self._store_xml, entry.revision)
            if r.status != "verified":
                log.warning("manifest of %s %s refused: %s", r.addin_id, r.version, r.reason)
            self.model.recompute(tx, entry.revision, entry.committed_at)
            await self._commit(tx)
        if r.status == "verified":
            rev, committed_at = cause or (entry.revision, entry.committed_at)
            self._emit("manifest_cached", rev, committed_at, entry.addin_id)
        # The server's console counts devices notified and cached from reports: one soon
        # (spread over the fleet, see CACHED_REPORT_SPREAD) says this change arrived and waits
        # for its host.
        self._schedule_report(CACHED_REPORT_SPREAD)

    # -- launch and user choices ---------------------------------------------------------------
    async def launch(self, host: Host | str) -> dict[str, str]:
        """The host app starts: apply its ready pending changes atomically, then return the
        installed set ``{addin_id: version}``. Waiting changes stay pending."""
        host = Host(host) if not isinstance(host, Host) else host
        if self.cache is None:
            await self.open()
        assert self.cache is not None
        async with self._lock:
            tx = Tx()
            new, applied = self.model.stage_launch(tx, host)
            # The applier goes first: if it fails nothing is recorded and the changes stay
            # pending; if we die after it, the next launch re-applies (appliers are idempotent).
            await self._write(host, {a: (i.version, i.sha256) for a, i in new.items()})
            if self.watcher is not None:
                self._staged[host] = Staged(
                    {a: i.sha256 for a, i in new.items()}, dict.fromkeys(new, time.time())
                )
            self.model.finish_launch(tx, host, new, applied)
            await self._commit(tx)
        for p in applied:
            self._emit("applied", p.revision, p.committed_at, p.addin_id, host)
            self._log_applied(p)
        if applied:
            self._schedule_report()
        return {a: i.version for a, i in new.items()}

    async def _write(self, host: Host, want: dict[str, tuple[str, str]]) -> None:
        """Make the applier hold exactly `want` ({addin_id: (version, sha256)}) for `host`;
        a failure is recorded as an `apply_failed` event and raised."""
        assert self.cache is not None
        files: dict[str, AppliedManifest] = {}
        # Read manifest bytes only for what the applier does not already hold intact.
        held = self.applier.current(host) if self.applier.needs_xml else {}
        for a, (version, sha) in want.items():
            xml = None
            if self.applier.needs_xml and held.get(a) != sha:
                xml = await self.cache.manifest_xml(sha)
            files[a] = AppliedManifest(a, version, sha, xml)
        try:
            self.applier.apply(host, files)
        except Exception as e:
            log.error("applying %s failed: %s", host, e)
            etx = Tx()
            etx.event("apply_failed", str(e)[:500], host=host.value)
            await self.cache.commit(etx)
            raise

    # -- host lifecycle (agent/hostwatch.py; with watch_hosts) --------------------------------
    async def _stage_idle(self) -> None:
        """Write the ready changes of every host that is not running to where it loads
        add-ins, so they take effect at its next start. Called under the lock after every
        transition; a host whose set did not change costs a dict comparison."""
        if self.watcher is None or self.cache is None:
            return
        for host in self.config.hosts:
            if not self.watcher.running(host):
                try:
                    await self._stage(host)
                except Exception:  # recorded by _write; tried again at the next transition
                    self._staged.pop(host, None)

    async def _stage(self, host: Host) -> None:
        want = self.model.next_set(host)
        files = {a: sha for a, (_, sha) in want.items()}
        prev = self._staged.get(host)
        if prev is not None and prev.files == files:
            return
        await self._write(host, want)
        now = time.time()
        if self.watcher is not None:
            # Look again now: a start noticed from here on happened after this write, so it
            # counts what was written (a start this look notices is not counted: it may have
            # read the location before the write).
            self.watcher.poll()
        prev = prev or Staged({}, {})
        ready = {a for (h, a), p in self.pending.items() if h == host and p.ready}
        ids = files.keys() | prev.files.keys() | ready
        self._staged[host] = Staged(
            files,
            {
                a: prev.at[a] if a in prev.at and prev.files.get(a) == files.get(a) else now
                for a in ids
            },
        )
        if not ready:
            return  # the location now matches what the host has: nothing for the log
        assert self.cache is not None
        tx = Tx()
        tx.event(
            "staged",
            f"{len(ready)} change(s) written for {host}'s next start ({len(files)} add-in(s))",
            host=host.value,
        )
        await self.cache.commit(tx)

    async def _note_running(self) -> None:
        """`why` and `status` read which hosts run from the cache."""
        assert self.cache is not None and self.watcher is not None
        tx = Tx()
        tx.sync(
            "hosts_running",
            {h.value: self.watcher.pids(h) for h in self.config.hosts if self.watcher.running(h)},
        )
        await self.cache.commit(tx)

    async def _host_event(self, e: HostEvent) -> None:
        if self.cache is None or self._stopping:
            return
        if e.kind == "exited":
            async with self._lock:
                tx = Tx()
                tx.event("host_exited", f"{e.host} exited (pid {e.pid})", host=e.host.value)
                await self.cache.commit(tx)
                await self._note_running()
                await self._stage_idle()
            return
        async with self._lock:
            # Only what was written before the host could have started counts as applied;
            # a change written during the last poll interval stays pending (its file is in
            # place: the next start counts it).
            st = self._staged.get(e.host, Staged({}, {}))
            only = {
                a
                for (h, a), p in self.pending.items()
                if h == e.host
                and p.ready
                and st.files.get(a) == (None if p.action == "remove" else p.sha256)
                and st.at.get(a, e.at) < e.since
            }
            tx = Tx()
            new, applied = self.model.stage_launch(tx, e.host, only)
            self.model.finish_launch(tx, e.host, new, applied, f" (detected, pid {e.pid})")
            await self._commit(tx)
            await self._note_running()
        for p in applied:
            self._emit("applied", p.revision, p.committed_at, p.addin_id, e.host)
            self._log_applied(p)
        if applied:
            self._schedule_report()

    async def _record_choice(self, c: UserChoice) -> str:
        if c.record:
            assert self.cache is not None
            async with self._lock:
                tx = Tx()
                self.model.set_choice(tx, c.addin_id, c.choice, c.detail)
                await self._commit(tx)
        return c.answer

    async def install(self, name_or_id: str) -> str:
        """The user installs an available add-in (or takes back an optional one they
        removed). Takes effect at the next launch of its hosts."""
        if self.cache is None:
            await self.open()
        return await self._record_choice(self.model.install_choice(name_or_id))

    async def remove(self, name_or_id: str) -> str:
        """The user removes an optional (or self-installed available) add-in; a fixed one is
        refused."""
        if self.cache is None:
            await self.open()
        return await self._record_choice(self.model.remove_choice(name_or_id))

    # -- connection events and reports -------------------------------------------------------
    async def _on_connect(self, session_present: bool) -> None:
        self._emit("connected", self.state.revision, None)
        if self.cache is None:
            return
        tx = Tx()
        tx.sync("session_started", 1)
        tx.sync("connected", 1)
        tx.sync("connected_at", tx.now)
        tx.sync("subscriptions", sorted(self.transport.subscribed) if self.transport else [])
        tx.event("connected", f"connected to {self.config.broker_host}:{self.config.broker_port}")
        await self.cache.commit(tx)
        await self.publish_report()
        self._after_report()

    async def _on_disconnect(self, reason: str, kind: str = "disconnected") -> None:
        if self.cache is None or self._stopping:
            return
        self._emit("disconnected", self.state.revision, None)
        tx = Tx()
        tx.sync("connected", 0)
        tx.sync("disconnected_at", tx.now)
        tx.sync("last_error", reason[:500])
        # `doctor` counts session_taken_over and connection_flapping: two agents with one
        # client id never stop knocking each other off the broker, and each looks healthy.
        tx.event(kind, reason[:500])
        await self.cache.commit(tx)

    async def _on_refused(self, filters: list[str]) -> None:
        """The broker refused subscriptions (the transport retries them; `filters` is empty
        once they are granted): what they carry does not arrive meanwhile, so the event log
        and the recorded subscriptions say so for `doctor`."""
        if filters:
            self._emit("subscription_refused", self.state.revision, None)
        if self.cache is None or self._stopping or self.transport is None:
            return
        tx = Tx()
        tx.sync("subscriptions", sorted(self.transport.subscribed))
        if filters:
            tx.event("subscription_refused", ("broker refused: " + ", ".join(filters))[:500])
        await self.cache.commit(tx)

    def report(self) -> AgentReport:
        return self.model.report(self.config.client_id)

    def _schedule_report(self, spread: float = 0.0) -> None:
        """Report REPORT_DELAY seconds from now (plus up to `spread`, at random); a report
        already due sooner covers this one, one due later is brought forward."""
        due = time.monotonic() + REPORT_DELAY + (random.uniform(0, spread) if spread else 0.0)
        task = self._report_task
        if task is not None and not task.done():
            if due >= self._report_due or not self._report_waiting:
                return  # due sooner, or publishing now (a later change reports again)
            task.cancel()
        self._report_due = due
        self._report_waiting = True
        self._report_task = asyncio.create_task(self._report_later(due))

    async def _report_later(self, due: float) -> None:
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        self._report_waiting = False
        with contextlib.suppress(Exception):  # best effort; the next change reports again
            await self.publish_report()
        self._after_report()

    def _after_report(self) -> None:
        if self.settled is not None and not self._fetching and not self._stopping:
            self.settled()

    async def publish_report(self) -> bool:
        if self.transport is None:
            return False
        topic = Topic.report(self.config.tenant, self.config.client_id)
        return bool(await self.transport.publish(str(topic), self.report().to_bytes()))


def security(cfg: AgentConfig) -> dict[str, bool]:
    """How this agent talks to the broker and the server, as `status` shows it."""
    return {
        "insecure": cfg.insecure,
        "broker_tls": cfg.broker_tls,
        "server_tls": cfg.server_tls,
        "signed_state": cfg.signing_key is not None,
    }


__all__ = ["Agent", "AgentEvent", "AgentRefusal"]


def _ready_set(pending: Mapping[PendingKey, PendingChange]) -> set[tuple[PendingKey, str | None]]:
    """The changes ready to apply, as the report's `cached` names them."""
    return {(k, p.to_version) for k, p in pending.items() if p.ready}

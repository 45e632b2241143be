"""The agent: composes config, cache, transport, resolver, fetcher and applier.

Every state transition (a message accepted, a manifest verified or refused, a launch, a
user's install/remove) runs under one lock, computes the new model in memory and commits
it to the cache as ONE transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from addin_core.protocol import (
    AgentReport,
    AnyPayload,
    AppliedAddin,
    CatalogEntry,
    Host,
    Mode,
    ProtocolError,
    Tombstone,
    Topic,
    TopicKind,
    decode,
)
from addin_runtime.cli_support import did_you_mean
from addin_runtime.tasks import cancel_and_wait
from agent.applier import AppliedManifest, Applier, FolderApplier, MemoryApplier
from agent.cache import Cache, Retention, Tx, VolatileCache, open_cache
from agent.config import AgentConfig
from agent.fetcher import Fetcher, FetchResult, HttpClient
from agent.pending import (
    InstalledAddin,
    ManifestRecord,
    PendingChange,
    PendingKey,
    carry_stamps,
    plan,
)
from agent.resolver import Entitlement, explain, resolve
from agent.state import Held, ReceivedState
from agent.subscriptions import ancestry, desired_filters

log = logging.getLogger("addin_agent")

EventKind = Literal[
    "notified", "manifest_cached", "applied", "connected", "disconnected", "fetch_failed"
]

REPORT_DELAY = 1.0
"""Reports after launches are coalesced over this many seconds: a user who starts Word, Excel
and Outlook together sends one report, and a fleet's server stores a third of the rows."""

FETCH_RETRY_DELAY = (5.0, 60.0)
"""After a round of fetch attempts fails, wait this long (jittered, doubling) to retry."""

STOP_TIMEOUT = 10.0
"""Seconds `stop` waits for cancelled manifest downloads before it goes on without them."""


@dataclass(frozen=True, slots=True)
class AgentEvent:
    """Reported synchronously to the `observer` (the simulator measures latency with it)."""

    kind: EventKind
    revision: int
    committed_at: float | None
    addin_id: str | None
    host: Host | None
    at: float


class AgentRefusal(Exception):
    """A user request the agent refuses (e.g. removing a fixed add-in); the message says why."""


def _hosts_text(hosts: tuple[Host, ...]) -> str:
    return ",".join(h.value for h in hosts)


def _hosts_parse(text: str | None) -> tuple[Host, ...]:
    return tuple(Host(h) for h in (text or "").split(",") if h)


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
        if applier is None:
            if config.applier == "folder":
                assert config.applier_dir is not None
                applier = FolderApplier(config.applier_dir)
            else:
                applier = MemoryApplier()
        self.applier: Applier = applier
        self._http = http
        self.fetcher: Fetcher | None = None
        self.cache: Cache | VolatileCache | None = None
        self.state = ReceivedState(config.tenant)
        self._ents: dict[str, Entitlement] = {}
        self.manifests: dict[str, ManifestRecord] = {}
        self._installed: dict[Host, dict[str, InstalledAddin]] = {}
        self.pending: dict[PendingKey, PendingChange] = {}
        self.choices: dict[str, str] = {}
        self.fetch_errors: dict[str, str] = {}
        self._fetching: dict[str, asyncio.Task[None]] = {}
        self._lock = asyncio.Lock()
        self._keeps_rows = True
        self._store_xml = True
        self.transport: Any = None
        self.control: Any = None
        self.stats = {"accepted": 0, "stale": 0, "invalid": 0}
        self._stopping = False
        self._report_task: asyncio.Task[None] | None = None
        self.anti_entropy: Any = None  # agent/antientropy.py, started by start()

    # -- public interface --------------------------------------------------------------------
    def entitlements(self) -> dict[str, Entitlement]:
        return dict(self._ents)

    def installed(self) -> dict[Host, dict[str, str]]:
        return {h: {a: i.version for a, i in s.items()} for h, s in self._installed.items() if s}

    @property
    def revision(self) -> int:
        return self.state.revision

    @property
    def fetching(self) -> int:
        """Manifests being downloaded (or waiting to retry) right now."""
        return len(self._fetching)

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
        from agent.transport import Transport

        self.fetcher = Fetcher(
            self.config.server_url,
            self.config.server_token,
            http=self._http,
            concurrency=self.config.fetch_concurrency,
        )
        assert self.cache is not None
        if self.config.control:
            from agent.control import ControlServer

            # Before the broker: an endpoint that cannot be created fails the start before
            # anything connects, and a daemon refused here never connects under the client id
            # of the one that holds the endpoint.
            self.control = ControlServer(self, self.config.control)
            await self.control.start()
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
        )
        self.transport.start()
        self._schedule_fetches()
        # -- anti-entropy hook (agent/antientropy.py; None when anti_entropy_interval = 0) --
        if self.anti_entropy is None:
            from agent.antientropy import AntiEntropy

            self.anti_entropy = AntiEntropy.start_for(self)
        await self.transport.first_attempt.wait()

    async def stop(self) -> None:
        """Stop every task of this agent; the cache is closed whatever happens on the way
        (an open aiosqlite connection is a non-daemon thread: the process could not exit)."""
        self._stopping = True
        try:
            await self._stop_tasks()
        finally:
            await self._close_cache()

    async def _stop_tasks(self) -> None:
        if self.anti_entropy is not None:  # anti-entropy hook (agent/antientropy.py)
            await self.anti_entropy.stop()
            self.anti_entropy = None
        if self.control is not None:
            await self.control.stop()
            self.control = None
        if self._report_task is not None:
            self._report_task.cancel()
            self._report_task = None
        fetches = list(self._fetching.items())
        self._fetching.clear()
        await asyncio.gather(
            *(cancel_and_wait(t, STOP_TIMEOUT, f"download of {sha[:12]}") for sha, t in fetches)
        )
        if self.transport is not None:
            transport, self.transport = self.transport, None
            await transport.stop()
        if self.fetcher is not None:
            fetcher, self.fetcher = self.fetcher, None
            await fetcher.aclose()

    async def _close_cache(self) -> None:
        if self.cache is not None:
            with contextlib.suppress(Exception):
                tx = Tx()
                tx.sync("connected", 0)
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
        for r in await c.fetchall("SELECT topic, payload FROM received"):
            try:
                topic = Topic.parse(r["topic"])
                payload = decode(topic, r["payload"])
            except ProtocolError as e:  # cannot happen unless edited by hand; keep going
                log.error("ignoring unreadable cached message %s: %s", r["topic"], e)
                continue
            self.state.apply(topic, payload)
        for r in await c.fetchall("SELECT * FROM manifests"):
            self.manifests[r["sha256"]] = ManifestRecord(
                r["sha256"],
                r["addin_id"],
                r["version"],
                r["status"],
                r["reason"],
                r["permissions"],
                _hosts_parse(r["hosts"]),
                r["fetched_at"],
            )
        for r in await c.fetchall("SELECT * FROM installed"):
            host = Host(r["host"])
            self._installed.setdefault(host, {})[r["addin_id"]] = InstalledAddin(
                host,
                r["addin_id"],
                r["name"],
                r["version"],
                r["sha256"],
                r["permissions"],
                _hosts_parse(r["hosts"]),
                r["installed_at"],
                r["revision"],
            )
        for r in await c.fetchall("SELECT * FROM pending"):
            host = Host(r["host"])
            self.pending[(host, r["addin_id"])] = PendingChange(
                host,
                r["addin_id"],
                r["name"],
                r["action"],
                r["from_version"],
                r["to_version"],
                r["sha256"],
                r["state"],
                r["reason"],
                r["since"],
                r["revision"],
                r["committed_at"],
            )
        for r in await c.fetchall("SELECT addin_id, choice FROM choices"):
            self.choices[r["addin_id"]] = r["choice"]
        for r in await c.fetchall("SELECT addin_id FROM entitlements"):
            # Placeholder so the first recompute writes only real differences.
            self._ents[r["addin_id"]] = None  # type: ignore[assignment]
        tx = Tx()
        self._recompute(tx, self.state.revision, None)
        tx.event("started", f"agent started (pid {os.getpid()})", revision=self.state.revision)
        tx.sync("pid", os.getpid())
        tx.sync("started_at", tx.now)
        tx.sync(
            "client",
            {
                "tenant": self.config.tenant,
                "user_id": self.config.user_id,
                "client_id": self.config.client_id,
                "hosts": [h.value for h in self.config.hosts],
            },
        )
        await c.commit(tx)

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

    def _removal_reason(self, addin_id: str, host: Host) -> str:
        ent = self._ents.get(addin_id)
        if ent is not None:
            if host not in ent.hosts:
                return f"it no longer supports {host}"
            if ent.mode == Mode.OPTIONAL:
                return "you removed it"
            return "it is now only available (not installed by default)"
        x = explain(self.state, self.config.user_id, addin_id, self.config.hosts)
        if x.entry is None:
            return "the admin removed it from the catalog"
        if not x.entry.enabled:
            return "the admin turned it off"
        if x.blocked:
            return "it now reaches you only through a nested group, and nesting is disabled"
        return "no assignment reaches you any more"

    def _recompute(self, tx: Tx, revision: int, committed_at: float | None) -> None:
        """Re-resolve entitlements and pending changes; write the differences into `tx`."""
        ents = resolve(self.state, self.config.user_id, self.config.hosts)
        old = self._ents
        self._ents = ents
        for addin_id, e in ents.items():
            if tx.rows and old.get(addin_id) != e:
                tx.upsert(
                    "entitlements",
                    {
                        "addin_id": addin_id,
                        "name": e.name,
                        "mode": e.mode.value,
                        "version": e.version,
                        "sha256": e.sha256,
                        "hosts": _hosts_text(e.hosts),
                        "permissions": e.permissions,
                        "via": "; ".join(g.describe() for g in e.grants),
                        "provenance": json.dumps([g.to_json() for g in e.grants]),
                        "resolved_at": tx.now,
                    },
                )
        for addin_id in old.keys() - ents.keys():
            tx.delete("entitlements", addin_id=addin_id)
            tx.event("unentitled", "no longer entitled", addin_id=addin_id, revision=revision)
        new = plan(
            ents,
            self._installed,
            self.manifests,
            self.choices,
            self.config.hosts,
            self._removal_reason,
            self.fetch_errors,
        )
        new = carry_stamps(new, self.pending, tx.now, revision, committed_at)
        for key, p in new.items():
            prev = self.pending.get(key)
            if tx.rows and (prev is None or prev.content() != p.content() or prev.since != p.since):
                tx.upsert("pending", _pending_row(p))
                tx.event(
                    "pending",
                    f"{p.action} {p.from_version or ''}→{p.to_version or ''}: {p.state}, {p.reason}",
                    addin_id=p.addin_id,
                    host=p.host.value,
                    revision=p.revision,
                )
        for key in self.pending.keys() - new.keys():
            tx.delete("pending", host=key[0].value, addin_id=key[1])
        self.pending = new

    async def handle_message(self, topic_str: str, payload_bytes: bytes) -> None:
        """One message from the broker. Invalid or stale ones change nothing."""
        try:
            topic = Topic.parse(topic_str)
            payload = _decode(topic, payload_bytes)
        except ProtocolError as e:
            self.stats["invalid"] += 1
            log.warning("refused message: %s", e)
            if self.cache is not None:
                tx = Tx()
                tx.event("invalid", str(e)[:500])
                await self.cache.commit(tx)
            return
        await self.accept(topic, payload)

    async def accept(self, topic: Topic, payload: AnyPayload) -> bool:
        if not self.state.is_newer(topic, payload):
            self.stats["stale"] += 1
            return False
        assert self.cache is not None
        async with self._lock:
            if not self.state.apply(topic, payload):
                self.stats["stale"] += 1
                return False
            self.stats["accepted"] += 1
            rev = int(getattr(payload, "revision", 0))
            committed_at = getattr(payload, "committed_at", None)
            tx = Tx(rows=self._keeps_rows)
            if tx.rows:
                tx.upsert("received", _received_row(topic, self.state.held[topic], tx.now))
                tx.event(
                    "received",
                    str(topic).split("/", 3)[3]
                    + (" (deleted)" if isinstance(payload, Tombstone) else ""),
                    addin_id=topic.addin_id,
                    revision=rev,
                )
            tx.sync("last_message_at", tx.now)
            tx.sync("revision", self.state.revision)
            if topic.kind in (TopicKind.MEMBER, TopicKind.GROUP_PARENTS):
                keep = ancestry(self.state, self.config.user_id)
                held_groups = {t.group_id for t in self.state.held if t.group_id is not None}
                gone = {g for g in held_groups if g not in keep}
                for t in self.state.forget_groups(gone):
                    tx.delete("received", topic=str(t))
                if gone:
                    tx.event("left_groups", ", ".join(sorted(gone)), revision=rev)
            self._recompute(tx, rev, committed_at)
            await self.cache.commit(tx)
        self._emit("notified", rev, committed_at, topic.addin_id)
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
        if self.fetcher is None or self._stopping:
            return
        for e in self._ents.values():
            if e.sha256 not in self.manifests and e.sha256 not in self._fetching:
                entry = self.state.catalog.get(e.addin_id)
                if entry is not None:
                    cause = (revision, committed_at) if revision > entry.revision else None
                    self._fetching[e.sha256] = asyncio.create_task(self._fetch_loop(entry, cause))

    async def _fetch_loop(
        self, entry: CatalogEntry, cause: tuple[int, float | None] | None = None
    ) -> None:
        sha = entry.manifest_sha256
        delay = FETCH_RETRY_DELAY[0]
        try:
            while self.fetcher is not None:
                result = await self.fetcher.fetch(entry)
                if result.status != "failed":
                    await self._record_manifest(entry, result, cause)
                    return
                await self._record_fetch_error(entry, result.reason or "failed")
                still_needed = any(e.sha256 == sha for e in self._ents.values())
                if not still_needed:
                    return
                await asyncio.sleep(random.uniform(delay / 2, delay))
                delay = min(delay * 2, FETCH_RETRY_DELAY[1])
        finally:
            self._fetching.pop(sha, None)

    async def _record_fetch_error(self, entry: CatalogEntry, reason: str) -> None:
        assert self.cache is not None
        async with self._lock:
            self.fetch_errors[entry.manifest_sha256] = f"{time.strftime('%H:%M:%S')} {reason}"
            tx = Tx()
            tx.event("fetch_failed", reason[:500], addin_id=entry.addin_id, revision=entry.revision)
            self._recompute(tx, entry.revision, entry.committed_at)
            await self.cache.commit(tx)
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
            self.manifests[r.sha256] = rec
            self.fetch_errors.pop(r.sha256, None)
            tx = Tx(rows=self._keeps_rows)
            tx.upsert(
                "manifests",
                {
                    "sha256": r.sha256,
                    "addin_id": r.addin_id,
                    "version": r.version,
                    "status": r.status,
                    "reason": r.reason,
                    "permissions": r.permissions,
                    "hosts": _hosts_text(r.hosts),
                    "size": len(r.xml) if r.xml is not None else None,
                    "fetched_at": r.fetched_at,
                    "xml": r.xml if self._store_xml else None,
                },
            )
            if r.status == "verified":
                tx.event(
                    "manifest_verified",
                    f"{r.version} sha256 {r.sha256[:12]}…",
                    addin_id=r.addin_id,
                    revision=entry.revision,
                )
            else:
                tx.event(
                    "manifest_refused", r.reason or "", addin_id=r.addin_id, revision=entry.revision
                )
                log.warning("manifest of %s %s refused: %s", r.addin_id, r.version, r.reason)
            self._recompute(tx, entry.revision, entry.committed_at)
            await self.cache.commit(tx)
        if r.status == "verified":
            rev, committed_at = cause or (entry.revision, entry.committed_at)
            self._emit("manifest_cached", rev, committed_at, entry.addin_id)

    # -- launch and user choices ---------------------------------------------------------------
    async def _manifest_xml(self, sha: str) -> bytes | None:
        assert self.cache is not None
        return await self.cache.manifest_xml(sha)

    async def launch(self, host: Host | str) -> dict[str, str]:
        """The host app starts: apply its ready pending changes atomically, then return the
        installed set ``{addin_id: version}``. Waiting changes stay pending."""
        host = Host(host) if not isinstance(host, Host) else host
        if self.cache is None:
            await self.open()
        assert self.cache is not None
        applied: list[PendingChange] = []
        async with self._lock:
            current = dict(self._installed.get(host, {}))
            ready = [p for (h, _), p in self.pending.items() if h == host and p.ready]
            tx = Tx()
            new = dict(current)
            for p in ready:
                if p.action == "remove":
                    new.pop(p.addin_id, None)
                    tx.delete("installed", host=host.value, addin_id=p.addin_id)
                else:
                    ent = self._ents[p.addin_id]
                    rec = self.manifests[ent.sha256]
                    inst = InstalledAddin(
                        host,
                        p.addin_id,
                        ent.name,
                        ent.version,
                        ent.sha256,
                        ent.permissions,
                        rec.hosts or ent.catalog_hosts,
                        tx.now,
                        p.revision,
                    )
                    new[p.addin_id] = inst
                    tx.upsert("installed", _installed_row(inst))
                tx.delete("pending", host=host.value, addin_id=p.addin_id)
                tx.event(
                    "applied",
                    f"{p.action} {p.from_version or ''}→{p.to_version or ''} at {host} launch",
                    addin_id=p.addin_id,
                    host=host.value,
                    revision=p.revision,
                )
                applied.append(p)
            # The applier goes first: if it fails nothing is recorded and the changes stay
            # pending; if we die after it, the next launch re-applies (appliers are idempotent).
            files: dict[str, AppliedManifest] = {}
            # Read manifest bytes only for what the applier does not already hold intact.
            held = self.applier.current(host) if self.applier.needs_xml else {}
            for a, inst in new.items():
                xml = None
                if self.applier.needs_xml and held.get(a) != inst.sha256:
                    xml = await self._manifest_xml(inst.sha256)
                files[a] = AppliedManifest(a, inst.version, inst.sha256, xml)
            try:
                self.applier.apply(host, files)
            except Exception as e:
                log.error("applying %s failed: %s", host, e)
                etx = Tx()
                etx.event("apply_failed", str(e)[:500], host=host.value)
                await self.cache.commit(etx)
                raise
            tx.event(
                "launch",
                f"{host} started: {len(applied)} change(s) applied",
                host=host.value,
                revision=self.state.revision,
            )
            tx.sync(f"last_launch_{host.value}", tx.now)
            self._installed[host] = new
            for p in applied:
                self.pending.pop((host, p.addin_id), None)
            if applied:  # an empty launch changes no entitlement or other host's pending
                self._recompute(tx, self.state.revision, None)
            await self.cache.commit(tx)
        for p in applied:
            self._emit("applied", p.revision, p.committed_at, p.addin_id, host)
        if applied:
            self._schedule_report()
        return {a: i.version for a, i in new.items()}

    async def _set_choice(self, addin_id: str, choice: str | None, detail: str) -> None:
        assert self.cache is not None
        async with self._lock:
            tx = Tx()
            if choice is None:
                self.choices.pop(addin_id, None)
                tx.delete("choices", addin_id=addin_id)
            else:
                self.choices[addin_id] = choice
                tx.upsert("choices", {"addin_id": addin_id, "choice": choice, "at": tx.now})
            tx.event("user_choice", detail, addin_id=addin_id, revision=self.state.revision)
            self._recompute(tx, self.state.revision, None)
            await self.cache.commit(tx)

    def find_addin(self, name_or_id: str) -> str:
        """Resolve a user's spelling (id or display name, any case) to an add-in id."""
        if name_or_id in self.state.catalog or name_or_id in self._ents:
            return name_or_id
        low = name_or_id.lower()
        for a, e in self.state.catalog.items():
            if a.lower() == low or e.name.lower() == low:
                return a
        raise AgentRefusal(
            f"no add-in called {name_or_id!r} is in this computer's catalog"
            + did_you_mean(name_or_id, [e.name for e in self.state.catalog.values()])
        )

    async def install(self, name_or_id: str) -> str:
        """The user installs an available add-in (or takes back an optional one they
        removed). Takes effect at the next launch of its hosts."""
        if self.cache is None:
            await self.open()
        addin_id = self.find_addin(name_or_id)
        ent = self._ents.get(addin_id)
        if ent is None:
            raise AgentRefusal(f"{name_or_id} is not assigned to you; ask your admin")
        if ent.mode == Mode.FIXED:
            return f"{ent.name} is fixed by your admin: it is always installed"
        if ent.mode == Mode.OPTIONAL:
            await self._set_choice(addin_id, None, "user takes back an optional add-in")
        else:
            await self._set_choice(addin_id, "install", "user installs an available add-in")
        hosts = ", ".join(ent.hosts)
        return f"{ent.name} will be installed when {hosts} next start(s)"

    async def remove(self, name_or_id: str) -> str:
        """The user removes an optional (or self-installed available) add-in; a fixed one is
        refused."""
        if self.cache is None:
            await self.open()
        addin_id = self.find_addin(name_or_id)
        ent = self._ents.get(addin_id)
        if ent is None:
            raise AgentRefusal(
                f"{name_or_id} is not assigned to you, so there is nothing to remove"
            )
        if ent.mode == Mode.FIXED:
            raise AgentRefusal(
                f"{ent.name} is deployed as fixed by your admin and cannot be removed"
            )
        if ent.mode == Mode.OPTIONAL:
            await self._set_choice(addin_id, "remove", "user removes an optional add-in")
        else:
            await self._set_choice(addin_id, None, "user removes an available add-in")
        return f"{ent.name} will be removed when {', '.join(ent.hosts)} next start(s)"

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

    def report(self) -> AgentReport:
        applied = [
            AppliedAddin(addin_id=a, version=i.version, host=h)
            for h, s in sorted(self._installed.items())
            for a, i in sorted(s.items())
        ]
        errors = [
            f"{p.host} {p.name} {p.to_version}: {p.reason}"[:500]
            for p in self.pending.values()
            if p.state != "ready" and not p.reason.startswith("manifest not downloaded")
        ][:100]
        return AgentReport(
            client_id=self.config.client_id,
            user_id=self.config.user_id,
            revision=self.state.revision,
            reported_at=time.time(),
            applied=applied[:4000],
            errors=errors,
        )

    def _schedule_report(self) -> None:
        if self._report_task is None or self._report_task.done():
            self._report_task = asyncio.create_task(self._report_later())

    async def _report_later(self) -> None:
        await asyncio.sleep(REPORT_DELAY)
        with contextlib.suppress(Exception):  # best effort; the next change reports again
            await self.publish_report()

    async def publish_report(self) -> bool:
        if self.transport is None:
            return False
        topic = Topic.report(self.config.tenant, self.config.client_id)
        return bool(await self.transport.publish(str(topic), self.report().to_bytes()))


_DECODED_MAX = 1024
_DECODED_MAX_BYTES = 4096
"""Only small payloads are remembered: 1,024 of them stay under 5 MB whatever is sent."""


@functools.lru_cache(maxsize=_DECODED_MAX)
def _decode_remembered(topic: Topic, payload: bytes) -> AnyPayload:
    return decode(topic, payload)  # a refusal is raised, never remembered


def _decode(topic: Topic, payload: bytes) -> AnyPayload:
    """`decode`, remembering recent results: payloads are immutable models, and a process
    running many agents (the simulator) receives the same message once per agent."""
    if len(payload) > _DECODED_MAX_BYTES:
        return decode(topic, payload)
    return _decode_remembered(topic, payload)


def _received_row(topic: Topic, held: Held, now: float) -> dict[str, Any]:
    return {
        "topic": str(topic),
        "kind": topic.kind.value,
        "addin_id": topic.addin_id,
        "group_id": topic.group_id,
        "revision": held.revision,
        "committed_at": held.committed_at,
        "received_at": now,
        "deleted": int(isinstance(held.payload, Tombstone)),
        "payload": held.payload.model_dump_json(exclude_none=True),
    }


def _installed_row(i: InstalledAddin) -> dict[str, Any]:
    return {
        "host": i.host.value,
        "addin_id": i.addin_id,
        "name": i.name,
        "version": i.version,
        "sha256": i.sha256,
        "permissions": i.permissions,
        "hosts": _hosts_text(i.hosts),
        "installed_at": i.installed_at,
        "revision": i.revision,
    }


def _pending_row(p: PendingChange) -> dict[str, Any]:
    return {
        "host": p.host.value,
        "addin_id": p.addin_id,
        "name": p.name,
        "action": p.action,
        "from_version": p.from_version,
        "to_version": p.to_version,
        "sha256": p.sha256,
        "state": p.state,
        "reason": p.reason,
        "since": p.since,
        "revision": p.revision,
        "committed_at": p.committed_at,
    }

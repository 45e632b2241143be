"""A simulation worker: N virtual clients — each a real `agent.daemon.Agent` — on one event loop.

Only two things differ from a workstation: the applier is in memory and the cache is an
in-memory SQLite database (or one SQLite file per client, for scenarios where clients go
offline and come back with their cache). All agents of a worker share one `HttpPool`
(one connection pool) to fetch manifests.

The worker obeys the coordinator's commands on the control channel (`simulator.control`),
records every agent event's latency (event time minus the commit time the server stamped on
the message) into HDR histograms keyed by revision, and answers with encoded histograms,
convergence times and mismatches. `addin-sim worker --run ID --broker URL --server URL` runs
one, on this machine or another.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import random
import signal
import socket
import time
import uuid
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from addin_core.protocol import Host
from addin_runtime.tasks import cancel_and_wait
from agent.http_pool import HttpPool
from agent.tls import https_context
from simulator import control
from simulator.baseline import HTTP_CONNECTIONS, HTTP_TIMEOUT, Download, baseline_in_loop
from simulator.control import BrokerAddress, ControlChannel
from simulator.fleetstats import AGENT_EVENTS, FleetStats, MeteredHttpPool
from simulator.metrics import ProcessMonitor, StageSet
from simulator.oracle import diff_entitlements, diff_installed
from simulator.sources import source_address

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 1.0
"""Seconds between two heartbeats (`control.alive_topic`)."""

MAX_REPLIES = 32
"""Results kept in the retained reply when the coordinator does not delete commands."""

CONNECT_CONCURRENCY = 50
"""Mosquitto drops connects beyond about 100 in flight (then clients retry after 1-3 s)."""

FREEZE_EVERY = 250
"""Agents started between two `gc.freeze()` calls."""

LAUNCH_CONCURRENCY = 100
"""Poisson launches in flight at once per worker (the rest wait their turn, in order)."""

STAGE_OF_KIND = {"notified": "notified", "manifest_cached": "cached", "applied": "applied"}


def expand(compact: Mapping[str, Any]) -> dict[str, Any]:
    """Expected values are shipped as {"values": [...], "users": {user: index}}: most users
    share one expectation, so the message stays small at 10,000 users."""
    values = compact["values"]
    return {u: values[i] for u, i in compact["users"].items()}


class VirtualClient:
    def __init__(self, client_id: str, user_id: str, token: str | None = None) -> None:
        self.client_id = client_id
        self.user_id = user_id
        self.token = token
        """With --tls: its device's HTTP token (else the run's shared agent token)."""
        self.agent: Any = None
        self.online = False
        self.running = False
        """Started (or starting) and not stopped since: its agent holds a cache and tasks."""
        self.started_at = 0.0
        self.changed_at = 0.0
        """When its agent last accepted a state message (its entitlements may have changed)."""
        self.connected_once = False
        """Whether its current agent has connected since it started (later connects are
        reconnects)."""


class Worker:
    def __init__(
        self,
        run: str,
        broker: BrokerAddress,
        server_url: str,
        *,
        wid: str | None = None,
        cache_dir: Path | None = None,
        role: str = "worker",
    ) -> None:
        self.run = run
        self.broker = broker
        self.server_url = server_url
        self.wid = wid or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
        self.cache_dir = cache_dir
        self.clients: dict[str, VirtualClient] = {}
        self.http: HttpPool | None = None
        self.by_revision: dict[int, StageSet] = {}
        self.cold = StageSet()
        self.cold_revision = 0
        self._seen: set[tuple[str, str, int]] = set()
        self.fleet = FleetStats()
        self.monitor = ProcessMonitor(role)
        self._obeyed: set[int] = set()
        """Sequence numbers of the commands received: each is obeyed once."""
        self._replies: dict[str, dict[str, Any]] = {}
        self._done = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self.channel = ControlChannel(
            broker,
            f"w-{self.wid}",
            [control.cmd_filter(run)],
            self._on_message,
            deliver_clears=True,
        )
        self.agent_settings: dict[str, Any] = {}
        self._launch_slots = asyncio.Semaphore(LAUNCH_CONCURRENCY)
        self._converging: list[set[str]] = []
        """One set per running `converge` command: clients notified since its last pass."""
        self.storms: dict[str, dict[str, Any]] = {}
        """Per step that started clients (the connect storm): {"clients", "connected",
        "last"} (when the last of them connected, epoch seconds)."""
        self._storm_of: dict[str, dict[str, Any]] = {}
        """Client id -> the storm it is part of, until it has connected."""

    # -- control --------------------------------------------------------------------------
    async def serve(self) -> None:
        """Join the run and obey commands until `shutdown` (or until cancelled: the agents
        are stopped and their caches closed either way)."""
        await self.channel.start()
        heartbeat = asyncio.create_task(self._heartbeat(), name=f"heartbeat-{self.wid}")
        try:
            await self.channel.publish_state(
                control.hello_topic(self.run, self.wid),
                {"wid": self.wid, "pid": os.getpid(), "host": socket.gethostname()},
            )
            await self._done.wait()
        finally:
            heartbeat.cancel()
            try:
                await self._teardown()
            finally:
                await self.channel.clear(control.hello_topic(self.run, self.wid))
                await self.channel.clear(control.reply_topic(self.run, self.wid))
                await self.channel.close()

    def stop(self) -> None:
        """Leave the run: `serve` stops every agent and returns."""
        self._done.set()

    async def _heartbeat(self) -> None:
        while True:
            await self.channel.publish_if_connected(
                control.alive_topic(self.run, self.wid),
                {"wid": self.wid, "seen": sorted(self._obeyed)[-64:]},
            )
            await asyncio.sleep(HEARTBEAT_INTERVAL)

    async def _on_message(self, topic: str, data: dict[str, Any]) -> None:
        try:
            seq = int(topic.rsplit("/", 1)[1])
        except ValueError:
            return
        if not data:
            # The coordinator has every worker's answer and deleted the command.
            self._replies.pop(str(seq), None)
            return
        if seq in self._obeyed:
            return  # published again after a reconnect
        self._obeyed.add(seq)
        gc.freeze()  # see _start_clients: what exists now lives on, a step's garbage does not
        task = asyncio.create_task(
            self._obey(seq, data["cmd"], data.get("args", {})), name=f"{seq} {data['cmd']}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reply(self, seq: int, result: dict[str, Any]) -> None:
        # Commands overlap (convergence polling runs while launches happen), so the retained
        # reply holds the result of every command the coordinator has not deleted yet.
        self._replies[str(seq)] = result
        for old in sorted(self._replies, key=int)[:-MAX_REPLIES]:
            del self._replies[old]
        await self.channel.publish_state(
            control.reply_topic(self.run, self.wid), {"wid": self.wid, "replies": self._replies}
        )

    async def _obey(self, seq: int, cmd: str, args: dict[str, Any]) -> None:
        try:
            handler = getattr(self, f"cmd_{cmd}")
            result = await handler(seq, args)
            await self._reply(seq, {"ok": True, "result": result})
        except Exception as e:  # reported to the coordinator, which fails the run clearly
            log.exception("command %s failed", cmd)
            await self._reply(seq, {"ok": False, "error": f"{type(e).__name__}: {e}"})

    # -- commands -------------------------------------------------------------------------
    async def cmd_start(self, seq: int, args: dict[str, Any]) -> dict[str, Any]:
        """Create and start this worker's agents: args.clients = [[client_id, user_id], ...]."""
        self.agent_settings = dict(args["agent"])
        self.cold_revision = int(args.get("cold_revision", 0))
        mine = args["shards"].get(self.wid, [])
        for client_id, user_id, *token in mine:
            self.clients[client_id] = VirtualClient(client_id, user_id, *token)
        if self.http is None:
            # One pool for every agent; with --tls it verifies the server with the run's CA.
            first = next(iter(self.clients.values()), None)
            https = None if first is None else https_context(self._config(first))
            self.http = MeteredHttpPool(
                self.fleet,
                max_connections=HTTP_CONNECTIONS,
                timeout=HTTP_TIMEOUT,
                ssl_context=https,
            )
        await self._start_clients(list(self.clients.values()), seq, args.get("storm"))
        return {"clients": len(self.clients)}

    async def _start_clients(
        self, clients: list[VirtualClient], seq: int, storm: str | None = None
    ) -> None:
        if storm is not None:
            record = self.storms[storm] = {"clients": len(clients), "connected": 0, "last": 0.0}
            self._storm_of.update((c.client_id, record) for c in clients)
        sem = asyncio.Semaphore(CONNECT_CONCURRENCY)
        done = 0
        last_progress = time.monotonic()

        async def one(c: VirtualClient) -> None:
            nonlocal done, last_progress
            async with sem:
                c.agent = self._make_agent(c)
                c.started_at = time.time()
                c.running = True
                await c.agent.start()
                c.online = True
            done += 1
            if done % FREEZE_EVERY == 0 or done == len(clients):
                # Thousands of agents are millions of long-lived objects: a full collection
                # walking them stalls the loop for up to a second (measured 11 s of GC while
                # 5,000 agents connected), in the middle of a fan-out too. They live as long
                # as the run, so they leave the cyclic collector's view (refcounting still
                # frees them).
                gc.freeze()
            if time.monotonic() - last_progress > 0.25 or done == len(clients):
                last_progress = time.monotonic()
                await self.channel.publish_if_connected(
                    f"{control.PREFIX}/{self.run}/worker/{self.wid}/progress",
                    {"seq": seq, "done": done, "total": len(clients)},
                )

        await asyncio.gather(*(one(c) for c in clients))

    def _make_agent(self, c: VirtualClient) -> Any:
        from agent.applier import MemoryApplier
        from agent.daemon import Agent

        if c.agent is not None:  # restarted: keep what the previous agent counted
            self.fleet.add_messages(c.agent.stats)
        c.connected_once = False
        return Agent(
            self._config(c), http=self.http, applier=MemoryApplier(), observer=self._observer(c)
        )

    def _agent_broker(self, client_id: str, brokers: list[str]) -> str:
        """The run's broker, or with `--agent-broker` one of those, the same for a client
        in every run (the nodes of a cluster share the clients evenly)."""
        if not brokers:
            return self.broker.url
        return BrokerAddress.parse(brokers[zlib.crc32(client_id.encode()) % len(brokers)]).url

    def _config(self, c: VirtualClient) -> Any:
        from agent.config import AgentConfig

        s = self.agent_settings
        if s.get("cache") == "file" and self.cache_dir is not None:
            cache_path = str(self.cache_dir / f"{c.client_id}.sqlite")
        elif s.get("cache") == "none":
            cache_path = ":none:"
        else:
            cache_path = ":memory:"
        common: dict[str, Any] = dict(
            tenant=s["tenant"],
            user_id=c.user_id,
            client_id=c.client_id,
            server_url=self.server_url,
            cache_path=cache_path,
            applier="memory",
            control=None,
            watch_hosts=False,  # no Office here, and thousands of agents in one process
            mqtt_version=s.get("mqtt_version", "auto"),
        )
        if s.get("anti_entropy") is not None:
            common["anti_entropy_interval"] = s["anti_entropy"]
        tls = s.get("tls")
        if tls is not None:
            # --tls: the device's own certificate (its CN is the client id) and token, as
            # in the agent.toml `addin-server enroll` writes; nothing insecure.
            devices = Path(tls["devices"])
            return AgentConfig(
                **common,
                broker_url=tls["broker_url"],
                mqtt_source_address=_source(c.client_id, tls["broker_url"]),
                server_token=c.token,
                signing_key=s["signing_key"],
                tls_ca=tls["ca"],
                tls_cert=str(devices / f"{c.client_id}.crt"),
                tls_key=str(devices / f"{c.client_id}.key"),
            )
        broker_url = self._agent_broker(c.client_id, s.get("brokers") or [])
        return AgentConfig(
            **common,
            insecure=True,  # the simulated fleet runs on a private loopback broker
            broker_url=broker_url,
            mqtt_source_address=_source(c.client_id, broker_url),
            broker_username=self.broker.username,
            broker_password=self.broker.password,
            server_token=s.get("agent_token"),
            # Every state message verified, as on a real workstation; unsigned only when
            # the run was given a server without its key.
            signing_key=s.get("signing_key"),
        )

    def _observer(self, c: VirtualClient) -> Any:
        def observe(event: Any) -> None:
            if event.kind in AGENT_EVENTS:
                self.fleet.events[event.kind] += 1
                if event.kind == "connected":
                    if c.connected_once:
                        self.fleet.reconnects += 1
                    c.connected_once = True
                    storm = self._storm_of.pop(c.client_id, None)
                    if storm is not None:
                        storm["connected"] += 1
                        storm["last"] = max(storm["last"], event.at)
                return
            if event.kind == "notified":
                c.changed_at = event.at
                for touched in self._converging:
                    touched.add(c.client_id)
            stage = STAGE_OF_KIND.get(event.kind)
            if stage is None:
                return
            revision = int(event.revision or 0)
            key = (c.client_id, stage, revision)
            if key in self._seen:
                return
            self._seen.add(key)
            if revision <= self.cold_revision:
                # State that existed before the client started: measured from its start.
                self.cold.record(stage, event.at - c.started_at)
                self.fleet.timeline.record(stage, event.at, event.at - c.started_at)
            elif event.committed_at:
                # Not setdefault(revision, StageSet()): that would build (and drop) three HDR
                # histograms, ~200 KB of counters, for every event.
                stages = self.by_revision.get(revision)
                if stages is None:
                    stages = self.by_revision[revision] = StageSet()
                stages.record(stage, event.at - event.committed_at)
                self.fleet.timeline.record(stage, event.at, event.at - event.committed_at)

        return observe

    async def cmd_converge(self, seq: int, args: dict[str, Any]) -> dict[str, Any]:
        """Poll entitlements until every online client matches the oracle or time runs out.

        Returns each converged client's time (seconds after args.t0) for the convergence curve:
        when its agent accepted the message that made it match (or when it started, if later),
        not when this loop noticed — under load this command itself arrives seconds late.
        """
        expected = expand(args["expected"])
        t0, deadline = float(args["t0"]), time.monotonic() + float(args["timeout"])
        pending = {cid for cid, c in self.clients.items() if c.online}
        offsets: list[float] = []
        # Entitlements change only when an agent accepts a message ("notified"): after the
        # first pass only those clients are compared again. Comparing all 5,000 every 50 ms
        # took CPU from the very fan-out being measured.
        touched: set[str] = set()
        self._converging.append(touched)
        try:
            check, passes = set(pending), 0
            while pending:
                now = time.time()
                for cid in check & pending:
                    c = self.clients[cid]
                    if not diff_entitlements(expected.get(c.user_id, {}), self._ents(c)):
                        at = min(now, max(c.changed_at, c.started_at))
                        offsets.append(max(0.0, at - t0))
                        pending.discard(cid)
                if not pending or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
                passes += 1
                # A full pass each second all the same: a client restarted from its cache
                # may match without any new message.
                check = set(pending) if passes % 20 == 0 else set(touched)
                touched.clear()
        finally:
            self._converging.remove(touched)
        return {"offsets": offsets, "unconverged": len(pending)}

    @staticmethod
    def _ents(c: VirtualClient) -> dict[str, str]:
        return {a: str(e.mode) for a, e in c.agent.entitlements().items()}

    @staticmethod
    def _inst(c: VirtualClient) -> dict[str, dict[str, str]]:
        return {str(h): dict(v) for h, v in c.agent.installed().items()}

    async def cmd_checkpoint(self, seq: int, args: dict[str, Any]) -> dict[str, Any]:
        """Launch every host of every online client, then compare entitlements and installed
        sets with the oracle. Clients still fetching a manifest get more launches until the
        deadline; what still differs then is a mismatch."""
        ents, inst = expand(args["entitlements"]), expand(args["installed"])
        deadline = time.monotonic() + float(args["timeout"])
        sem = asyncio.Semaphore(200)
        todo = [c for c in self.clients.values() if c.online]
        # Launching a client that is still downloading a manifest only finds the change
        # waiting, and 4 launches x 5,000 clients would take the CPU those downloads need
        # (it tripled the 10,000-client cached p99). Let the downloads finish first.
        while time.monotonic() < deadline:
            if not any(c.agent.fetching for c in todo):
                break
            await asyncio.sleep(0.1)
        mismatches: list[dict[str, Any]] = []
        while todo:

            async def launch_all(c: VirtualClient) -> None:
                async with sem:
                    for h in Host:
                        await c.agent.launch(h)

            await asyncio.gather(*(launch_all(c) for c in todo))
            mismatches = []
            for c in todo:
                diff = diff_entitlements(ents.get(c.user_id, {}), self._ents(c))
                diff += diff_installed(inst.get(c.user_id, {}), self._inst(c))
                if diff:
                    mismatches.append({"client": c.client_id, "user": c.user_id, "diff": diff})
            if not mismatches or time.monotonic() > deadline:
                break
            retry = {m["client"] for m in mismatches}
            todo = [c for c in todo if c.client_id in retry]
            await asyncio.sleep(0.25)
        return {"checked": sum(c.online for c in self.clients.values()), "mismatches": mismatches}

    async def cmd_launches(self, seq: int, args: dict[str, Any]) -> dict[str, Any]:
        """Poisson app launches: each online user launches a random host at `rate` per second,
        for `duration` seconds (the superposition of per-user Poisson processes is one Poisson
        process with the summed rate, picking a user uniformly)."""
        rng = random.Random(f"{args.get('seed', 1)}:{self.wid}:{seq}")
        online = [c for c in self.clients.values() if c.online]
        total_rate = float(args["rate"]) * len(online)
        end = time.monotonic() + float(args["duration"])
        launched = 0
        tasks: set[asyncio.Task[Any]] = set()
        while online and total_rate > 0:
            await asyncio.sleep(rng.expovariate(total_rate))
            if time.monotonic() > end:
                break
            c = rng.choice(online)
            t = asyncio.create_task(self._bounded_launch(c, rng.choice(list(Host))))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
            launched += 1
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        return {"launched": launched}

    async def _bounded_launch(self, c: VirtualClient, host: Host) -> None:
        # A launch that applies changes also publishes a report (a server write): at most
        # LAUNCH_CONCURRENCY in flight, so a burst cannot starve message handling.
        async with self._launch_slots:
            await c.agent.launch(host)

    async def cmd_offline(self, seq: int, args: dict[str, Any]) -> dict[str, Any]:
        chosen = [cid for cid in args["clients"] if cid in self.clients]
        for cid in chosen:
            c = self.clients[cid]
            if c.online:
                c.online = False
                c.running = False
                await c.agent.stop()
        return {"offline": len(chosen)}

    async def cmd_online(self, seq: int, args: dict[str, Any]) -> dict[str, Any]:
        back = [c for c in self.clients.values() if not c.online]
        await self._start_clients(back, seq, args.get("storm"))
        return {"online": len(back)}

    async def cmd_stats(self, seq: int, args: dict[str, Any]) -> dict[str, Any]:
        steps: dict[str, dict[str, str]] = {}
        for name, revisions in args["steps"].items():
            s = StageSet()
            for r in revisions:
                if int(r) in self.by_revision:
                    s.merge(self.by_revision[int(r)])
            steps[name] = s.encode()
        fleet = FleetStats.decode(self.fleet.encode())
        for c in self.clients.values():
            if c.agent is not None:
                fleet.add_messages(c.agent.stats)
        return {
            "steps": steps,
            "cold": self.cold.encode(),
            "fleet": fleet.encode(),
            "process": self.monitor.result().as_dict(),
            "clients": len(self.clients),
            "storms": self.storms,
        }

    async def cmd_baseline(self, seq: int, args: dict[str, Any]) -> dict[str, Any]:
        n = int(args["shares"].get(self.wid, 0))

        async def ready() -> None:
            gc.freeze()  # the same collector policy as the agents get
            await self._reply(seq, {"ok": True, "phase": "ready"})

        download = args.get("download")
        hist, received, failed, notified = await baseline_in_loop(
            self.broker,
            args["topic"],
            n,
            f"addin-sim-bare-{self.wid}",
            ready,
            float(args.get("timeout", 30)),
            args.get("subscriber", "paho"),
            Download(**download) if download else None,
        )
        out = {"hist": hist.encode(), "received": received, "failed": failed}
        if notified is not None:
            out["notified"] = notified.encode()
        return out

    async def cmd_sample(self, seq: int, args: dict[str, Any]) -> dict[str, Any]:
        self.monitor.sample()
        return {}

    async def cmd_shutdown(self, seq: int, args: dict[str, Any]) -> dict[str, Any]:
        log.warning("worker %s: the coordinator ends the run (command %d)", self.wid, seq)
        await self._teardown()
        result = {"process": self.monitor.result().as_dict()}
        asyncio.get_running_loop().call_later(0.5, self._done.set)
        return result

    async def _teardown(self) -> None:
        self.monitor.sample()
        # Commands still running (only when the run ends early) would use stopped agents, and
        # a launch reopens a stopped agent's cache.
        me = asyncio.current_task()
        await asyncio.gather(
            *(cancel_and_wait(t, 10, f"command {t.get_name()}") for t in self._tasks if t is not me)
        )
        sem = asyncio.Semaphore(200)

        async def stop(c: VirtualClient) -> None:
            async with sem:
                if c.running:
                    c.online = c.running = False
                    try:
                        await c.agent.stop()  # bounded; closes the cache whatever happens
                    except Exception:
                        log.exception("stopping %s failed", c.client_id)

        try:
            await asyncio.gather(*(stop(c) for c in self.clients.values()))
        finally:
            # Cancelled while some still waited for their turn: stop those all at once
            # (each stop is bounded), or their cache threads would keep the process alive.
            left = [c for c in self.clients.values() if c.running]
            for c in left:
                c.online = c.running = False
            if left:
                await asyncio.gather(*(c.agent.stop() for c in left), return_exceptions=True)
            if self.http is not None:
                http, self.http = self.http, None
                await http.aclose()


async def run_worker(
    run: str, broker_url: str, server_url: str, cache_dir: Path | None = None
) -> None:
    w = Worker(run, BrokerAddress.parse(broker_url), server_url, cache_dir=cache_dir)
    # SIGTERM (the coordinator ending a failed run, or an operator) stops the agents first.
    loop = asyncio.get_running_loop()

    def stop_on(sig: signal.Signals) -> None:
        # Said in the worker's log: otherwise the coordinator only sees an exit status 0.
        log.warning("worker %s: %s received, stopping its agents", w.wid, sig.name)
        w.stop()

    for sig in (signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop_on, sig)
    await w.serve()


def _source(client_id: str, broker_url: str) -> str | None:
    return source_address(client_id, urlsplit(broker_url).hostname or "")

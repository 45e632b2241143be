"""The coordinator: sets up broker, server and workers, drives a scenario, checks the oracle.

It owns the ground truth. Every admin action goes to the server's HTTP admin API and, once the
server accepted it, to the oracle; after each step every worker polls its agents until their
entitlements equal the oracle's, and at checkpoints launches every host app and compares the
installed sets too. Workers (subprocesses here, or `addin-sim worker` on other machines, or
in-process for tests) are driven over the broker (`simulator.control`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from addin_core.protocol import Filters, Host, Mode
from addin_runtime.tasks import cancel_and_wait, to_completion, wait_event
from simulator import control
from simulator.control import BrokerAddress, ControlChannel
from simulator.fleetstats import FleetStats
from simulator.metrics import LatencyHistogram, ProcessMonitor, StageSet, convergence_curve
from simulator.mosquitto import MosquittoBroker, free_port
from simulator.oracle import AdminAction, GroundTruth
from simulator.orggen import Org, addin_guid, generate_org, make_manifest
from simulator.processes import die_with_parent
from simulator.scenario import ADMIN_OPS, Scenario, Step

log = logging.getLogger(__name__)

TENANT = "contoso"

HEARTBEAT_TIMEOUT = 30.0
"""A worker silent this long (while the coordinator is connected) has died or hangs."""

RESEND_AFTER = 3.0
"""A live worker whose heartbeat does not list a command this long after it was published
gets it published again."""

IN_PROCESS_STOP_TIMEOUT = 60.0
"""Seconds the in-process worker gets to stop its agents before it is cancelled."""

UNSEEN_TIMEOUT = 30.0
"""A live worker that still has not seen a command this long after its publication fails
the run (publishing it again did not help)."""


class RunError(RuntimeError):
    """The run could not proceed (server refused an action, a worker failed, ...)."""


@dataclass
class RunOptions:
    clients: int = 1000
    workers: int = 0
    """Worker subprocesses; 0 runs one worker inside the coordinator's own event loop."""
    seed: int = 1
    broker_url: str | None = None
    server_url: str | None = None
    admin_token: str | None = None
    agent_token: str | None = None
    remote_workers: int = 0
    """Workers expected to join from elsewhere (`addin-sim worker --run ID ...`)."""
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    workdir: Path | None = None
    baseline: bool = True
    cache: str | None = None
    """Override the scenario's agent cache: "memory", "file" or "none"."""
    progress: Callable[[str, int, int], None] | None = None
    """progress(task, done, total): live progress for the terminal."""
    on_environment: Callable[[str, str], None] | None = None
    """on_environment(broker_url, server_url) once both are up: where workers join."""
    join_timeout: float | None = None
    """Seconds to wait for every worker to join (default 60, 600 with remote workers)."""
    checkpoint_settle: float = 3.0
    """Seconds to let the fleet settle after a checkpoint before the scenario goes on.
    A checkpoint launches every host of every client at once — a burst no real fleet
    produces — and the reports and work it leaves behind slowed the next step's fan-out
    (10,000 clients: Everyone-step notified p99 3.1-3.3 s right after, 2.1-2.8 s after 3 s)."""


@dataclass
class StepResult:
    name: str
    revisions: list[int] = field(default_factory=list)
    started_at: float = 0.0
    duration_s: float = 0.0
    offsets: list[float] = field(default_factory=list)
    unconverged: int = 0
    online: int = 0
    stages: StageSet = field(default_factory=StageSet)
    notes: list[str] = field(default_factory=list)


@dataclass
class RunResult:
    scenario: Scenario
    options: RunOptions
    steps: list[StepResult]
    mismatches: list[dict[str, Any]]
    stages: StageSet
    baseline: dict[str, Any]
    processes: list[dict[str, Any]]
    started_at: float
    duration_s: float
    workers: int
    server_disagreements: list[str]
    fleet: FleetStats = field(default_factory=FleetStats)
    """The workers' counters merged: timeline, manifest requests, connection events."""
    admin_retries: int = 0
    """Admin API calls sent again because the server was unreachable (a restart)."""


def _compact(per_user: Mapping[str, Any]) -> dict[str, Any]:
    values: list[Any] = []
    index: dict[str, int] = {}
    users: dict[str, int] = {}
    for user, value in per_user.items():
        key = json.dumps(value, sort_keys=True)
        if key not in index:
            index[key] = len(values)
            values.append(value)
        users[user] = index[key]
    return {"values": values, "users": users}


def _script(name: str) -> str:
    """The console script next to this interpreter (the venv's), else the one on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise RunError(f"{name} is not installed: run scripts/bootstrap.sh")
    return found


class Environment:
    """The private broker and server stub (when not given), torn down at the end."""

    def __init__(self, options: RunOptions, workdir: Path) -> None:
        self.options = options
        self.workdir = workdir
        self.broker: MosquittoBroker | None = None
        self.server: subprocess.Popen[bytes] | None = None
        self.server_args: list[str] = []
        self.broker_url = options.broker_url or ""
        self.server_url = options.server_url or ""
        self.admin_token = options.admin_token or secrets.token_urlsafe(16)
        self.agent_token = options.agent_token or secrets.token_urlsafe(16)

    def start(self) -> None:
        if not self.broker_url:
            self.broker = MosquittoBroker(self.workdir / "broker", max_queued_messages=10_000)
            self.broker.start()
            self.broker_url = self.broker.url
        if not self.server_url:
            port = free_port()
            self.server_url = f"http://127.0.0.1:{port}"
            self.server_args = [
                _script("addin-server"),
                "serve",
                "--db",
                str(self.workdir / "server.sqlite"),
                "--broker",
                self.broker_url,
                "--listen",
                f"127.0.0.1:{port}",
                "--tenant",
                TENANT,
                "--admin-token",
                self.admin_token,
                "--agent-token",
                self.agent_token,
            ]
            self.start_server()

    def start_server(self, timeout: float = 30.0) -> None:
        log = open(self.workdir / "server.log", "ab")  # handed to the child
        try:
            self.server = subprocess.Popen(
                self.server_args,
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent(),
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.server.poll() is not None:
                raise RunError(f"the server stub exited at start; see {self.workdir}/server.log")
            try:
                if httpx.get(f"{self.server_url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RunError(f"the server stub did not answer /healthz within {timeout}s")

    def restart_server(self) -> None:
        if self.server is None:
            raise RunError("server_restart needs the private server (run without --server)")
        self.server.terminate()
        try:
            self.server.wait(10)
        except subprocess.TimeoutExpired:
            self.server.kill()
            self.server.wait()
        self.start_server()

    def stop(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.terminate()
            try:
                self.server.wait(10)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()
        if self.broker is not None:
            self.broker.kill()


class Coordinator:
    def __init__(self, scenario: Scenario, options: RunOptions) -> None:
        self.scenario = scenario
        self.options = options
        self.run = options.run_id
        self.rng = random.Random(options.seed)
        self.org: Org = generate_org(
            max(1, options.clients),
            scenario.org.groups,
            nesting_depth=scenario.org.nesting_depth,
            seed=options.seed,
            tenant=TENANT,
            nested_groups=scenario.org.nested_groups,
        )
        self.truth = GroundTruth.from_org_document(self.org.to_document())
        self.addin_ids = {a: addin_guid(a, options.seed) for a in scenario.addins}
        self.addin_state: dict[str, dict[str, Any]] = {
            a: {
                "version": s.version,
                "hosts": [str(h) for h in s.hosts],
                "permissions": s.permissions,
            }
            for a, s in scenario.addins.items()
        }
        self.clients = [(f"ws-{u}", u) for u in self.org.users]
        self.seq = 0
        self.hellos: dict[str, dict[str, Any]] = {}
        self.replies: dict[str, dict[str, Any]] = {}
        self.progress_seen: dict[str, dict[str, Any]] = {}
        self._changed = asyncio.Event()
        self.disagreements: list[str] = []
        self.offline_clients: set[str] = set()
        self.tap: dict[str, list[dict[str, Any]]] = {}
        self.process_monitors: list[ProcessMonitor] = []
        self.admin_retries = 0
        self.workers: list[str] = []
        self.heard: dict[str, float] = {}
        """`time.monotonic()` of each worker's latest heartbeat (or hello)."""
        self.seen: dict[str, tuple[list[int], float]] = {}
        """The commands each worker's latest heartbeat says it has received, and when it came."""
        self.commands: dict[int, tuple[str, dict[str, Any], float]] = {}
        """Commands not yet answered by every worker: seq -> (cmd, message, published at)."""
        self.local_procs: dict[str, subprocess.Popen[bytes]] = {}
        """Worker subprocesses of this run by their log file."""
        self.in_process: asyncio.Task[None] | None = None
        self._sent_at: dict[int, float] = {}
        self.resent = 0
        """Commands published again because a live worker had not seen them."""
        self.tearing_down = False
        """Set when the run starts to stop its workers and environment (orderly or not)."""
        self._step_tasks: list[asyncio.Task[None]] = []
        self._failure: RunError | None = None
        """Why the worker watchdog ended the run."""

    # -- control channel ----------------------------------------------------------------------
    async def _on_worker(self, topic: str, data: dict[str, Any]) -> None:
        parsed = control.parse_worker_topic(self.run, topic)
        if parsed is None:
            return
        wid, kind = parsed
        if kind in ("hello", "alive"):
            self.heard[wid] = time.monotonic()
        if kind == "hello":
            self.hellos[wid] = data
        elif kind == "alive":
            self.seen[wid] = ([int(s) for s in data.get("seen", [])], time.monotonic())
            return  # once a second from every worker: not worth waking the waiters
        elif kind == "reply":
            self.replies[wid] = data.get("replies", {})
        elif kind == "progress":
            self.progress_seen[wid] = data
        self._changed.set()

    async def command(
        self,
        cmd: str,
        args: dict[str, Any],
        timeout: float = 300.0,
        phase: str | None = None,
        progress_task: str | None = None,
    ) -> dict[str, dict[str, Any]]:
        seq = await self._publish_command(cmd, args)
        try:
            return await self.wait_replies(seq, timeout, phase, progress_task)
        finally:
            await self._retire_command(seq)

    async def _publish_command(self, cmd: str, args: dict[str, Any]) -> int:
        self.seq += 1
        seq = self.seq
        message = {"seq": seq, "cmd": cmd, "args": args}
        self.commands[seq] = (cmd, message, time.monotonic())
        await self.channel.publish_state(control.cmd_topic(self.run, seq), message)
        return seq

    async def _retire_command(self, seq: int) -> None:
        self.commands.pop(seq, None)
        self._sent_at.pop(seq, None)
        await self.channel.clear(control.cmd_topic(self.run, seq))

    def _check_liveness(self) -> None:
        """Raise RunError if a worker process exited, the in-process worker ended, or a
        worker's heartbeat stopped."""
        for log_name, p in self.local_procs.items():
            if p.poll() is not None:
                raise RunError(
                    f"worker process {p.pid} exited with status {p.returncode}; see {log_name}"
                )
        t = self.in_process
        if t is not None and t.done():
            error = None if t.cancelled() else t.exception()
            raise RunError(f"the in-process worker stopped: {error!r}")
        connected = self.channel.connected_since
        if not connected:
            return  # the coordinator itself is reconnecting: silence proves nothing
        now = time.monotonic()
        for wid in self.workers:
            silent = now - max(self.heard.get(wid, 0.0), connected)
            if silent > HEARTBEAT_TIMEOUT:
                raise RunError(
                    f"worker {wid} has sent no heartbeat for {silent:.0f} s: it died, hangs, "
                    "or cannot reach the broker"
                )

    async def _watch_workers(self, run: asyncio.Task[Any]) -> None:
        """Ends the run as soon as a worker is gone, whatever the run is doing (a scenario's
        `wait` too), not when the next command times out."""
        while True:
            await asyncio.sleep(0.5)
            try:
                self._check_liveness()
            except RunError as e:
                self._failure = e
                break
        # Cancelled again until its teardown begins: on Python 3.11 one cancellation can be
        # lost inside asyncio.wait_for (aiomqtt awaits every acknowledgement with it).
        while not run.done() and not self.tearing_down:
            run.cancel()
            await asyncio.sleep(1.0)

    async def _check_workers(self, seq: int, answered: set[str]) -> None:
        """Fail now, not at the command's timeout, when a worker died, hangs, or does not get
        the command; publish the command again to a live worker that has not seen it."""
        self._check_liveness()
        now = time.monotonic()
        connected = self.channel.connected_since
        if not connected:
            return
        cmd, message, published = self.commands.get(seq, ("?", {}, now))
        for wid in self.workers:
            if wid in answered:
                continue
            seen = self.seen.get(wid)
            if seen is None or _has_seen(seen[0], seq):
                continue
            # Only a heartbeat sent after the command could have reached it counts.
            seen_at = seen[1]
            waited = seen_at - max(published, connected)
            if waited > UNSEEN_TIMEOUT:
                raise RunError(
                    f"worker {wid} is alive but has not received command {seq} ({cmd}) "
                    f"{waited:.0f} s after it was published"
                )
            if seen_at - self._sent_at.get(seq, published) > RESEND_AFTER:
                self._sent_at[seq] = time.monotonic()
                self.resent += 1
                await self.channel.publish_state(control.cmd_topic(self.run, seq), message)

    async def wait_replies(
        self, seq: int, timeout: float, phase: str | None = None, progress_task: str | None = None
    ) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            got = {
                wid: r[str(seq)]
                for wid, r in self.replies.items()
                if wid in self.workers
                and str(seq) in r
                and (r[str(seq)].get("phase") == phase if phase else "phase" not in r[str(seq)])
            }
            for wid, r in got.items():
                if not r.get("ok", False):
                    raise RunError(f"worker {wid}: {r.get('error')}")
            if progress_task and self.options.progress:
                done = sum(p["done"] for p in self.progress_seen.values() if p.get("seq") == seq)
                self.options.progress(progress_task, done, 0)
            if len(got) == len(self.workers):
                return got
            if time.monotonic() > deadline:
                missing = sorted(set(self.workers) - set(got))
                raise RunError(f"no answer to {seq} from workers {missing} within {timeout}s")
            await self._check_workers(seq, set(got))
            self._changed.clear()
            await wait_event(self._changed, 0.5)

    # -- the run ------------------------------------------------------------------------------
    async def execute(self) -> RunResult:
        with contextlib.ExitStack() as stack:
            workdir = self.options.workdir or Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="addin-sim-"))
            )
            env = Environment(self.options, workdir)
            stack.callback(env.stop)
            # Finished even if cancelled meanwhile: a process being started in that thread
            # must be known to env.stop.
            await to_completion(asyncio.to_thread(env.start))
            self.env = env
            if self.options.on_environment is not None:
                self.options.on_environment(env.broker_url, env.server_url)
            return await self._execute(env, workdir)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _execute(self, env: Environment, workdir: Path) -> RunResult:
        started = time.time()
        broker = BrokerAddress.parse(env.broker_url)
        self.http = httpx.AsyncClient(
            base_url=env.server_url,
            headers={"Authorization": f"Bearer {env.admin_token}"},
            timeout=60,
        )
        self.channel = ControlChannel(
            broker, f"coord-{self.run}", [control.worker_filter(self.run)], self._on_worker
        )
        await self.channel.start()
        self.tapper = ControlChannel(
            # State topics only: the tap also took every agent report (10,000 after a
            # checkpoint), which cost this process most of a core during the next step.
            broker,
            f"tap-{self.run}",
            Filters.retained_state(TENANT),
            self._on_tap,
        )
        await self.tapper.start()
        self.monitors = [ProcessMonitor("coordinator")]
        if env.broker and env.broker.process:
            self.monitors.append(ProcessMonitor("broker", env.broker.process.pid))
        if env.server:
            self.monitors.append(ProcessMonitor("server", env.server.pid))
        sampler = asyncio.create_task(self._sample_forever())
        me = asyncio.current_task()
        assert me is not None
        watchdog = asyncio.create_task(self._watch_workers(me), name="worker watchdog")
        finished = False
        try:
            await self._load_org()
            cold_revision = 0
            for item in self.scenario.setup:
                cold_revision = max([cold_revision, *await self._admin(item, None)])
            # workers
            cache_dir = workdir / "caches"
            cache_dir.mkdir(exist_ok=True)
            if self.options.workers == 0:
                from simulator.worker import Worker

                w = Worker(
                    self.run, broker, env.server_url, cache_dir=cache_dir, role="coordinator+worker"
                )
                self.in_process = asyncio.create_task(w.serve(), name="in-process worker")
                self.in_process_worker = w
            for _ in range(self.options.workers):
                self._spawn_worker(env, cache_dir)
            wanted = max(1, self.options.workers) + self.options.remote_workers
            # Someone has to start remote workers by hand: give them time.
            join_timeout = self.options.join_timeout or (
                600.0 if self.options.remote_workers else 60.0
            )
            deadline = time.monotonic() + join_timeout
            if self.options.progress and self.options.remote_workers:
                self.options.progress("workers joining", len(self.hellos), wanted)
            while len(self.hellos) < wanted:
                if time.monotonic() > deadline:
                    raise RunError(
                        f"only {len(self.hellos)} of {wanted} workers joined "
                        f"within {join_timeout:.0f} s"
                    )
                await self._check_workers(0, set())
                self._changed.clear()
                await wait_event(self._changed, 0.5)
            self.workers = sorted(self.hellos)[:wanted]
            shards = {
                wid: [list(c) for c in self.clients[i :: len(self.workers)]]
                for i, wid in enumerate(self.workers)
            }
            self.shards = shards
            self.start_args: dict[str, Any] = {
                "shards": shards,
                "cold_revision": cold_revision,
                "agent": {
                    "tenant": TENANT,
                    "agent_token": env.agent_token,
                    "cache": self.options.cache or self.scenario.cache,
                },
            }
            # The bare fan-out goes first, before any agent connects: the broker then holds
            # only the bare subscribers (10,000 agents plus 10,000 subscribers would exceed a
            # 20,000 open-file limit), and it measures what the machine can do at all.
            baseline: dict[str, Any] = {"p99_ms": None, "max_ms": None, "clients": 0}
            if self.options.baseline:
                baseline = await self._baseline(broker)
            steps: list[StepResult] = []
            if self.scenario.start == "before":
                connect = StepResult("connect", started_at=time.time())
                await self.command("start", self.start_args, timeout=600, progress_task="connect")
                await self._converge(connect, connect.started_at, 120)
                connect.duration_s = time.time() - connect.started_at
                steps.append(connect)
            all_mismatches: list[dict[str, Any]] = []
            for step in self.scenario.steps:
                steps.append(await self._run_step(step, all_mismatches))
            final = StepResult("final-check", started_at=time.time())
            settle = max(s.settle_timeout for s in self.scenario.steps)
            await self._converge(final, final.started_at, settle)
            all_mismatches.extend(await self._checkpoint("final-check", settle))
            final.duration_s = time.time() - final.started_at
            steps.append(final)
            stats = await self.command(
                "stats", {"steps": {s.name: s.revisions for s in steps}}, timeout=120
            )
            cold = StageSet()
            fleet = FleetStats()
            for r in stats.values():
                cold.merge(StageSet.decode(r["result"]["cold"]))
                fleet.merge(FleetStats.decode(r["result"].get("fleet", {})))
                for s in steps:
                    s.stages.merge(StageSet.decode(r["result"]["steps"].get(s.name, {})))
            for s in steps:
                if s.name in ("connect", "cold-start") or any(
                    "start_clients" in i
                    for st in self.scenario.steps
                    if st.name == s.name
                    for i in st.do
                ):
                    s.stages.merge(cold)
            total = StageSet()
            for s in steps:
                if s.name != "connect":
                    total.merge(s.stages)
            shut = await self.command("shutdown", {}, timeout=120)
            processes = [m.result().as_dict() for m in self.monitors]
            for r in shut.values():
                proc = r["result"]["process"]
                if proc["role"] != "coordinator+worker":
                    processes.append(proc)
                else:
                    processes[0]["role"] = "coordinator+worker"
            finished = True
            return RunResult(
                scenario=self.scenario,
                options=self.options,
                steps=steps,
                mismatches=all_mismatches,
                stages=total,
                baseline=baseline,
                processes=processes,
                started_at=started,
                duration_s=time.time() - started,
                workers=len(self.workers),
                server_disagreements=self.disagreements,
                fleet=fleet,
                admin_retries=self.admin_retries,
            )
        except asyncio.CancelledError:
            if self._failure is not None:
                raise self._failure from None
            raise
        finally:
            self.tearing_down = True
            sampler.cancel()
            watchdog.cancel()
            try:
                await self._stop_workers(orderly=finished)
            finally:
                for seq in list(self.commands):
                    await self._retire_command(seq)
                await self.channel.close()
                await self.tapper.close()
                await self.http.aclose()

    async def _stop_workers(self, *, orderly: bool) -> None:
        """After `shutdown` the workers end by themselves; after a failure or a stop they are
        told to. Bounded either way, and the in-process worker's agents are stopped (their
        cache threads would keep this process alive)."""
        t = self.in_process
        if t is not None:
            if not orderly:
                self.in_process_worker.stop()
            done, _ = await asyncio.wait({t}, timeout=IN_PROCESS_STOP_TIMEOUT)
            if not done:
                await cancel_and_wait(t, 10, "the in-process worker")
            elif not t.cancelled() and t.exception() is not None:
                log.warning("the in-process worker failed: %r", t.exception())
        procs = list(self.local_procs.values())
        if orderly:
            await _wait_exit(procs, 10)
        for p in procs:
            if p.poll() is None:
                p.terminate()  # a worker stops its agents on SIGTERM
        await _wait_exit(procs, 20)
        for p in procs:
            if p.poll() is None:
                p.kill()
        await _wait_exit(procs, 5)

    def _spawn_worker(self, env: Environment, cache_dir: Path) -> subprocess.Popen[bytes]:
        log_path = env.workdir / f"worker-{len(self.process_monitors)}.log"
        log = open(log_path, "ab")
        try:
            p = subprocess.Popen(
                [
                    _script("addin-sim"),
                    "worker",
                    "--run",
                    self.run,
                    "--broker",
                    env.broker_url,
                    "--server",
                    env.server_url,
                    "--cache-dir",
                    str(cache_dir),
                ],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent(),
            )
        finally:
            log.close()
        self.process_monitors.append(ProcessMonitor("worker", p.pid))
        self.local_procs[str(log_path)] = p
        return p

    async def _sample_forever(self) -> None:
        while True:
            for m in self.monitors:
                m.sample()
            await asyncio.sleep(0.5)

    async def _on_tap(self, topic: str, data: dict[str, Any]) -> None:
        held = self.tap.setdefault(topic, [])
        if not held or held[-1] != data:
            held.append(data)
            del held[:-2]

    # -- admin actions ------------------------------------------------------------------------
    async def _load_org(self) -> None:
        r = await self.http.post("/v1/org", json=self.org.to_document())
        if r.status_code >= 400:
            raise RunError(f"POST /v1/org: {r.status_code} {r.text[:300]}")

    def _group(self, ref: str) -> str:
        if ref.startswith("@rank:"):
            return self.org.groups_by_size()[int(ref[6:])].id
        if ref == "@child":
            for g in self.org.groups:
                if g.parents:
                    return g.id
            raise RunError("@child: the organisation has no nested group (nesting_depth 0)")
        return ref

    def _user(self, ref: str) -> str:
        if ref.startswith("@user:"):
            return self.org.users[int(ref[6:])]
        return ref

    def _target(self, target: str) -> tuple[str, str | None]:
        if target == "everyone":
            return "everyone", None
        kind, _, ref = target.partition(":")
        if kind == "group":
            return "group", self._group(ref)
        if kind == "user":
            return "user", self._user(ref)
        raise RunError(f"target {target!r}: use everyone, group:ID or user:ID")

    async def _call(self, method: str, url: str, **kw: Any) -> dict[str, Any]:
        for attempt in range(50):
            try:
                r = await self.http.request(method, url, **kw)
                break
            except httpx.TransportError:
                # The server may be restarting (a fault of this scenario): retry briefly.
                self.admin_retries += 1
                await asyncio.sleep(0.2 * min(attempt + 1, 5))
        else:
            raise RunError(f"{method} {url}: server unreachable")
        if r.status_code >= 400:
            raise RunError(f"{method} {url}: {r.status_code} {r.text[:300]}")
        data: dict[str, Any] = r.json()
        return data

    async def _admin(self, item: Mapping[str, Any], step: StepResult | None) -> list[int]:
        """Do one admin action on the server and in the oracle; return the revisions."""
        ((op, a),) = item.items()
        if op == "churn":
            group = self._group(a["group"])
            rng = random.Random(f"{self.options.seed}:{a.get('seed', 0)}:{group}")
            members = sorted(u for u, g in self.truth.membership if g == group)
            outsiders = sorted(set(self.org.users) - set(members))
            revs: list[int] = []
            for u in rng.sample(members, min(int(a.get("remove", 0)), len(members))):
                revs += await self._admin({"remove_member": {"user": u, "group": group}}, step)
            for u in rng.sample(outsiders, min(int(a.get("add", 0)), len(outsiders))):
                revs += await self._admin({"add_member": {"user": u, "group": group}}, step)
            return revs
        addin_alias = a.get("addin")
        addin_id = self.addin_ids.get(addin_alias, "") if addin_alias else ""
        action: AdminAction
        match op:
            case "upload":
                st = self.addin_state[addin_alias]
                for k in ("version", "permissions", "hosts"):
                    if k in a:
                        st[k] = [str(h) for h in a[k]] if k == "hosts" else str(a[k])
                spec = self.scenario.addins[addin_alias]
                xml = make_manifest(
                    addin_id,
                    name=spec.name or addin_alias,
                    version=st["version"],
                    hosts=[Host(h) for h in st["hosts"]],
                    permissions=st["permissions"],
                )
                action = AdminAction("upload", {"addin_id": addin_id, **st})
                res = await self._call(
                    "POST", "/v1/addins", content=xml, headers={"Content-Type": "application/xml"}
                )
                expected = self.truth.apply(action)
                if res.get("state") != expected:
                    self.disagreements.append(
                        f"upload {addin_alias} {st['version']}: server says {res.get('state')}, oracle {expected}"
                    )
            case "assign" | "unassign":
                kind, tid = self._target(a["target"])
                body: dict[str, Any] = {"target": kind, "target_id": tid}
                if op == "assign":
                    body["mode"] = str(Mode(a["mode"]))
                res = await self._call("POST", f"/v1/addins/{addin_id}/{op}", json=body)
                self.truth.apply(AdminAction(op, {"addin_id": addin_id, **body}))
            case "consent" | "enable" | "disable":
                res = await self._call("POST", f"/v1/addins/{addin_id}/{op}")
                self.truth.apply(AdminAction(op, {"addin_id": addin_id}))
            case "remove":
                res = await self._call("DELETE", f"/v1/addins/{addin_id}")
                self.truth.apply(AdminAction("remove_addin", {"addin_id": addin_id}))
            case "add_member" | "remove_member":
                g, u = self._group(a["group"]), self._user(a["user"])
                res = await self._call(
                    "PUT" if op == "add_member" else "DELETE", f"/v1/groups/{g}/members/{u}"
                )
                self.truth.apply(AdminAction(op, {"user": u, "group": g}))
            case "add_parent" | "remove_parent":
                g, p = self._group(a["group"]), self._group(a["parent"])
                res = await self._call(
                    "PUT" if op == "add_parent" else "DELETE", f"/v1/groups/{g}/parents/{p}"
                )
                self.truth.apply(AdminAction(op, {"group": g, "parent": p}))
            case "policy":
                res = await self._call(
                    "PUT", "/v1/policy", json={"nested_groups": bool(a["nested_groups"])}
                )
                self.truth.apply(AdminAction("policy", {"nested_groups": bool(a["nested_groups"])}))
            case _:
                raise RunError(f"unknown admin action {op!r}")
        rev = int(res.get("revision", 0))
        if step is not None and rev:
            step.revisions.append(rev)
        return [rev] if rev else []

    # -- steps --------------------------------------------------------------------------------
    def _expected(self) -> tuple[dict[str, Any], dict[str, Any]]:
        ents = self.truth.entitlements_for_all()
        inst_cache: dict[str, Any] = {}
        installed: dict[str, Any] = {}
        for user, e in ents.items():
            key = json.dumps({k: str(v) for k, v in sorted(e.items())})
            if key not in inst_cache:
                inst_cache[key] = {str(h): v for h, v in self.truth.installed_for(e).items()}
            installed[user] = inst_cache[key]
        return (
            _compact({u: {a: str(m) for a, m in e.items()} for u, e in ents.items()}),
            _compact(installed),
        )

    async def _converge(self, result: StepResult, t0: float, timeout: float) -> None:
        ents, _ = self._expected()
        replies = await self.command(
            "converge", {"expected": ents, "t0": t0, "timeout": timeout}, timeout=timeout + 60
        )
        result.offsets = [o for r in replies.values() for o in r["result"]["offsets"]]
        result.unconverged = sum(r["result"]["unconverged"] for r in replies.values())
        result.online = len(result.offsets) + result.unconverged

    async def _checkpoint(self, name: str, timeout: float) -> list[dict[str, Any]]:
        ents, inst = self._expected()
        replies = await self.command(
            "checkpoint",
            {"entitlements": ents, "installed": inst, "timeout": timeout},
            timeout=timeout + 150,
        )
        out = []
        for r in replies.values():
            for m in r["result"]["mismatches"]:
                out.append({"checkpoint": name, **m})
        return out

    async def _run_step(self, step: Step, mismatches: list[dict[str, Any]]) -> StepResult:
        res = StepResult(step.name, started_at=time.time())
        if self.options.progress:
            self.options.progress(f"step {step.name}", 0, 0)

        def start_converge() -> asyncio.Task[None]:
            return asyncio.create_task(self._converge(res, res.started_at, step.settle_timeout))

        try:
            return await self._run_items(step, res, mismatches, start_converge)
        finally:
            # Ended early (a failure, a stop): a convergence poll must not outlive the step.
            for t in self._step_tasks:
                if not t.done():
                    t.cancel()
                elif not t.cancelled():
                    t.exception()  # retrieved: the error that ended the step is raised instead
            self._step_tasks.clear()

    async def _run_items(
        self,
        step: Step,
        res: StepResult,
        mismatches: list[dict[str, Any]],
        new_converge: Callable[[], asyncio.Task[None]],
    ) -> StepResult:
        converge_task: asyncio.Task[None] | None = None
        dirty = False

        def start_converge() -> asyncio.Task[None]:
            t = new_converge()
            self._step_tasks.append(t)
            return t

        for item in step.do:
            ((key, args),) = item.items()
            if key in ADMIN_OPS:
                await self._admin(item, res)
                dirty = True
                continue
            if key == "checkpoint":
                if converge_task is None or dirty:
                    converge_task = start_converge()
                    dirty = False
                await converge_task
                mismatches.extend(await self._checkpoint(step.name, step.settle_timeout))
                await asyncio.sleep(self.options.checkpoint_settle)
                continue
            if dirty and key not in (
                "broker_restart",
                "broker_kill",
                "server_restart",
                "duplicates",
            ):
                converge_task = start_converge()
                dirty = False
            await self._other(key, args, res)
        if converge_task is None or dirty:
            converge_task = start_converge()
        await converge_task
        res.duration_s = time.time() - res.started_at
        return res

    async def _other(self, key: str, a: Mapping[str, Any], res: StepResult) -> None:
        env = self.env
        match key:
            case "wait":
                await asyncio.sleep(float(a.get("seconds", 1)))
            case "launches":
                await self.command(
                    "launches",
                    {
                        "rate": a.get("rate", 0.1),
                        "duration": a.get("duration", 2),
                        "seed": self.options.seed,
                    },
                    timeout=float(a.get("duration", 2)) + 120,
                )
            case "start_clients":
                self.start_args["cold_revision"] = max(
                    [int(self.start_args["cold_revision"]), *res.revisions]
                )
                await self.command("start", self.start_args, timeout=600, progress_task="connect")
            case "broker_restart" | "broker_kill":
                if env.broker is None:
                    raise RunError(f"{key} needs the private broker (run without --broker)")
                await to_completion(
                    asyncio.to_thread(env.broker.restart, hard=key == "broker_kill")
                )
                if env.broker.process:
                    self.monitors.append(ProcessMonitor("broker", env.broker.process.pid))
                res.notes.append(key.replace("_", " "))
            case "server_restart":
                await to_completion(asyncio.to_thread(env.restart_server))
                if env.server:
                    self.monitors.append(ProcessMonitor("server", env.server.pid))
                res.notes.append("server restarted")
            case "offline":
                rng = random.Random(f"{self.options.seed}:{a.get('seed', 0)}")
                chosen = rng.sample(
                    [c for c, _ in self.clients], int(len(self.clients) * float(a["share"]))
                )
                self.offline_clients |= set(chosen)
                await self.command("offline", {"clients": chosen}, timeout=120)
                res.notes.append(f"{len(chosen)} clients offline")
            case "online":
                await self.command("online", {}, timeout=600, progress_task="connect")
                res.notes.append(f"{len(self.offline_clients)} clients back online")
                self.offline_clients.clear()
            case "duplicates":
                # Re-send, not retained, the previous message of each topic (older revision:
                # arrives "reordered") and the current one (a duplicate). Agents must ignore both.
                sent = 0
                for topic, held in list(self.tap.items()):
                    for data in held:
                        await self.tapper.publish(topic, data)
                        sent += 1
                res.notes.append(f"{sent} duplicated/reordered messages")
            case _:
                raise RunError(f"unknown step item {key!r}")

    async def _baseline(self, broker: BrokerAddress) -> dict[str, Any]:
        n = len(self.clients)
        shares = {
            wid: n // len(self.workers) + (1 if i < n % len(self.workers) else 0)
            for i, wid in enumerate(self.workers)
        }
        topic = control.baseline_topic(self.run)
        seq = await self._publish_command(
            "baseline", {"shares": shares, "topic": topic, "timeout": 30}
        )
        try:
            await self.wait_replies(seq, 600, phase="ready")
            from simulator.baseline import publish_probe

            await publish_probe(broker, topic)
            replies = await self.wait_replies(seq, 120)
        finally:
            await self._retire_command(seq)
        hist = LatencyHistogram()
        received = 0
        for r in replies.values():
            hist.merge(LatencyHistogram.decode(r["result"]["hist"]))
            received += r["result"]["received"]
        return {"clients": n, "received": received, **hist.summary(), "cdf": hist.cdf()}


async def _wait_exit(procs: list[subprocess.Popen[bytes]], timeout: float) -> None:
    """Wait until every process has exited, at most `timeout` seconds in all."""
    deadline = time.monotonic() + timeout
    for p in procs:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(p.wait, left)


def _has_seen(seen: list[int], seq: int) -> bool:
    """Whether a heartbeat's list (the latest 64 received, ascending) covers `seq`."""
    return seq in seen or (len(seen) >= 64 and seq < seen[0])


def curve_of(step: StepResult) -> list[tuple[float, float]]:
    return convergence_curve(step.offsets, max(1, step.online))


def default_workers() -> int:
    return os.cpu_count() or 1

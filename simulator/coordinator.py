"""The coordinator: sets up broker, server and workers, drives a scenario, checks the oracle.

It owns the ground truth. A run goes through named phases: start the environment (a private
broker and server stub, `simulator.environment`), connect (the admin API client, the control
channel to the workers, the state tap), prepare the server (the organisation and the scenario's
setup), start and join the workers (`simulator.fleet`), measure the bare fan-out baseline, run
the steps (`simulator.steps`), collect the workers' measurements, shut the workers down, and
tear everything down. Workers (subprocesses here, or `addin-sim worker` on other machines, or
in-process for tests) are driven over the broker (`simulator.control`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from addin_runtime.tasks import to_completion
from simulator import control
from simulator.admin import AdminActions
from simulator.control import BrokerAddress
from simulator.environment import TENANT, Environment
from simulator.fleet import WorkerFleet
from simulator.fleetstats import FleetStats
from simulator.metrics import LatencyHistogram, ProcessMonitor, StageSet
from simulator.oracle import GroundTruth
from simulator.orggen import Org, generate_org
from simulator.processes import OpenFilesError, open_files_needed, raise_open_files
from simulator.results import RunError, RunOptions, RunResult, StepResult, curve_of
from simulator.scenario import Scenario
from simulator.steps import StateTap, StepExecutor

__all__ = [
    "TENANT",
    "Coordinator",
    "RunError",
    "RunOptions",
    "RunResult",
    "StepResult",
    "curve_of",
    "default_workers",
]


class Coordinator:
    def __init__(self, scenario: Scenario, options: RunOptions) -> None:
        self.scenario = scenario
        self.options = options
        self.run = options.run_id
        self.org: Org = generate_org(
            max(1, options.clients),
            scenario.org.groups,
            nesting_depth=scenario.org.nesting_depth,
            seed=options.seed,
            tenant=options.tenant,
            nested_groups=scenario.org.nested_groups,
        )
        self.truth = GroundTruth.from_org_document(self.org.to_document())
        self.clients = [(f"ws-{u}", u) for u in self.org.users]
        self.fleet = WorkerFleet(self.run, options.progress)
        self.admin = AdminActions(scenario, options.seed, self.org, self.truth)
        self.tap = StateTap(self.run, options.tenant)
        self.env: Environment | None = None
        """The broker and server of the run, once started."""
        self.monitors: list[ProcessMonitor] = []
        """The processes sampled for the report: this one, the broker, the server."""

    # What the CLI and the tests watch while a run goes on.
    @property
    def workers(self) -> list[str]:
        return self.fleet.workers

    @property
    def local_procs(self) -> dict[str, subprocess.Popen[bytes]]:
        return self.fleet.local_procs

    @property
    def resent(self) -> int:
        return self.fleet.resent

    @property
    def tearing_down(self) -> bool:
        return self.fleet.tearing_down

    async def execute(self) -> RunResult:
        o = self.options
        try:
            # Before anything starts (no folder, no process): the broker, server and workers
            # inherit the limit.
            raise_open_files(
                open_files_needed(
                    o.clients,
                    o.workers + o.remote_workers,
                    own_broker=o.broker_url is None,
                    cache=o.cache or self.scenario.cache,
                )
            )
        except OpenFilesError as e:
            raise RunError(str(e)) from None
        if self.options.workdir is not None:
            return await self._execute_in(self.options.workdir)
        # A private folder, removed after a run that ended well; a failed run keeps it: its
        # broker, server and worker logs are what explains the failure (errors name them).
        workdir = Path(tempfile.mkdtemp(prefix="addin-sim-"))
        try:
            result = await self._execute_in(workdir)
        except RunError as e:
            raise RunError(f"{e} (the run's logs are kept in {workdir})") from e
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        shutil.rmtree(workdir, ignore_errors=True)
        return result

    async def _execute_in(self, workdir: Path) -> RunResult:
        with contextlib.ExitStack() as stack:
            env = Environment(self.options, workdir, self.clients)
            stack.callback(env.stop)
            # Finished even if cancelled meanwhile: a process being started in that thread
            # must be known to env.stop.
            await to_completion(asyncio.to_thread(env.start))
            self.env = env
            if self.options.on_environment is not None:
                self.options.on_environment(env.broker_url, env.server_url)
            return await self._execute(env)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _execute(self, env: Environment) -> RunResult:
        started = time.time()
        broker = BrokerAddress.parse(env.broker_url)
        await self._connect(env, broker)
        sampler = asyncio.create_task(self._sample_forever())
        me = asyncio.current_task()
        assert me is not None
        watchdog = asyncio.create_task(self.fleet.watch(me), name="worker watchdog")
        finished = False
        try:
            cold_revision = await self._prepare_server()
            await self._enroll(env)
            await self._start_workers(env, broker)
            # The bare fan-out goes first, before any agent connects: the broker then holds
            # only the bare subscribers (10,000 agents plus 10,000 subscribers would exceed a
            # 20,000 open-file limit), and it measures what the machine can do at all.
            baseline: dict[str, Any] = {"p99_ms": None, "max_ms": None, "clients": 0}
            if self.options.baseline:
                # The paho floor, then aiomqtt beside it (under "aiomqtt"), then the fan-out
                # plus one manifest GET (under "download"), one after the other.
                baseline = await self._baseline(broker, "paho")
                baseline["aiomqtt"] = await self._baseline(broker, "aiomqtt")
                download = self._download(env)
                if download is not None:
                    baseline["download"] = await self._baseline(broker, "download", download)
            executor = StepExecutor(
                self.options,
                env,
                self.fleet,
                self.admin,
                self.tap,
                self.monitors,
                self.clients,
                self._start_args(env, cold_revision),
            )
            if self.options.before_steps is not None:
                await self.options.before_steps()
            steps = await self._run_steps(executor)
            if self.options.after_steps is not None:
                await self.options.after_steps()
            fleet, total = await self._collect(steps)
            processes = await self._shutdown()
            finished = True
            return RunResult(
                scenario=self.scenario,
                options=self.options,
                steps=steps,
                mismatches=executor.mismatches,
                stages=total,
                baseline=baseline,
                processes=processes,
                started_at=started,
                duration_s=time.time() - started,
                workers=len(self.fleet.workers),
                server_disagreements=self.admin.disagreements,
                fleet=fleet,
                admin_retries=self.admin.retries,
                state_signed=env.signing_key is not None,
            )
        except asyncio.CancelledError:
            if self.fleet.failure is not None:
                raise self.fleet.failure from None
            raise
        finally:
            await self._teardown(sampler, watchdog, orderly=finished)

    # -- the phases ---------------------------------------------------------------------------
    async def _connect(self, env: Environment, broker: BrokerAddress) -> None:
        """Open the admin API client, the control channel and the state tap; start sampling
        this process, the broker and the server."""
        self.admin.open(env.server_url, env.admin_token, env.verify)
        await self.fleet.open(broker)
        await self.tap.open(broker)
        self.monitors[:] = [ProcessMonitor("coordinator")]
        if env.broker and env.broker.process:
            self.monitors.append(ProcessMonitor("broker", env.broker.process.pid))
        if env.server:
            self.monitors.append(ProcessMonitor("server", env.server.pid))

    async def _prepare_server(self) -> int:
        """Load the organisation and do the scenario's setup; return the revision the clients
        start from."""
        await self.admin.load_org()
        cold_revision = 0
        for item in self.scenario.setup:
            cold_revision = max([cold_revision, *await self.admin.apply(item, None)])
        return cold_revision

    async def _enroll(self, env: Environment) -> None:
        """With --tls, every client becomes an enrolled device of the users just loaded."""
        if self.options.progress and env.pki is not None:
            self.options.progress("enrolling devices", 0, 0)
        await env.enroll_devices()

    async def _start_workers(self, env: Environment, broker: BrokerAddress) -> None:
        """Start the local workers and wait until every worker (remote ones too) joined."""
        caches = env.workdir / "caches"
        caches.mkdir(exist_ok=True)
        self.fleet.netns = env.netns
        if self.options.workers == 0:
            self.fleet.start_in_process(broker, env.server_url, caches)
        for _ in range(self.options.workers):
            self.fleet.spawn(env.workdir, env.broker_url, env.server_url, caches)
        wanted = max(1, self.options.workers) + self.options.remote_workers
        # Someone has to start remote workers by hand: give them time.
        join_timeout = self.options.join_timeout or (600.0 if self.options.remote_workers else 60.0)
        if self.options.progress and self.options.remote_workers:
            self.options.progress("workers joining", len(self.fleet.hellos), wanted)
        await self.fleet.join(wanted, join_timeout)

    def _start_args(self, env: Environment, cold_revision: int) -> dict[str, Any]:
        """The `start` command: each worker's share of the clients and the agents' settings."""
        workers = self.fleet.workers
        tokens = env.pki.tokens if env.pki is not None else {}
        shards = {
            # With --tls each client has its own device token.
            wid: [
                [*c, tokens[c[0]]] if tokens else list(c) for c in self.clients[i :: len(workers)]
            ]
            for i, wid in enumerate(workers)
        }
        agent: dict[str, Any] = {
            "tenant": self.options.tenant,
            "brokers": list(self.options.agent_brokers),
            "mqtt_version": self.options.agent_mqtt_version,
            "anti_entropy": self.options.agent_anti_entropy,
            "agent_token": env.agent_token,
            "signing_key": env.signing_key,
            "cache": self.options.cache or self.scenario.cache,
        }
        if env.pki is not None:
            agent["tls"] = {
                "broker_url": env.agent_broker_url,
                "ca": str(env.pki.ca_file),
                "devices": str(env.pki.devices_dir),
            }
        return {"shards": shards, "cold_revision": cold_revision, "agent": agent}

    def _download(self, env: Environment) -> dict[str, Any] | None:
        """What the download baseline GETs: the last manifest the scenario's setup uploaded
        (the one its steps then assign, in the shipped scenarios), with an agent's token;
        None when the setup uploaded none."""
        if not self.admin.manifests:
            return None
        pki = env.pki
        token = env.agent_token
        if pki is not None:
            # With --tls the server knows devices by their own tokens, as the agents use them.
            token = pki.tokens[self.clients[0][0]]
        return {
            "url": f"{env.server_url}/v1/manifests/{self.admin.manifests[-1]}",
            "token": token,
            "ca": str(pki.ca_file) if pki is not None else None,
        }

    async def _baseline(
        self, broker: BrokerAddress, subscriber: str, download: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The bare MQTT fan-out to as many plain subscribers as there are clients (each
        downloading a manifest too, with `download`)."""
        workers = self.fleet.workers
        n = len(self.clients)
        shares = {
            wid: n // len(workers) + (1 if i < n % len(workers) else 0)
            for i, wid in enumerate(workers)
        }
        topic = f"{control.baseline_topic(self.run)}/{subscriber}"
        args: dict[str, Any] = {
            "shares": shares,
            "topic": topic,
            # Downloads take longer than the fan-out: at 10,000 clients and 64 connections per
            # worker they queue for seconds.
            "timeout": 30 if download is None else 120,
            "subscriber": subscriber,
        }
        if download is not None:
            args["download"] = download
        seq = await self.fleet.publish_command("baseline", args)
        try:
            await self.fleet.wait_replies(seq, 600, phase="ready")
            from simulator.baseline import publish_probe

            await publish_probe(broker, topic)
            replies = await self.fleet.wait_replies(seq, args["timeout"] + 90)
        finally:
            await self.fleet.retire_command(seq)
        hist, notified = LatencyHistogram(), LatencyHistogram()
        received = failed = 0
        for r in replies.values():
            hist.merge(LatencyHistogram.decode(r["result"]["hist"]))
            if "notified" in r["result"]:
                notified.merge(LatencyHistogram.decode(r["result"]["notified"]))
            received += r["result"]["received"]
            failed += r["result"].get("failed", 0)
        extra: dict[str, Any] = {}
        if download is not None:
            extra["failed"] = failed
            # The download floor's subscribers' own notification, under the downloads.
            extra["notified"] = notified.summary()
        return {
            "subscriber": subscriber,
            "clients": n,
            "received": received,
            **extra,
            **hist.summary(),
            "cdf": hist.cdf(),
        }

    async def _run_steps(self, executor: StepExecutor) -> list[StepResult]:
        """Connect the clients (unless a step does), run every step, then the final check."""
        steps: list[StepResult] = []
        if self.scenario.start == "before":
            steps.append(await executor.connect())
        for step in self.scenario.steps:
            steps.append(await executor.run_step(step))
        settle = max(s.settle_timeout for s in self.scenario.steps)
        steps.append(await executor.final_check(settle))
        return steps

    async def _collect(self, steps: list[StepResult]) -> tuple[FleetStats, StageSet]:
        """Merge the workers' measurements into the steps; return the fleet's counters and
        the stage latencies of the whole run."""
        stats = await self.fleet.command(
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
            s.storm = connect_storm(s, [r["result"].get("storms", {}) for r in stats.values()])
        for s in steps:
            if s.name in ("connect", "cold-start") or self._starts_clients(s.name):
                s.stages.merge(cold)
        total = StageSet()
        for s in steps:
            if s.name != "connect":
                total.merge(s.stages)
        return fleet, total

    def _starts_clients(self, step_name: str) -> bool:
        return any(
            "start_clients" in i
            for st in self.scenario.steps
            if st.name == step_name
            for i in st.do
        )

    async def _shutdown(self) -> list[dict[str, Any]]:
        """Have the workers stop their agents and end; return every process's resource use."""
        shut = await self.fleet.command("shutdown", {}, timeout=120)
        processes = [m.result().as_dict() for m in self.monitors]
        for r in shut.values():
            proc = r["result"]["process"]
            if proc["role"] != "coordinator+worker":
                processes.append(proc)
            else:
                processes[0]["role"] = "coordinator+worker"
        return processes

    async def _teardown(
        self, sampler: asyncio.Task[None], watchdog: asyncio.Task[None], *, orderly: bool
    ) -> None:
        self.fleet.tearing_down = True
        sampler.cancel()
        watchdog.cancel()
        try:
            await self.fleet.stop(orderly=orderly)
        finally:
            await self.fleet.close()
            await self.tap.close()
            await self.admin.close()

    async def _sample_forever(self) -> None:
        while True:
            for m in self.monitors:
                m.sample()
            await asyncio.sleep(0.5)


def connect_storm(step: StepResult, storms: list[dict[str, Any]]) -> dict[str, Any] | None:
    """How the clients a step started connected, from every worker's account of it (None
    if the step started none): how many, and when the last one had connected, in seconds
    from the step's start (the coordinator's clock; workers of this machine share it)."""
    mine = [w[step.name] for w in storms if step.name in w]
    if not mine:
        return None
    connected = sum(int(m["connected"]) for m in mine)
    last = max((float(m["last"]) for m in mine if m["connected"]), default=None)
    return {
        "clients": sum(int(m["clients"]) for m in mine),
        "connected": connected,
        "seconds": None if last is None else round(max(0.0, last - step.started_at), 3),
    }


def default_workers() -> int:
    return os.cpu_count() or 1

"""The step executor: runs a scenario's steps (admin actions, faults, launches, checkpoints) and
measures how the fleet converged after each.

After each step every worker polls its agents until their entitlements equal the oracle's; at
checkpoints it launches every host app and compares the installed sets too.
"""

from __future__ import annotations

import asyncio
import functools
import json
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from addin_core.protocol import Filters
from addin_runtime.tasks import to_completion
from simulator.admin import AdminActions
from simulator.control import BrokerAddress, ControlChannel
from simulator.environment import TENANT, Environment
from simulator.fleet import WorkerFleet
from simulator.metrics import ProcessMonitor
from simulator.oracle import GroundTruth
from simulator.results import RunError, RunOptions, StepResult
from simulator.scenario import ADMIN_OPS, Step

Args = Mapping[str, Any]

NO_CONVERGE_BEFORE = ("broker_restart", "broker_kill", "server_restart", "duplicates")
"""Step items that go on right after an admin action, before the fleet converged on it: the
fault is meant to hit the fan-out in flight."""


class StateTap:
    """A subscriber to the tenant's retained state topics that keeps each topic's latest two
    messages, to re-send them for the `duplicates` fault."""

    def __init__(self, run: str, tenant: str = TENANT) -> None:
        self.run = run
        self.tenant = tenant
        self.held: dict[str, list[bytes]] = {}
        self._channel: ControlChannel | None = None

    async def open(self, broker: BrokerAddress) -> None:
        self._channel = ControlChannel(
            # State topics only: the tap also took every agent report (10,000 after a
            # checkpoint), which cost this process most of a core during the next step.
            broker,
            f"tap-{self.run}",
            Filters.retained_state(self.tenant),
            self._on_message,
            raw=True,  # re-sent byte for byte: a re-serialised signed payload would not verify
        )
        await self._channel.start()

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    async def _on_message(self, topic: str, data: bytes) -> None:
        held = self.held.setdefault(topic, [])
        if not held or held[-1] != data:
            held.append(data)
            del held[:-2]

    async def replay(self) -> int:
        """Re-send, not retained, the previous message of each topic (older revision: arrives
        "reordered") and the current one (a duplicate); return how many were sent."""
        assert self._channel is not None
        sent = 0
        for topic, held in list(self.held.items()):
            for data in held:
                await self._channel.publish(topic, data)
                sent += 1
        return sent


def _compact(per_user: Mapping[str, Any]) -> dict[str, Any]:
    """Per-user values as a table of distinct values and each user's index into it."""
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


def expected_state(truth: GroundTruth) -> tuple[dict[str, Any], dict[str, Any]]:
    """The oracle's entitlements and installed sets of every user, compacted for the wire."""
    ents = truth.entitlements_for_all()
    groups_of = truth.user_groups()
    inst_cache: dict[str, Any] = {}
    installed: dict[str, Any] = {}
    for user, e in ents.items():
        # Users with the same entitlements at the same versions (their rollout rings) share
        # one computed installed set.
        versions = {a: truth.version_for(a, user, groups_of[user]) for a in e}
        key = json.dumps({k: [str(v), versions[k]] for k, v in sorted(e.items())})
        if key not in inst_cache:
            got = truth.installed_for(e, user=user, groups=groups_of[user])
            inst_cache[key] = {str(h): v for h, v in got.items()}
        installed[user] = inst_cache[key]
    return (
        _compact({u: {a: str(m) for a, m in e.items()} for u, e in ents.items()}),
        _compact(installed),
    )


class StepExecutor:
    """Runs steps against a started fleet."""

    def __init__(
        self,
        options: RunOptions,
        env: Environment,
        fleet: WorkerFleet,
        admin: AdminActions,
        tap: StateTap,
        monitors: list[ProcessMonitor],
        clients: list[tuple[str, str]],
        start_args: dict[str, Any],
    ) -> None:
        self.options = options
        self.env = env
        self.fleet = fleet
        self.admin = admin
        self.tap = tap
        self.monitors = monitors
        """The processes sampled for the report; a restarted broker or server joins it."""
        self.clients = clients
        self.start_args = start_args
        """The `start` command's arguments (shards, cold revision, agent settings)."""
        self.offline_clients: set[str] = set()
        self.mismatches: list[dict[str, Any]] = []
        """Every checkpoint's differences from the oracle."""
        self._step_tasks: list[asyncio.Task[None]] = []
        self._items: dict[str, Callable[[Args, StepResult], Awaitable[None]]] = {
            "wait": self._wait,
            "launches": self._launches,
            "start_clients": self._start_clients,
            "broker_restart": functools.partial(self._broker_fault, "broker_restart"),
            "broker_kill": functools.partial(self._broker_fault, "broker_kill"),
            "server_restart": self._server_restart,
            "offline": self._offline,
            "online": self._online,
            "duplicates": self._duplicates,
        }

    async def connect(self) -> StepResult:
        """Start every client's agent and wait until the fleet converged."""
        connect = StepResult("connect", started_at=time.time())
        await self.fleet.command(
            "start",
            {**self.start_args, "storm": connect.name},
            timeout=600,
            progress_task="connect",
        )
        await self.converge(connect, connect.started_at, 120)
        connect.duration_s = time.time() - connect.started_at
        return connect

    async def final_check(self, settle: float) -> StepResult:
        final = StepResult("final-check", started_at=time.time())
        await self.converge(final, final.started_at, settle)
        self.mismatches.extend(await self.checkpoint("final-check", settle))
        final.duration_s = time.time() - final.started_at
        return final

    async def converge(self, result: StepResult, t0: float, timeout: float) -> None:
        ents, _ = expected_state(self.admin.truth)
        replies = await self.fleet.command(
            "converge", {"expected": ents, "t0": t0, "timeout": timeout}, timeout=timeout + 60
        )
        result.offsets = [o for r in replies.values() for o in r["result"]["offsets"]]
        result.unconverged = sum(r["result"]["unconverged"] for r in replies.values())
        result.online = len(result.offsets) + result.unconverged

    async def checkpoint(self, name: str, timeout: float) -> list[dict[str, Any]]:
        ents, inst = expected_state(self.admin.truth)
        replies = await self.fleet.command(
            "checkpoint",
            {"entitlements": ents, "installed": inst, "timeout": timeout},
            timeout=timeout + 150,
        )
        out = []
        for r in replies.values():
            for m in r["result"]["mismatches"]:
                out.append({"checkpoint": name, **m})
        return out

    async def run_step(self, step: Step) -> StepResult:
        res = StepResult(step.name, started_at=time.time())
        if self.options.progress:
            self.options.progress(f"step {step.name}", 0, 0)
        try:
            return await self._run_items(step, res)
        finally:
            # Ended early (a failure, a stop): a convergence poll must not outlive the step.
            for t in self._step_tasks:
                if not t.done():
                    t.cancel()
                elif not t.cancelled():
                    t.exception()  # retrieved: the error that ended the step is raised instead
            self._step_tasks.clear()

    def _start_converge(self, step: Step, res: StepResult) -> asyncio.Task[None]:
        t = asyncio.create_task(self.converge(res, res.started_at, step.settle_timeout))
        self._step_tasks.append(t)
        return t

    async def _run_items(self, step: Step, res: StepResult) -> StepResult:
        converge_task: asyncio.Task[None] | None = None
        dirty = False
        for item in step.do:
            ((key, args),) = item.items()
            if key in ADMIN_OPS:
                await self.admin.apply(item, res)
                dirty = True
                continue
            if key == "checkpoint":
                if converge_task is None or dirty:
                    converge_task = self._start_converge(step, res)
                    dirty = False
                await converge_task
                self.mismatches.extend(await self.checkpoint(step.name, step.settle_timeout))
                await asyncio.sleep(self.options.checkpoint_settle)
                continue
            if dirty and key not in NO_CONVERGE_BEFORE:
                converge_task = self._start_converge(step, res)
                dirty = False
            await self._other(key, args, res)
        if converge_task is None or dirty:
            converge_task = self._start_converge(step, res)
        await converge_task
        res.duration_s = time.time() - res.started_at
        return res

    async def _other(self, key: str, a: Args, res: StepResult) -> None:
        handler = self._items.get(key)
        if handler is None:
            raise RunError(f"unknown step item {key!r}")
        await handler(a, res)

    # -- step items other than admin actions and checkpoints ----------------------------------
    async def _wait(self, a: Args, res: StepResult) -> None:
        await asyncio.sleep(float(a.get("seconds", 1)))

    async def _launches(self, a: Args, res: StepResult) -> None:
        await self.fleet.command(
            "launches",
            {
                "rate": a.get("rate", 0.1),
                "duration": a.get("duration", 2),
                "seed": self.options.seed,
            },
            timeout=float(a.get("duration", 2)) + 120,
        )

    async def _start_clients(self, a: Args, res: StepResult) -> None:
        self.start_args["cold_revision"] = max(
            [int(self.start_args["cold_revision"]), *res.revisions]
        )
        await self.fleet.command(
            "start", {**self.start_args, "storm": res.name}, timeout=600, progress_task="connect"
        )

    async def _broker_fault(self, key: str, a: Args, res: StepResult) -> None:
        broker = self.env.broker
        if broker is None:
            raise RunError(f"{key} needs the private broker (run without --broker)")
        await to_completion(asyncio.to_thread(broker.restart, hard=key == "broker_kill"))
        if broker.process:
            self.monitors.append(ProcessMonitor("broker", broker.process.pid))
        res.notes.append(key.replace("_", " "))

    async def _server_restart(self, a: Args, res: StepResult) -> None:
        await to_completion(asyncio.to_thread(self.env.restart_server))
        if self.env.server:
            self.monitors.append(ProcessMonitor("server", self.env.server.pid))
        res.notes.append("server restarted")

    async def _offline(self, a: Args, res: StepResult) -> None:
        rng = random.Random(f"{self.options.seed}:{a.get('seed', 0)}")
        chosen = rng.sample(
            [c for c, _ in self.clients], int(len(self.clients) * float(a["share"]))
        )
        self.offline_clients |= set(chosen)
        await self.fleet.command("offline", {"clients": chosen}, timeout=120)
        res.notes.append(f"{len(chosen)} clients offline")

    async def _online(self, a: Args, res: StepResult) -> None:
        await self.fleet.command(
            "online", {"storm": res.name}, timeout=600, progress_task="connect"
        )
        res.notes.append(f"{len(self.offline_clients)} clients back online")
        self.offline_clients.clear()

    async def _duplicates(self, a: Args, res: StepResult) -> None:
        # Agents must ignore both the reordered and the duplicated messages.
        sent = await self.tap.replay()
        res.notes.append(f"{sent} duplicated/reordered messages")

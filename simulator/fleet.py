"""The coordinator's side of the control channel: the workers of a run.

It commands the workers and collects their answers (`simulator.control` describes the
messages), starts local workers (subprocesses, or one inside this event loop) and stops them,
and watches their heartbeats: a worker that died, hangs or does not get a command fails the
run at once instead of at the command's timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from addin_runtime.tasks import cancel_and_wait, wait_event
from simulator import control
from simulator.control import BrokerAddress, ControlChannel
from simulator.environment import console_script
from simulator.processes import die_with_parent
from simulator.results import RunError

if TYPE_CHECKING:
    from simulator.netns import Namespaces
    from simulator.worker import Worker

log = logging.getLogger(__name__)

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

Progress = Callable[[str, int, int], None]


class WorkerFleet:
    """The workers of one run, driven over the control channel."""

    def __init__(self, run: str, progress: Progress | None) -> None:
        self.run = run
        self.progress = progress
        self._channel: ControlChannel | None = None
        self.seq = 0
        self.hellos: dict[str, dict[str, Any]] = {}
        self.replies: dict[str, dict[str, Any]] = {}
        self.progress_seen: dict[str, dict[str, Any]] = {}
        self._changed = asyncio.Event()
        self.workers: list[str] = []
        """The workers of the run, once they joined (`join`)."""
        self.heard: dict[str, float] = {}
        """`time.monotonic()` of each worker's latest heartbeat (or hello)."""
        self.seen: dict[str, tuple[list[int], float]] = {}
        """The commands each worker's latest heartbeat says it has received, and when it came."""
        self.commands: dict[int, tuple[str, dict[str, Any], float]] = {}
        """Commands not yet answered by every worker: seq -> (cmd, message, published at)."""
        self._sent_at: dict[int, float] = {}
        self.resent = 0
        """Commands published again because a live worker had not seen them."""
        self.netns: Namespaces | None = None
        """With `addin-sim run --netns`: local workers start in these, in turn."""
        self.local_procs: dict[str, subprocess.Popen[bytes]] = {}
        """Worker subprocesses of this run by their log file."""
        self.in_process: asyncio.Task[None] | None = None
        self.in_process_worker: Worker | None = None
        self.tearing_down = False
        """Set when the run starts to stop its workers and environment (orderly or not)."""
        self.failure: RunError | None = None
        """Why the worker watchdog ended the run."""

    @property
    def channel(self) -> ControlChannel:
        if self._channel is None:
            raise RuntimeError("the control channel is not open")
        return self._channel

    async def open(self, broker: BrokerAddress) -> None:
        self._channel = ControlChannel(
            broker, f"coord-{self.run}", [control.worker_filter(self.run)], self._on_worker
        )
        await self._channel.start()

    async def close(self) -> None:
        """Delete the commands still published and leave the broker."""
        for seq in list(self.commands):
            await self.retire_command(seq)
        await self.channel.close()

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

    # -- commands -----------------------------------------------------------------------------
    async def command(
        self,
        cmd: str,
        args: dict[str, Any],
        timeout: float = 300.0,
        phase: str | None = None,
        progress_task: str | None = None,
    ) -> dict[str, dict[str, Any]]:
        seq = await self.publish_command(cmd, args)
        try:
            return await self.wait_replies(seq, timeout, phase, progress_task)
        finally:
            await self.retire_command(seq)

    async def publish_command(self, cmd: str, args: dict[str, Any]) -> int:
        self.seq += 1
        seq = self.seq
        message = {"seq": seq, "cmd": cmd, "args": args}
        self.commands[seq] = (cmd, message, time.monotonic())
        await self.channel.publish_state(control.cmd_topic(self.run, seq), message)
        return seq

    async def retire_command(self, seq: int) -> None:
        self.commands.pop(seq, None)
        self._sent_at.pop(seq, None)
        await self.channel.clear(control.cmd_topic(self.run, seq))

    async def wait_replies(
        self, seq: int, timeout: float, phase: str | None = None, progress_task: str | None = None
    ) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            mine = {
                wid: r[str(seq)]
                for wid, r in self.replies.items()
                if wid in self.workers and str(seq) in r
            }
            # A failure ends the wait whatever phase it waits for: a worker whose command
            # failed before its "ready" never sends one (a run waited out the 600 s).
            for wid, r in mine.items():
                if not r.get("ok", False):
                    raise RunError(f"worker {wid}: {r.get('error')}")
            got = {
                wid: r
                for wid, r in mine.items()
                if (r.get("phase") == phase if phase else "phase" not in r)
            }
            if progress_task and self.progress:
                done = sum(p["done"] for p in self.progress_seen.values() if p.get("seq") == seq)
                self.progress(progress_task, done, 0)
            if len(got) == len(self.workers):
                return got
            if time.monotonic() > deadline:
                missing = sorted(set(self.workers) - set(got))
                raise RunError(f"no answer to {seq} from workers {missing} within {timeout}s")
            await self._check_workers(seq, set(got))
            await self._wait_for_news()

    async def _wait_for_news(self) -> None:
        self._changed.clear()
        await wait_event(self._changed, 0.5)

    # -- liveness -----------------------------------------------------------------------------
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

    async def watch(self, run: asyncio.Task[Any]) -> None:
        """Ends the run as soon as a worker is gone, whatever the run is doing (a scenario's
        `wait` too), not when the next command times out."""
        while True:
            await asyncio.sleep(0.5)
            try:
                self._check_liveness()
            except RunError as e:
                self.failure = e
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

    # -- starting and stopping workers --------------------------------------------------------
    def start_in_process(self, broker: BrokerAddress, server_url: str, cache_dir: Path) -> None:
        from simulator.worker import Worker

        w = Worker(self.run, broker, server_url, cache_dir=cache_dir, role="coordinator+worker")
        self.in_process = asyncio.create_task(w.serve(), name="in-process worker")
        self.in_process_worker = w

    def spawn(self, workdir: Path, broker_url: str, server_url: str, cache_dir: Path) -> None:
        """Start one worker subprocess, logging to workdir/worker-N.log."""
        index = len(self.local_procs)
        log_path = workdir / f"worker-{index}.log"
        log = open(log_path, "ab")
        try:
            argv = [
                console_script("addin-sim"),
                "worker",
                "--run",
                self.run,
                "--broker",
                broker_url,
                "--server",
                server_url,
                "--cache-dir",
                str(cache_dir),
            ]
            p = subprocess.Popen(
                self.netns.command(index, argv) if self.netns is not None else argv,
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent(),
            )
        finally:
            log.close()
        self.local_procs[str(log_path)] = p

    async def join(self, wanted: int, timeout: float) -> None:
        """Wait until `wanted` workers said hello; they are the run's workers from then on."""
        deadline = time.monotonic() + timeout
        while len(self.hellos) < wanted:
            if time.monotonic() > deadline:
                raise RunError(
                    f"only {len(self.hellos)} of {wanted} workers joined within {timeout:.0f} s"
                )
            await self._check_workers(0, set())
            await self._wait_for_news()
        self.workers = sorted(self.hellos)[:wanted]

    async def stop(self, *, orderly: bool) -> None:
        """After `shutdown` the workers end by themselves; after a failure or a stop they are
        told to. Bounded either way, and the in-process worker's agents are stopped (their
        cache threads would keep this process alive)."""
        t = self.in_process
        if t is not None:
            if not orderly and self.in_process_worker is not None:
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

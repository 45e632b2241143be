"""The simulator's own reliability: control traffic across broker kills, workers that die,
runs that are stopped. Real Mosquitto, real server stub, real worker processes."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from simulator.coordinator import Coordinator, RunError, RunOptions
from simulator.scenario import load_scenario, parse_scenario

KILL_THEN_LAUNCH = Path(__file__).parent / "fixtures" / "scenarios" / "kill-then-launch.yaml"


@pytest.mark.slow
@pytest.mark.parametrize("clients", [30, 300])
async def test_control_commands_survive_broker_kills(clients: int, tmp_path: Path) -> None:
    """A broker kill followed by launches in the same step used to lose the launch command
    (one retained "latest command" kept only the convergence poll published after it), and
    the run failed after 121 s: 'no answer to 7 from workers'."""
    options = RunOptions(
        clients=clients, workers=2, workdir=tmp_path, baseline=False, checkpoint_settle=0.2
    )
    result = await asyncio.wait_for(
        Coordinator(load_scenario(str(KILL_THEN_LAUNCH)), options).execute(), 240
    )
    assert result.mismatches == []
    assert result.server_disagreements == []
    assert [s.name for s in result.steps][-3:-1] == ["kill-then-launch", "kill-then-launch-again"]
    for step in result.steps:
        assert step.unconverged == 0, step.name
    assert result.steps[-1].online == clients


SMALL = """
name: small
org: {groups: 3}
addins:
  notes: {hosts: [Word], permissions: ReadDocument}
setup:
  - upload: {addin: notes}
steps:
  - name: assign
    do:
      - assign: {addin: notes, target: everyone, mode: fixed}
      - checkpoint: {}
"""


async def test_a_command_a_worker_missed_is_published_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's heartbeat lists the commands it received; one it has not is published
    again, and obeyed once."""
    from simulator.worker import Worker

    real = Worker._on_message
    dropped: list[str] = []
    obeyed: list[str] = []

    async def lossy(self: Worker, topic: str, data: dict[str, Any]) -> None:
        if data.get("cmd") == "checkpoint" and not dropped:
            dropped.append(topic)  # as if lost on the way
            return
        if data.get("cmd") == "checkpoint":
            obeyed.append(topic)
        await real(self, topic, data)

    monkeypatch.setattr(Worker, "_on_message", lossy)
    coordinator = Coordinator(
        parse_scenario(SMALL),
        RunOptions(clients=10, workers=0, workdir=tmp_path, baseline=False, checkpoint_settle=0),
    )
    # Bounded only so that a regression fails instead of waiting out the command's timeout.
    result = await asyncio.wait_for(coordinator.execute(), 60)
    assert result.mismatches == []
    assert len(dropped) == 1 and coordinator.resent >= 1
    assert obeyed[0] == dropped[0]


LONG_WAIT = """
name: long-wait
org: {groups: 3}
addins:
  notes: {hosts: [Word], permissions: ReadDocument}
setup:
  - upload: {addin: notes}
steps:
  - name: wait
    do:
      - assign: {addin: notes, target: everyone, mode: fixed}
      - wait: {seconds: 600}
"""


async def test_a_worker_that_dies_fails_the_run_at_once(tmp_path: Path) -> None:
    coordinator = Coordinator(
        parse_scenario(LONG_WAIT),
        RunOptions(clients=10, workers=1, workdir=tmp_path, baseline=False),
    )
    run = asyncio.ensure_future(coordinator.execute())

    async def kill_the_worker_once_it_works() -> None:
        for _ in range(1200):  # at most 60 s
            if coordinator.local_procs and coordinator.workers:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        (proc,) = coordinator.local_procs.values()
        proc.kill()

    killer = asyncio.ensure_future(kill_the_worker_once_it_works())
    try:
        # Bounded only so that a regression fails instead of hanging: the step waits 600 s.
        with pytest.raises(RunError, match=r"worker process \d+ exited with status -9"):
            await asyncio.wait_for(run, 120)
    finally:
        killer.cancel()


async def test_a_failed_run_keeps_its_logs_and_says_where() -> None:
    """Without --workdir the run's folder is temporary; when the run fails it stays, and the
    error names it (the broker, server and worker logs are what explains a failure)."""
    coordinator = Coordinator(
        parse_scenario(LONG_WAIT), RunOptions(clients=10, workers=1, baseline=False)
    )
    run = asyncio.ensure_future(coordinator.execute())
    for _ in range(1200):  # at most 60 s
        if coordinator.local_procs and coordinator.workers:
            break
        await asyncio.sleep(0.05)
    (proc,) = coordinator.local_procs.values()
    proc.kill()
    with pytest.raises(RunError, match=r"the run's logs are kept in (\S+)\)") as e:
        await asyncio.wait_for(run, 120)
    kept = Path(str(e.value).rsplit("kept in ", 1)[1].rstrip(")"))
    try:
        assert (kept / "server.log").is_file()
        assert (kept / "broker" / "mosquitto.log").is_file()
    finally:
        shutil.rmtree(kept, ignore_errors=True)


FAILING_OFFLINE = """
name: failing-offline
org: {groups: 3}
cache: file
addins:
  notes: {hosts: [Word], permissions: ReadDocument}
setup:
  - upload: {addin: notes}
steps:
  - name: offline
    do:
      - assign: {addin: notes, target: everyone, mode: fixed}
      - offline: {share: 0.5}
"""


def _cache_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if "_connection_worker_thread" in t.name]


async def test_a_failed_run_closes_every_agent_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each open file cache is a non-daemon thread: one left open kept pytest from exiting."""
    from simulator.worker import Worker

    async def broken(self: Worker, seq: int, args: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("injected failure")

    monkeypatch.setattr(Worker, "cmd_offline", broken)
    before = set(_cache_threads())
    options = RunOptions(clients=12, workers=0, workdir=tmp_path, baseline=False)
    with pytest.raises(RunError, match="injected failure"):
        await asyncio.wait_for(Coordinator(parse_scenario(FAILING_OFFLINE), options).execute(), 120)
    left = set(_cache_threads()) - before
    for t in left:
        t.join(timeout=10)
    assert [t for t in left if t.is_alive()] == []


def _start_run(tmp_path: Path) -> tuple[subprocess.Popen[bytes], list[psutil.Process]]:
    """`addin-sim run` with one worker process, once broker, server and worker are up."""
    scenario = tmp_path / "long-wait.yaml"
    scenario.write_text(LONG_WAIT)
    run = subprocess.Popen(
        [sys.executable, "-m", "simulator.cli", "run", "--clients", "10", "--workers", "1",
         "--scenario", str(scenario), "--no-baseline", "--report", str(tmp_path / "report")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    parent = psutil.Process(run.pid)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        children = parent.children(recursive=True)
        names = " ".join(" ".join(c.cmdline()) for c in children if c.is_running())
        if "mosquitto" in names and "serve" in names and " worker " in names:
            time.sleep(1)  # into the run proper: the worker joins, the clients start
            return run, parent.children(recursive=True)
        assert run.poll() is None, run.communicate()[1].decode()
        time.sleep(0.1)
    run.kill()
    raise AssertionError("the run did not start its broker, server and worker within 60 s")


def _survivors(procs: list[psutil.Process]) -> list[str]:
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(" ".join(p.cmdline()))
        except psutil.NoSuchProcess:
            pass
    return alive


def _kill_all(procs: list[psutil.Process]) -> None:
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.mark.slow
def test_sigterm_stops_the_run_and_every_child_process(tmp_path: Path) -> None:
    run, children = _start_run(tmp_path)
    try:
        run.send_signal(signal.SIGTERM)
        _, err = run.communicate(timeout=90)
        assert run.returncode == 128 + signal.SIGTERM, err.decode()
        assert "run stopped by SIGTERM" in err.decode()
        assert _survivors(children) == []
    finally:
        run.kill()
        _kill_all(children)


@pytest.mark.slow
def test_a_sigkilled_run_takes_its_children_along(tmp_path: Path) -> None:
    run, children = _start_run(tmp_path)
    try:
        run.kill()
        run.wait()
        # The kernel signals them when their parent dies; give them a moment to go.
        deadline = time.monotonic() + 20
        while _survivors(children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _survivors(children) == []
    finally:
        _kill_all(children)


async def test_a_command_failing_before_its_ready_phase_fails_the_run_at_once() -> None:
    """The baseline command answers "ready" once its subscribers are connected; a worker
    whose subscribers could not connect answers with its error and never sends "ready".
    The coordinator waited out the 600 s for the "ready" instead of failing the run."""
    from simulator.fleet import RunError, WorkerFleet

    fleet = WorkerFleet("r", None)
    fleet.workers = ["w1", "w2"]
    fleet.replies = {
        "w1": {"7": {"ok": True, "phase": "ready"}},
        "w2": {"7": {"ok": False, "error": "RuntimeError: baseline subscriber 4945 could not"
                                          " connect"}},
    }  # fmt: skip
    with pytest.raises(RunError, match="worker w2: RuntimeError: baseline subscriber 4945"):
        await asyncio.wait_for(fleet.wait_replies(7, 600, phase="ready"), 5)

"""What the host lifecycle watcher costs: the idle daemon's CPU seconds per hour.

`addin-agent run` as a real process (lab config, folder applier, 10 add-ins assigned for Word
and Excel) against `addin-server serve` and a private Mosquitto. Its CPU time (user + system,
from psutil) is sampled over `--seconds` and extrapolated to an hour, in three phases:

* watch_hosts = false (the daemon without the watcher, for comparison);
* watch_hosts = true, no host app running;
* watch_hosts = true, "Word" and "Excel" running (copies of `sleep` named WINWORD.EXE and
  EXCEL.EXE, started before the sample; their launches were noticed and applied).

With strace on the machine, each phase also counts the event loop's wake-ups per minute (its
epoll_wait calls that slept, bench_agent.py's `count_wakeups`). It also times one watcher
poll in-process (the usual poll, and a full rescan of every name).

    .venv/bin/python bench/bench_hostwatch.py [--seconds 60] [--interval 1.0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from agent_helpers import AGENT_TOKEN, ServerProcess, addin_id, manifest  # noqa: E402
from bench_agent import count_wakeups, wakeups_counted  # noqa: E402  (bench/ is sys.path[0])
from host_helpers import HostApp  # noqa: E402

from addin_runtime.sqlite_tx import readonly_uri  # noqa: E402
from agent.hostwatch import HostEvent, HostWatcher, default_processes  # noqa: E402
from simulator.mosquitto import MosquittoBroker  # noqa: E402

ADDINS = 10
READY_WITHIN = 120.0


def _count(cache: Path, sql: str) -> int:
    if not cache.exists():
        return 0
    try:
        with sqlite3.connect(readonly_uri(cache), uri=True) as c:
            return int(c.execute(sql).fetchone()[0])
    except sqlite3.Error:
        return 0


async def _until(cache: Path, sql: str, want: int, what: str) -> None:
    deadline = time.monotonic() + READY_WITHIN
    while _count(cache, sql) < want:
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def _cpu_per_hour(pid: int, seconds: float, out: dict[str, Any], key: str) -> None:
    """CPU seconds per hour into ``out[key]``, and the event loop's wake-ups per minute
    (strace, when present: bench_agent.count_wakeups) into ``out[key + "_wakeups_per_min"]``."""
    p = psutil.Process(pid)
    await asyncio.sleep(2)  # let whatever the last change started finish
    trace = Path(tempfile.mkdtemp(prefix="bench-hostwatch-strace-")) / "idle.strace"
    tracer = count_wakeups(pid, trace)
    c0, t0 = p.cpu_times(), time.monotonic()
    await asyncio.sleep(seconds)
    c1, t1 = p.cpu_times(), time.monotonic()
    woke = wakeups_counted(tracer, trace)
    used = c1.user + c1.system - c0.user - c0.system
    out[key] = round(used / (t1 - t0) * 3600, 2) + 0.0  # + 0.0: no "-0.0"
    out[key + "_wakeups_per_min"] = None if woke is None else round(woke * 60 / (t1 - t0), 1)


def _spawn(cfg: Path, log: Any, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(cfg)],
        stdout=log,
        stderr=log,
        env=env,
    )


async def _ignore(_: HostEvent) -> None:
    return None


def poll_cost(polls: int = 200) -> dict[str, float]:
    w = HostWatcher(default_processes(), 1.0, _ignore, rescan=1e9)
    w.poll()
    t0 = time.process_time()
    for _ in range(polls):
        w.poll()
    usual = (time.process_time() - t0) / polls
    full = HostWatcher(default_processes(), 1.0, _ignore, rescan=0.0)
    t0 = time.process_time()
    for _ in range(polls // 10):
        full.poll()
    rescan = (time.process_time() - t0) / (polls // 10)
    return {"poll_us": round(usual * 1e6, 1), "full_rescan_us": round(rescan * 1e6, 1)}


async def run(seconds: float, interval: float) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-hostwatch-"))
    broker = MosquittoBroker(work / "broker")
    broker.start()
    server = ServerProcess(work, broker)
    proc: subprocess.Popen[bytes] | None = None
    hosts: list[HostApp] = []
    out: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "processes_on_machine": len(psutil.pids()),
        "interval_s": interval,
        "sample_s": seconds,
        # The kernel counts CPU time in clock ticks (10 ms): what one tick is per hour here.
        "resolution_cpu_s_per_h": round(0.01 / seconds * 3600, 2),
    }
    try:
        await server.user("ann")
        for i in range(ADDINS):
            await server.upload(manifest(f"bench{i}", hosts=("Word", "Excel")))
            await server.assign(addin_id(f"bench{i}"), "everyone", mode="fixed")
        cache = work / "cache.sqlite"
        env = {k: v for k, v in os.environ.items() if not k.startswith("ADDIN_AGENT_")}
        log = open(work / "daemon.log", "wb")  # noqa: ASYNC230
        for watch in (False, True):
            cfg = work / "agent.toml"
            cfg.write_text(
                f'tenant = "contoso"\nuser_id = "ann"\nclient_id = "bench-pc"\ninsecure = true\n'
                f'broker_url = "{broker.url}"\nserver_url = "{server.url}"\n'
                f'server_token = "{AGENT_TOKEN}"\ncache_path = "{cache}"\n'
                f'hosts = ["Word", "Excel"]\napplier = "folder"\n'
                f'applier_dir = "{work / "wef"}"\ncontrol = "{work / "agent.sock"}"\n'
                f"watch_hosts = {'true' if watch else 'false'}\n"
                f"host_poll_interval = {interval}\n"
            )
            proc = _spawn(cfg, log, env)
            await _until(
                cache,
                "SELECT count(*) FROM manifests WHERE status='verified'",
                ADDINS,
                "the manifests",
            )
            if not watch:
                await _cpu_per_hour(proc.pid, seconds, out, "cpu_s_per_h_without_watcher")
            else:
                await _cpu_per_hour(proc.pid, seconds, out, "cpu_s_per_h_watching_no_host")
                hosts = [HostApp(work / "bin", n) for n in ("WINWORD.EXE", "EXCEL.EXE")]
                await _until(
                    cache,
                    "SELECT count(*) FROM installed",
                    2 * ADDINS,
                    "the launches of Word and Excel",
                )
                await _cpu_per_hour(proc.pid, seconds, out, "cpu_s_per_h_watching_2_hosts")
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)
            proc = None
        out.update(poll_cost())
        return out
    finally:
        for h in hosts:
            h.exit()
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)
        await server.aclose()
        broker.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--interval", type=float, default=1.0)
    a = ap.parse_args()
    print(json.dumps(asyncio.run(run(a.seconds, a.interval)), indent=2))


if __name__ == "__main__":
    main()

"""Agent benchmarks: the daemon as a real process against a real server and broker.

* idle daemon RSS and CPU with 50 add-ins entitled, installed in Word and Excel, and the
  event loop's wake-ups over that window (epoll_wait calls counted by strace, when present);
  RSS again after a restart on the warm cache (nothing to download: a workstation's boot);
  each RSS also split into anonymous and file-backed memory and PSS (`memory_split`; with
  ``--smaps-dir`` the daemon's full /proc/PID/smaps at both moments is kept there);
* `launch` latency through the daemon's control socket: with the CLI's own client
  (`agent.control_client`, http.client) and with httpx (the figure before that client
  existed); the daemon's CPU time per launch; `status` through the same client as the
  floor of any request in the same minute (socket, event loop, the machine's scheduling);
  and the CLI process end to end;
* `why` latency on the cache (in-process read-only query, and the CLI process end to end);
* admin write → manifest cached: HTTP upload of a new version until the daemon has fetched,
  verified and committed it (read from the cache file's `manifests.fetched_at`).

    .venv/bin/python bench/bench_agent.py [--addins 50] [--launches 300] [--writes 20]
        [--idle-seconds 60] [--runs 3] [--smaps-dir DIR]

With ``--runs N`` the whole measurement is made N times and the medians are printed last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from agent_helpers import AGENT_TOKEN, ServerProcess, addin_id, manifest  # noqa: E402

from addin_runtime.sqlite_tx import readonly_uri  # noqa: E402
from agent import control_client  # noqa: E402
from agent.why import why  # noqa: E402
from simulator.mosquitto import MosquittoBroker  # noqa: E402

CLI = [sys.executable, "-m", "agent.cli"]


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def summary(values_s: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values_s]
    return {
        "n": len(ms),
        "p50_ms": round(pct(ms, 50), 3),
        "p99_ms": round(pct(ms, 99), 3),
        "max_ms": round(max(ms), 3),
        "mean_ms": round(statistics.fmean(ms), 3),
    }


def _rss_mb(pid: int) -> float:
    return round(psutil.Process(pid).memory_info().rss / 2**20, 1)


def memory_split(pid: int, save_to: Path | None = None) -> dict[str, float] | None:
    """The RSS split by what it is (/proc/PID/smaps_rollup, Linux): `anon_mb` is the
    process's own memory (Python objects, malloc, thread stacks); `file_mb` is pages of
    files mapped from disk (the interpreter, shared libraries, extension modules), which the
    page cache shares with every process mapping the same file; `pss_mb` charges each shared
    page to the processes mapping it. None where /proc has no smaps_rollup. `save_to` keeps
    the full /proc/PID/smaps, to see which mapping holds what."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        if save_to is not None:
            save_to.write_text(Path(f"/proc/{pid}/smaps").read_text())
    except OSError:
        return None
    kb = {}
    for line in rollup.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == "kB":
            kb[parts[0].rstrip(":")] = int(parts[1])
    anon = kb["Anonymous"]
    return {
        "rss_mb": round(kb["Rss"] / 1024, 1),
        "anon_mb": round(anon / 1024, 1),
        "file_mb": round((kb["Rss"] - anon) / 1024, 1),
        "pss_mb": round(kb["Pss"] / 1024, 1),
    }


def count_wakeups(pid: int, out: Path) -> subprocess.Popen[bytes] | None:
    """strace logging the daemon's epoll_wait calls until it is interrupted; None without
    strace (or the right to attach)."""
    if shutil.which("strace") is None:
        return None
    return subprocess.Popen(
        ["strace", "-f", "-e", "trace=epoll_wait", "-o", str(out), "-p", str(pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def wakeups_counted(tracer: subprocess.Popen[bytes] | None, out: Path) -> int | None:
    """The event loop's sleeps that ended: epoll_wait calls with a timeout other than 0 (a
    call with 0 only collects what is ready while the loop is awake)."""
    if tracer is None:
        return None
    tracer.send_signal(signal.SIGINT)
    tracer.wait(30)
    if not out.exists():
        return None
    calls = [line for line in out.read_text().splitlines() if "epoll_wait(" in line]
    return sum(1 for line in calls if not re.search(r",\s*0\)\s*=", line))


def _spawn(cfg: Path, log: Any, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([*CLI, "run", "--config", str(cfg)], stdout=log, stderr=log, env=env)


def _timed_cli(env: dict[str, str], *args: str) -> float:
    """Wall time of one `addin-agent` command as a user runs it (process start included)."""
    t0 = time.perf_counter()
    subprocess.run([*CLI, *args], env=env, check=True, capture_output=True)
    return time.perf_counter() - t0


async def run(
    addins: int, launches: int, writes: int, idle_seconds: float, smaps_dir: Path | None = None
) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-agent-"))
    broker = MosquittoBroker(work / "broker")
    broker.start()
    server = ServerProcess(work, broker)
    proc: subprocess.Popen[bytes] | None = None
    try:
        await server.user("ann")
        for i in range(addins):
            await server.upload(manifest(f"bench{i}", hosts=("Word", "Excel")))
            await server.assign(addin_id(f"bench{i}"), "everyone", mode="fixed")
        cache = work / "cache.sqlite"
        sock = work / "agent.sock"
        cfg = work / "agent.toml"
        cfg.write_text(
            f'tenant = "contoso"\nuser_id = "ann"\nclient_id = "bench-pc"\ninsecure = true\n'
            f'broker_url = "{broker.url}"\nserver_url = "{server.url}"\n'
            f'server_token = "{AGENT_TOKEN}"\ncache_path = "{cache}"\n'
            f'applier = "folder"\napplier_dir = "{work / "wef"}"\ncontrol = "{sock}"\n'
        )
        env = {**os.environ, "ADDIN_AGENT_CONFIG": str(cfg)}
        log = open(work / "daemon.log", "wb")  # noqa: ASYNC230
        t_start = time.time()
        proc = _spawn(cfg, log, env)
        # Ready: every add-in entitled and its manifest verified.
        while True:
            if cache.exists():
                try:
                    with sqlite3.connect(readonly_uri(cache), uri=True) as c:
                        n = c.execute(
                            "SELECT count(*) FROM manifests WHERE status='verified'"
                        ).fetchone()[0]
                    if n >= addins:
                        break
                except sqlite3.Error:
                    pass
            if time.time() - t_start > 120:
                raise RuntimeError("daemon did not cache all manifests in 120 s")
            await asyncio.sleep(0.05)
        cold = time.time() - t_start

        transport = httpx.AsyncHTTPTransport(uds=str(sock))
        async with httpx.AsyncClient(transport=transport, base_url="http://agent") as h:
            t0 = time.perf_counter()
            r = await h.post("/v1/launch/Word")
            first_launch = time.perf_counter() - t0
            assert len(r.json()["installed"]) == addins, r.text
            await h.post("/v1/launch/Excel")

            # Idle: connected, nothing happening.
            p = psutil.Process(proc.pid)
            await asyncio.sleep(2)
            tracer = count_wakeups(proc.pid, work / "idle.strace")
            cpu0 = p.cpu_times()
            t0 = time.monotonic()
            await asyncio.sleep(idle_seconds)
            cpu1 = p.cpu_times()
            idle_window = time.monotonic() - t0
            wakeups = wakeups_counted(tracer, work / "idle.strace")
            idle_cpu = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / idle_window
            rss = p.memory_info().rss
            idle_split = memory_split(proc.pid, smaps_dir and smaps_dir / "idle.smaps")

            # The floor in the same minute: a request that does no work (`status` reads
            # four in-memory values), on the same socket with the same client.
            lat_status = []
            for _ in range(launches):
                t0 = time.perf_counter()
                answer = control_client.call(str(sock), "GET", "/v1/status")
                lat_status.append(time.perf_counter() - t0)
                assert answer is not None and answer[0] == 200, answer

            # The CLI's client: what `addin-agent launch` (and a launch hook using it) does.
            lat_cli_client = []
            cpu0 = p.cpu_times()
            for i in range(launches):
                host = ("Word", "Excel", "PowerPoint", "Outlook")[i % 4]
                t0 = time.perf_counter()
                answer = control_client.call(str(sock), "POST", f"/v1/launch/{host}")
                lat_cli_client.append(time.perf_counter() - t0)
                assert answer is not None and answer[0] == 200, answer
            cpu1 = p.cpu_times()
            # The daemon's CPU per launch (both of its threads): the work, whatever the load.
            launch_cpu_ms = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / launches * 1000

            lat = []
            for i in range(launches):
                host = ("Word", "Excel", "PowerPoint", "Outlook")[i % 4]
                t0 = time.perf_counter()
                r = await h.post(f"/v1/launch/{host}")
                lat.append(time.perf_counter() - t0)
                assert r.status_code == 200

        cli_launch = []
        for _ in range(10):
            cli_launch.append(_timed_cli(env, "launch", "Word", "--json"))

        ro = sqlite3.connect(readonly_uri(cache), uri=True)
        ro.row_factory = sqlite3.Row
        why_lat = []
        for i in range(300):
            t0 = time.perf_counter()
            rep = why(ro, f"bench{i % addins}")
            why_lat.append(time.perf_counter() - t0)
            assert rep.cause == "installed" or rep.cause == "mixed", rep
        cli_why = []
        for _ in range(10):
            cli_why.append(_timed_cli(env, "why", "bench0", "--json"))

        # Admin write -> manifest cached on this agent.
        to_cached, to_notified = [], []
        target = addin_id("bench0")
        for i in range(writes):
            version = f"1.0.{i + 1}.0"
            t0 = time.time()
            await server.upload(manifest("bench0", version, hosts=("Word", "Excel")))
            while True:
                row = ro.execute(
                    "SELECT fetched_at FROM manifests WHERE addin_id=? AND version=?",
                    (target, version),
                ).fetchone()
                if row:
                    to_cached.append(row["fetched_at"] - t0)
                    ev = ro.execute(
                        "SELECT min(at) FROM events WHERE kind='received' AND addin_id=? AND at>=?",
                        (target, t0),
                    ).fetchone()[0]
                    if ev:
                        to_notified.append(ev - t0)
                    break
                if time.time() - t0 > 30:
                    raise RuntimeError(f"{version} not cached within 30 s")
                await asyncio.sleep(0.002)
        ro.close()

        # A restart on the warm cache: every manifest is cached, nothing is downloaded.
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        proc = _spawn(cfg, log, env)
        t0 = time.time()
        while control_client.call(str(sock), "GET", "/v1/status") is None:
            if time.time() - t0 > 60 or proc.poll() is not None:
                raise RuntimeError("the restarted daemon did not answer in 60 s")
            await asyncio.sleep(0.05)
        await asyncio.sleep(5)
        rss_restarted = _rss_mb(proc.pid)
        restarted_split = memory_split(proc.pid, smaps_dir and smaps_dir / "restarted.smaps")
        return {
            "addins": addins,
            "cold_start_all_manifests_cached_s": round(cold, 2),
            "first_launch_applying_all_ms": round(first_launch * 1000, 1),
            "idle_rss_mb": round(rss / 2**20, 1),
            "idle_rss_mb_after_warm_restart": rss_restarted,
            "idle_memory_split": idle_split,
            "idle_memory_split_after_warm_restart": restarted_split,
            "idle_seconds": round(idle_window, 1),
            "idle_cpu_percent": round(max(0.0, idle_cpu) * 100, 3),
            "idle_wakeups_per_minute": (
                None if wakeups is None else round(wakeups * 60 / idle_window, 1)
            ),
            "status_via_socket_cli_client": summary(lat_status),
            "launch_via_socket_cli_client": summary(lat_cli_client),
            "launch_daemon_cpu_ms": round(launch_cpu_ms, 3),
            "launch_via_socket": summary(lat),
            "launch_cli_process": summary(cli_launch),
            "why_in_process": summary(why_lat),
            "why_cli_process": summary(cli_why),
            "admin_write_to_notified": summary(to_notified),
            "admin_write_to_manifest_cached": summary(to_cached),
            "machine": f"{platform.machine()} {os.cpu_count()} cpus, Python {platform.python_version()}",
        }
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)
        await server.aclose()
        broker.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--addins", type=int, default=50)
    ap.add_argument("--launches", type=int, default=300)
    ap.add_argument("--writes", type=int, default=20)
    ap.add_argument("--idle-seconds", type=float, default=60.0)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument(
        "--smaps-dir", type=Path, help="keep the idle daemon's /proc/PID/smaps files here"
    )
    a = ap.parse_args()
    results = []
    for _ in range(a.runs):
        load = os.getloadavg()[0]
        r = asyncio.run(run(a.addins, a.launches, a.writes, a.idle_seconds, a.smaps_dir))
        r["load_1min_before"] = round(load, 2)
        r["load_1min_after"] = round(os.getloadavg()[0], 2)
        results.append(r)
        print(json.dumps(r, indent=2), flush=True)
    if a.runs > 1:
        print(json.dumps({"median_of_runs": a.runs, **medians(results)}, indent=2))


def medians(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of every number over the runs (nested summaries included)."""
    out: dict[str, Any] = {}
    for key, first in results[0].items():
        if isinstance(first, dict):
            out[key] = medians([r[key] for r in results])
        elif isinstance(first, int | float) and not isinstance(first, bool):
            values = [r[key] for r in results if r[key] is not None]
            out[key] = statistics.median(values) if values else None
        else:
            out[key] = first
    return out


if __name__ == "__main__":
    main()

"""Helpdesk commands as whole processes: `addin-agent why`, `status`, `list` and `launch`
(through a running daemon's control socket), wall time per run, Python start included.

The cache is built through the agent's own code (`Agent.accept`, the manifest verification,
launches): ADDINS add-ins assigned to everyone, installed in Word, then catalog updates and
launches until the event log holds EVENTS rows. `launch` is timed against a real
`addin-agent run` daemon on that cache (no broker: it runs disconnected, its control socket
answers). Each command runs RUNS times after one warm-up run; the figures are p50 and p90 of
the wall time, and p50 of the process's CPU time (user + system).

    .venv/bin/python bench/bench_cli.py [--addins 200] [--events 10000] [--runs 30]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import resource
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from agent_helpers import addin_id, manifest  # noqa: E402

from addin_core.protocol import Assignment, CatalogEntry, Host, Mode, Source, Topic  # noqa: E402
from agent.config import AgentConfig  # noqa: E402
from agent.daemon import Agent  # noqa: E402
from agent.fetcher import verify  # noqa: E402

CLI = [sys.executable, "-m", "agent.cli"]
TENANT = "contoso"
HOSTS = (Host.WORD, Host.EXCEL, Host.POWERPOINT, Host.OUTLOOK)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(work: Path) -> Path:
    cfg = work / "agent.toml"
    cfg.write_text(
        f'tenant = "{TENANT}"\nuser_id = "ann"\nclient_id = "bench-pc"\ninsecure = true\n'
        # Nothing listens there: the daemon runs disconnected, its socket answers.
        f'broker_url = "mqtt://127.0.0.1:{_free_port()}"\n'
        f'cache_path = "cache.sqlite"\napplier = "folder"\napplier_dir = "wef"\n'
        f'control = "agent.sock"\nanti_entropy_interval = 0\nwatch_hosts = false\n'
    )
    return cfg


async def build_cache(work: Path, addins: int, events: int) -> dict[str, int]:
    """The cache a busy agent has: `addins` add-ins entitled and installed, `events` events."""
    cfg = AgentConfig(
        tenant=TENANT,
        user_id="ann",
        client_id="bench-pc",
        insecure=True,
        cache_path=str(work / "cache.sqlite"),
        applier="folder",
        applier_dir=str(work / "wef"),
        hosts=HOSTS,
    )
    agent = Agent(cfg)
    await agent.open()
    rev = 0

    async def publish(i: int, version: str) -> None:
        nonlocal rev
        name = f"Bench add-in {i:03d}"
        aid = addin_id(name)
        hosts = (HOSTS[i % 4].value,)
        xml = manifest(name, version, hosts)
        digest = hashlib.sha256(xml).hexdigest()
        rev += 1
        entry = CatalogEntry(
            revision=rev,
            committed_at=time.time(),
            addin_id=aid,
            name=name,
            source=Source.LOB,
            version=version,
            manifest_sha256=digest,
            manifest_url=f"/v1/manifests/{digest}",
            hosts=[Host(h) for h in hosts],
            permissions="ReadItem" if hosts == ("Outlook",) else "ReadDocument",
            enabled=True,
        )
        await agent.accept(Topic.catalog(TENANT, aid), entry)
        await agent._record_manifest(entry, verify(entry, xml))

    try:
        for i in range(addins):
            await publish(i, "1.0.0.0")
            rev += 1
            mode = Mode.FIXED if i % 2 else Mode.AVAILABLE
            await agent.accept(
                Topic.assign_everyone(TENANT, addin_id(f"Bench add-in {i:03d}")),
                Assignment(revision=rev, mode=mode),
            )
        for h in HOSTS:
            await agent.launch(h)
        n, minor = 0, 0
        # Updates and launches until the event log is full (bounded: 50 rounds at most).
        while minor < 50:
            minor += 1
            for i in range(addins):
                await publish(i, f"1.{minor}.0.0")
            for h in HOSTS:
                await agent.launch(h)
            with sqlite3.connect(work / "cache.sqlite") as c:
                n = c.execute("SELECT count(*) FROM events").fetchone()[0]
            if n >= events:
                break
    finally:
        await agent.stop()
    with sqlite3.connect(work / "cache.sqlite") as c:
        counts = {
            t: c.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
            for t in ("received", "entitlements", "installed", "events")
        }
    return counts


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def timed(
    env: dict[str, str], args: list[str], runs: int, argv: list[str] = CLI
) -> dict[str, float]:
    """`runs` runs of one command (after one untimed warm-up), in ms."""
    subprocess.run([*argv, *args], env=env, check=True, capture_output=True)
    ms, cpu = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run([*argv, *args], env=env, check=True, capture_output=True)
        ms.append((time.perf_counter() - t0) * 1000)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        # CPU time of the command's process: what it costs, less sensitive than the wall
        # time to other work sharing the cores.
        used = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        cpu.append(used * 1000)
    return {
        "p50_ms": round(pct(ms, 50), 1),
        "p90_ms": round(pct(ms, 90), 1),
        "min_ms": round(min(ms), 1),
        "mean_ms": round(statistics.fmean(ms), 1),
        "cpu_p50_ms": round(pct(cpu, 50), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--addins", type=int, default=200)
    ap.add_argument("--events", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--keep", action="store_true", help="Keep the work folder.")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-cli-"))
    cfg = write_config(work)
    counts = asyncio.run(build_cache(work, a.addins, a.events))
    env = {**os.environ, "ADDIN_AGENT_CONFIG": str(cfg), "COLUMNS": "120"}
    # An installed wheel has its bytecode compiled by pip; this checkout gets it on the warm-up
    # run, unless the shell sets PYTHONDONTWRITEBYTECODE (some CI images do), in which case
    # every run would compile the project's sources again (~50 ms) and measure that instead.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    name = "Bench add-in 007"
    results: dict[str, Any] = {}
    # The floor on this machine at this moment: an interpreter that imports nothing, then one
    # that imports what every command prints with (click, rich).
    py = [sys.executable, "-c"]
    results["python -c pass"] = timed(env, ["pass"], a.runs, py)
    results["python: import click, rich"] = timed(
        env, ["import click, rich.console, rich.table"], a.runs, py
    )
    results["why"] = timed(env, ["why", name], a.runs)
    results["why --json"] = timed(env, ["why", name, "--json"], a.runs)
    results["status"] = timed(env, ["status"], a.runs)
    results["list"] = timed(env, ["list"], a.runs)
    log = open(work / "daemon.log", "wb")
    daemon = subprocess.Popen([*CLI, "run"], env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while not (work / "agent.sock").exists():
            if time.monotonic() > deadline or daemon.poll() is not None:
                raise SystemExit(f"daemon did not open its socket; see {work / 'daemon.log'}")
            time.sleep(0.05)
        out = subprocess.run([*CLI, "launch", "Word", "--json"], env=env, capture_output=True)
        assert json.loads(out.stdout)["via"] == "daemon", out
        results["launch (daemon)"] = timed(env, ["launch", "Word"], a.runs)
    finally:
        daemon.terminate()
        daemon.wait(10)
        log.close()
    print(
        json.dumps(
            {
                "cache": counts,
                "runs": a.runs,
                "results": results,
                "machine": f"{platform.machine()} {os.cpu_count()} cpus, "
                f"Python {platform.python_version()}, load {os.getloadavg()[0]:.2f}",
            },
            indent=2,
        )
    )
    if not a.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"work folder: {work}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""What one unit of fleet traffic costs the server: the figures docs/scale.md sizes from.

Runs `addin-server serve` (one process, SQLite) against a private Mosquitto with USERS users
and one add-in assigned to everyone, then measures, one after the other:

* anti-entropy digests: N ``GET /v1/agents/{user}/digest`` (distinct users) from C clients;
* manifest downloads: N ``GET /v1/manifests/{sha256}`` from C clients;
* agent reports: N reports (distinct clients) published over MQTT, QoS 1, until the server has
  stored them all.

For each: operations per second, and the server process's CPU time per operation (user +
system, psutil), which is what bounds one server core whatever the client side costs.

    .venv/bin/python bench/bench_unit_costs.py [--users 10000] [--requests 5000] [--reports 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from addin_core.protocol import AgentReport, AppliedAddin, Host, Topic  # noqa: E402
from simulator.mosquitto import MosquittoBroker, free_port  # noqa: E402

MANIFEST = ROOT / "server_stub" / "store_catalog" / "WA200004567" / "1.0.0.0.xml"
ADDIN = "cff613f2-7421-4dfe-beb2-c81162b92abb"
TENANT = "contoso"


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return float(t.user + t.system)


async def _measure(
    server: psutil.Process, n: int, concurrency: int, one: Callable[[int], Awaitable[None]]
) -> dict[str, float]:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)

    async def worker() -> None:
        while not queue.empty():
            await one(queue.get_nowait())

    cpu0, t0 = _cpu(server), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall, cpu = time.perf_counter() - t0, _cpu(server) - cpu0
    return {
        "count": n,
        "per_second": round(n / wall, 1),
        "server_cpu_ms_each": round(1000 * cpu / n, 3),
    }


async def run(users: int, requests: int, reports: int, concurrency: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-units-"))
    broker = MosquittoBroker(tmp / "broker")
    broker.start()
    port, db = free_port(), tmp / "server.db"
    org = tmp / "org.yaml"
    org.write_text(
        json.dumps(
            {
                "tenant": TENANT,
                "users": [{"id": f"u{i:05d}"} for i in range(users)],
                "addins": [{"manifest": str(MANIFEST)}],
                "assignments": [{"addin": ADDIN, "target": "everyone", "mode": "fixed"}],
            }
        )
    )
    load = [sys.executable, "-m", "server_stub", "load", str(org), "--db", str(db)]
    await asyncio.to_thread(subprocess.run, load, check=True, capture_output=True)
    serve = [
        sys.executable, "-m", "server_stub", "serve", "--db", str(db), "--tenant", TENANT,
        "--broker", broker.url, "--listen", f"127.0.0.1:{port}", "--admin-token", "bench",
        "--agent-token", "agent", "--insecure",
    ]  # fmt: skip
    proc = await asyncio.to_thread(
        subprocess.Popen, serve, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    server = psutil.Process(proc.pid)
    sha = hashlib.sha256(MANIFEST.read_bytes()).hexdigest()
    out: dict[str, Any] = {"users": users, "concurrency": concurrency}
    try:
        headers = {"Authorization": "Bearer agent"}
        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=30, limits=limits
        ) as http:
            for _ in range(400):
                try:
                    if (await http.get("/healthz")).status_code == 200:
                        break
                except httpx.HTTPError:
                    await asyncio.sleep(0.05)

            async def digest(i: int) -> None:
                r = await http.get(f"/v1/agents/u{i % users:05d}/digest")
                r.raise_for_status()

            async def download(_: int) -> None:
                r = await http.get(f"/v1/manifests/{sha}")
                r.raise_for_status()

            print("digests ...", file=sys.stderr)
            out["digest"] = await _measure(server, requests, concurrency, digest)
            print("manifest downloads ...", file=sys.stderr)
            out["manifest"] = await _measure(server, requests, concurrency, download)

        print("reports ...", file=sys.stderr)
        applied = [AppliedAddin(addin_id=ADDIN, version="1.0.0.0", host=Host.WORD)]
        payloads = [
            (
                str(Topic.report(TENANT, f"pc{i:05d}")),
                AgentReport(
                    client_id=f"pc{i:05d}",
                    user_id=f"u{i % users:05d}",
                    revision=3,
                    reported_at=time.time(),
                    applied=applied,
                ).to_bytes(),
            )
            for i in range(reports)
        ]
        cpu0, t0 = _cpu(server), time.perf_counter()
        async with aiomqtt.Client("127.0.0.1", broker.port, identifier="bench-reporter") as c:
            for topic, body in payloads:
                await c.publish(topic, body, qos=1)
        deadline = time.monotonic() + 300
        stored = 0
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            while time.monotonic() < deadline:
                stored = conn.execute("SELECT count(*) FROM reports").fetchone()[0]
                if stored >= reports:
                    break
                await asyncio.sleep(0.05)
        wall, cpu = time.perf_counter() - t0, _cpu(server) - cpu0
        out["reports"] = {
            "count": reports,
            "stored": stored,
            "per_second": round(stored / wall, 1),
            "server_cpu_ms_each": round(1000 * cpu / max(stored, 1), 3),
        }
    finally:
        proc.terminate()
        proc.wait(10)
        broker.kill()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=10_000)
    ap.add_argument("--requests", type=int, default=5_000)
    ap.add_argument("--reports", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=16)
    a = ap.parse_args()
    result = asyncio.run(run(a.users, a.requests, a.reports, a.concurrency))
    result["machine"] = (
        f"{platform.machine()} {os.cpu_count()} cpus, Python {platform.python_version()}, "
        f"load {os.getloadavg()[0]:.2f}"
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

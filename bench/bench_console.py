"""How fast the console's pages load with 10,000 devices and 200 add-ins (target: 300 ms).

Builds an organisation of USERS users (one device each), 200 groups (nested, policy on) and
200 add-ins (20 assigned to everyone, the rest to a group each), records one report per
device through the server's own report intake (most devices applied what they are entitled
to, some only downloaded it, some failed, some silent for two days), then runs
`addin-server serve` as a real process against a private Mosquitto, signs in to the
console over HTTP and times each page (sequential requests, after one warm-up load that
starts the counting), the first server-sent event, and the recount itself in-process.

    .venv/bin/python bench/bench_console.py [--users 10000] [--rounds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from addin_core.protocol import AgentReport, AppliedAddin, Host  # noqa: E402
from simulator.mosquitto import MosquittoBroker, free_port  # noqa: E402
from simulator.orggen import make_manifest  # noqa: E402

ADDINS = 200
GROUPS = 200
EVERYONE = 20
TOKEN = "bench-admin-token"


def addin_id(k: int) -> str:
    return f"00000000-0000-4000-8000-{k:012d}"


def build_org(tmp: Path, users: int) -> Path:
    manifests = tmp / "manifests"
    manifests.mkdir()
    addins = []
    for k in range(ADDINS):
        path = manifests / f"a{k}.xml"
        path.write_bytes(
            make_manifest(addin_id(k), name=f"Add-in {k:03d}", version="1.0.0.0",
                          hosts=[Host.WORD, Host.EXCEL], permissions="ReadDocument")
        )  # fmt: skip
        addins.append({"manifest": str(path)})
    groups = [
        {
            "id": f"g{g:03d}",
            "members": [f"u{i:05d}" for i in range(g, users, GROUPS)],
            "parents": [f"g{g // 10:03d}"] if g >= 10 else [],
        }
        for g in range(GROUPS)
    ]
    assignments = [
        {"addin": addin_id(k), "target": "everyone" if k < EVERYONE else f"group:g{k:03d}",
         "mode": "fixed" if k % 7 else "available"}
        for k in range(ADDINS)
    ]  # fmt: skip
    doc = {
        "tenant": "contoso",
        "policy": {"nested_groups": True},
        "users": [{"id": f"u{i:05d}", "name": f"User {i}"} for i in range(users)],
        "groups": groups,
        "addins": addins,
        "assignments": assignments,
    }
    org = tmp / "org.json"
    org.write_text(json.dumps(doc))
    return org


async def record_reports(db: Path, users: int) -> None:
    """One report per device through `Service.record_reports` (the publisher's intake)."""
    from server_stub.cli.runner import open_service

    service = await open_service(db, "contoso")
    try:
        revision = await service.revision()
        now = time.time()
        for old in (False, True):
            service.clock = (lambda: now - 2 * 86400) if old else time.time
            batch = []
            for i in range(users):
                if (i % 50 == 0) != old:  # 2% silent for two days
                    continue
                mine = [*range(EVERYONE), i % GROUPS]
                applied, cached, errors = [], [], []
                for k in mine:
                    if k % 7 == 0:
                        continue  # available: not installed
                    if i % 20 == 1:
                        cached.append(AppliedAddin(addin_id=addin_id(k), version="1.0.0.0", host=Host.WORD))
                    else:
                        applied.append(AppliedAddin(addin_id=addin_id(k), version="1.0.0.0", host=Host.WORD))
                if i % 100 == 3:
                    errors.append(f"Word Add-in {mine[-1]:03d} 1.0.0.0: the add-in folder is not writable")
                batch.append(AgentReport(client_id=f"c{i:05d}", user_id=f"u{i:05d}", revision=revision,
                                         reported_at=now, applied=applied, errors=errors, cached=cached))  # fmt: skip
                if len(batch) == 1000:
                    await service.record_reports(batch)
                    batch = []
            await service.record_reports(batch)
    finally:
        await service.close()


async def recount(db: Path) -> tuple[float, float]:
    """Seconds of the first full count, and of a recount after one report changed."""
    from server_stub.cli.runner import open_service
    from server_stub.console.fleet import FleetView

    service = await open_service(db, "contoso")
    try:
        fleet = FleetView(service.database, service.tenant)
        t0 = time.perf_counter()
        await fleet.refresh()
        cold = time.perf_counter() - t0
        await service.record_reports([AgentReport(client_id="c00007", user_id="u00007",
                                                  revision=await service.revision(),
                                                  reported_at=time.time(), applied=[])])  # fmt: skip
        t0 = time.perf_counter()
        await fleet.refresh()
        return cold, time.perf_counter() - t0
    finally:
        await service.close()


async def sign_in(web: httpx.AsyncClient) -> None:
    form = await web.get("/console/login")
    nonce = re.search(r'name="nonce" value="([^"]+)"', form.text)
    assert nonce is not None
    r = await web.post("/console/login", data={"token": TOKEN, "nonce": nonce[1]})
    assert r.status_code == 303, r.text


async def time_pages(url: str, rounds: int) -> dict[str, dict[str, float]]:
    pages = {
        "add-ins (200 rows, live counts)": "/console/addins",
        "one add-in (everyone: 10,000 devices)": f"/console/addins/{addin_id(1)}",
        "one add-in, failed devices": f"/console/addins/{addin_id(1)}?state=failed",
        "one add-in, page 20 of devices": f"/console/addins/{addin_id(1)}?page=20",
        "users (first 200)": "/console/users",
        "one user + explain": f"/console/users/u00042?addin={addin_id(1)}",
        "one device": "/console/devices/c00042",
        "directory (200 groups, nested)": "/console/directory",
        "audit log": "/console/audit",
    }
    out: dict[str, dict[str, float]] = {}
    async with httpx.AsyncClient(base_url=url, timeout=60) as web:
        await sign_in(web)
        t0 = time.perf_counter()
        r = await web.get("/console/addins")  # starts the counting
        assert r.status_code == 200
        out["first page load after start"] = {
            "median_ms": (time.perf_counter() - t0) * 1000, "bytes": len(r.content),
        }  # fmt: skip
        t0 = time.perf_counter()
        async with web.stream("GET", "/console/events") as stream:
            async for line in stream.aiter_lines():
                if line.startswith("data:") and '"counts":{}' not in line:
                    out["first counts after start (event)"] = {
                        "median_ms": (time.perf_counter() - t0) * 1000, "bytes": len(line),
                    }  # fmt: skip
                    break
        for label, path in pages.items():
            samples = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                r = await web.get(path)
                samples.append((time.perf_counter() - t0) * 1000)
                assert r.status_code == 200, (path, r.status_code, r.text[:300])
            samples.sort()
            out[label] = {
                "median_ms": statistics.median(samples),
                "p95_ms": samples[min(len(samples) - 1, int(len(samples) * 0.95))],
                "max_ms": samples[-1],
                "bytes": len(r.content),
            }
        t0 = time.perf_counter()
        async with web.stream("GET", "/console/events") as stream:
            async for line in stream.aiter_lines():
                if line.startswith("data:"):
                    out["server-sent event (counts known)"] = {
                        "median_ms": (time.perf_counter() - t0) * 1000, "bytes": len(line),
                    }  # fmt: skip
                    break
    return out


def main(users: int, rounds: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-console-"))
    db = tmp / "server.db"
    t0 = time.perf_counter()
    org = build_org(tmp, users)
    subprocess.run([sys.executable, "-m", "server_stub", "load", str(org), "--db", str(db)],
                   check=True, capture_output=True, cwd=ROOT,
                   env={**os.environ, "ADDIN_SERVER_PUBLISH_WAIT": "0"})  # fmt: skip
    asyncio.run(record_reports(db, users))
    print(f"setup: {users} users/devices, {ADDINS} add-ins, {GROUPS} groups in {time.perf_counter() - t0:.1f} s")
    cold, warm = asyncio.run(recount(db))
    broker = MosquittoBroker(tmp / "broker")
    broker.start()
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "server_stub", "serve", "--db", str(db), "--tenant", "contoso",
         "--broker", broker.url, "--insecure", "--listen", f"127.0.0.1:{port}",
         "--admin-token", TOKEN],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(tmp / "server.log", "wb"),
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        results = asyncio.run(time_pages(url, rounds))
    finally:
        server.terminate()
        server.wait(30)
        broker.stop()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"recount in-process: first {cold * 1000:.0f} ms, after one report {warm * 1000:.0f} ms")
    print(f"{'page':45} {'median':>8} {'p95':>8} {'max':>8} {'bytes':>9}")
    for label, r in results.items():
        cells = [f"{r[k]:7.1f}" if k in r else "       -" for k in ("median_ms", "p95_ms", "max_ms")]
        print(f"{label:45} {cells[0]:>8} {cells[1]:>8} {cells[2]:>8} {int(r.get('bytes', 0)):>9}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=20)
    a = parser.parse_args()
    main(a.users, a.rounds)

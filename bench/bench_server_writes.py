"""How many admin writes per second the server commits, and commits *and* publishes.

Runs `addin-server serve` as a real process against a private Mosquitto, sends N admin
writes over HTTP from C concurrent clients (assign / unassign of one add-in to distinct
users: one transaction, one outbox row, one retained publish each), and measures:

* committed/s: HTTP 200 responses (each is a committed transaction) per second;
* published/s: writes per second until a plain subscriber has received the last one
  (commit + QoS 1 publish + PUBACK + delivery).

    .venv/bin/python bench/bench_server_writes.py [--writes 2000] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiomqtt
import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simulator.mosquitto import MosquittoBroker, free_port  # noqa: E402

MANIFEST = ROOT / "server_stub" / "store_catalog" / "WA200004567" / "1.0.0.0.xml"
ADDIN = "cff613f2-7421-4dfe-beb2-c81162b92abb"
H = {"Authorization": "Bearer bench"}


async def run(writes: int, concurrency: int, users: int, db_url: str | None) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-server-"))
    broker = MosquittoBroker(tmp / "broker")
    broker.start()
    port = free_port()
    # --db postgresql://...: an empty database the bench fills (the same load and writes).
    db: Path | str = db_url or tmp / "server.db"
    org = tmp / "org.yaml"
    org.write_text(
        json.dumps(
            {
                "tenant": "contoso",
                "users": [{"id": f"u{i:05d}"} for i in range(users)],
                "addins": [{"manifest": str(MANIFEST)}],
            }
        )
    )
    await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "server_stub", "load", str(org), "--db", str(db)],
        check=True,
        capture_output=True,
    )
    proc = await asyncio.to_thread(
        subprocess.Popen,
        [
            sys.executable,
            "-m",
            "server_stub",
            "serve",
            "--db",
            str(db),
            "--tenant",
            "contoso",
            "--broker",
            broker.url,
            "--listen",
            f"127.0.0.1:{port}",
            "--admin-token",
            "bench",
            "--agent-token",
            "agent",
            "--insecure",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url, headers=H, timeout=30) as http:
            for _ in range(400):
                try:
                    if (await http.get("/healthz")).status_code == 200:
                        break
                except httpx.HTTPError:
                    await asyncio.sleep(0.05)
            last_topic = f"addins/v1/contoso/assign/user/u{(writes - 1) % users:05d}/{ADDIN}"
            seen = asyncio.Event()
            target_rev = 0

            async def watch(ready: asyncio.Event) -> None:
                async with aiomqtt.Client("127.0.0.1", broker.port) as c:
                    await c.subscribe("addins/v1/contoso/assign/user/+/+", qos=1)
                    ready.set()
                    async for m in c.messages:
                        if str(m.topic) == last_topic and not m.retain:
                            rev = json.loads(bytes(m.payload))["revision"]  # type: ignore[arg-type]
                            if target_rev and rev >= target_rev:
                                seen.set()
                                return

            ready = asyncio.Event()
            watcher = asyncio.create_task(watch(ready))
            await ready.wait()
            queue: asyncio.Queue[int] = asyncio.Queue()
            for i in range(writes):
                queue.put_nowait(i)
            revs: list[int] = []

            async def worker() -> None:
                while not queue.empty():
                    i = queue.get_nowait()
                    body = {"target": "user", "target_id": f"u{i % users:05d}", "mode": "fixed"}
                    r = await http.post(f"/v1/addins/{ADDIN}/assign", json=body)
                    r.raise_for_status()
                    revs.append(r.json()["revision"])

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            t_commit = time.perf_counter() - t0
            # The last write to the last user's topic carries the highest revision for it.
            r = await http.post(
                f"/v1/addins/{ADDIN}/assign",
                json={"target": "user", "target_id": last_topic.split("/")[-2], "mode": "optional"},
            )
            target_rev = r.json()["revision"]
            await asyncio.wait_for(seen.wait(), 120)
            t_pub = time.perf_counter() - t0
            watcher.cancel()
            return {
                "writes": writes + 1,
                "concurrency": concurrency,
                "commit_seconds": round(t_commit, 3),
                "committed_per_s": round(writes / t_commit, 1),
                "published_seconds": round(t_pub, 3),
                "published_per_s": round((writes + 1) / t_pub, 1),
            }
    finally:
        proc.terminate()
        proc.wait(10)
        broker.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--writes", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--db", default=None, help="an empty postgresql:// database instead of SQLite")
    a = ap.parse_args()
    result = asyncio.run(run(a.writes, a.concurrency, a.users, a.db))
    result["backend"] = "postgresql" if a.db else "sqlite"
    result["machine"] = (
        f"{platform.machine()} {os.cpu_count()} cpus, Python {platform.python_version()}"
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

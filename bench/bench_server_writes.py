"""The server under bulk admin work: writes per second, `status`/`explain` latency, and
admin writes during a burst of agent reports.

Runs `addin-server serve` as a real process against a private Mosquitto (a fresh server,
broker and database per run) and measures, each as the median of ``--runs`` runs:

* ``writes``: N admin writes over HTTP from C concurrent clients (assign of one add-in to
  distinct users: one revision, one audit line, one outbox row and one retained QoS 1
  publish each). The clients are aiohttp connections (keep-alive): httpx cost ~2.2 ms of
  CPU per request on this bench's 2-CPU machine, more than the server's write, so the
  figure was the load generator's. With ``--replicas N`` (PostgreSQL) N servers share the
  database and the clients are spread over them. committed/s counts HTTP 200s (each reply is sent once its write is
  durable); published/s stops the clock when a plain subscriber has received the last
  write (commit + publish + PUBACK + delivery). Also the server's CPU time per write (a
  figure the machine's other load does not inflate as much as wall time).
* ``reads``: ``GET /v1/status`` (every add-in), ``/v1/status?addin=`` and ``/v1/explain``
  latency, p50/p99, with 10,000 users whose 10,000 devices have reported (over MQTT,
  stored by the server) and 200 add-ins (each assigned to one group of 500 users); then
  the first ``status`` after 500 new devices' reports were stored and the first after an
  admin write (3 of each: median, max and the server's CPU time).
* ``burst``: admin write latency (a paced 100 writes/s from 8 clients) while the broker
  restarts and 10,000 agent reports arrive at once (the fleet reconnecting), against the
  same load on a quiet server just before: p50/p99 of each, and how long the reports
  took to be stored.

    .venv/bin/python bench/bench_server_writes.py [--part writes,reads,burst] [--runs 3]
        [--db postgresql://HOST/EMPTY_DB]   # PostgreSQL instead of SQLite
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import httpx
import paho.mqtt.client as paho

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from addin_core.protocol import Host  # noqa: E402
from server_stub.db import Database  # noqa: E402
from simulator.mosquitto import MosquittoBroker, free_port  # noqa: E402
from simulator.orggen import make_manifest  # noqa: E402

MANIFEST = ROOT / "server_stub" / "store_catalog" / "WA200004567" / "1.0.0.0.xml"
ADDIN = "cff613f2-7421-4dfe-beb2-c81162b92abb"
TENANT = "contoso"
H = {"Authorization": "Bearer bench"}
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def _ms(x: float) -> float:
    return round(x * 1000, 1)


def _child(pid: int) -> int:
    return int(Path(f"/proc/{pid}/task/{pid}/children").read_text().split()[0])


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


@dataclass
class Server:
    url: str
    pid: int
    broker: MosquittoBroker
    db: Path | str
    replicas: list[tuple[str, int]]
    """(url, pid) of every server on the database, this one first."""


async def _reset_pg(url: str) -> None:
    """An empty schema: each run starts from the same state."""
    import psycopg

    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as c:
        await c.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")


@asynccontextmanager
async def server(
    org: dict[str, Any], db_url: str | None, replicas: int = 1
) -> AsyncIterator[Server]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-server-"))
    broker = MosquittoBroker(tmp / "broker", max_queued_messages=100_000)
    broker.start()
    db: Path | str = db_url or tmp / "server.db"
    if db_url:
        await _reset_pg(db_url)
    (tmp / "org.json").write_text(json.dumps(org))
    await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "server_stub", "load", str(tmp / "org.json"), "--db", str(db)],
        check=True,
        capture_output=True,
    )
    wrap = os.environ.get("BENCH_SERVER_WRAP", "").split()  # e.g. py-spy record -o x.svg --
    procs: list[tuple[subprocess.Popen[bytes], int]] = []
    try:
        for n in range(replicas):
            port = free_port()
            proc = await asyncio.to_thread(
                subprocess.Popen,
                [*(wrap if n == 0 else []), sys.executable, "-m", "server_stub", "serve",
                 "--db", str(db), "--tenant", TENANT, "--broker", broker.url,
                 "--listen", f"127.0.0.1:{port}", "--admin-token", "bench",
                 "--agent-token", "agent", "--insecure"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            procs.append((proc, port))
            await _wait_ready(f"http://127.0.0.1:{port}")
        pid = procs[0][0].pid
        if wrap:  # the server is py-spy's child
            pid = _child(pid)
        pids = [pid] + [p.pid for p, _ in procs[1:]]
        urls = [f"http://127.0.0.1:{port}" for _, port in procs]
        yield Server(urls[0], pid, broker, db, list(zip(urls, pids, strict=True)))
    finally:
        for n, (proc, _) in enumerate(procs):
            if wrap and n == 0:
                os.kill(_child(proc.pid), signal.SIGTERM)  # py-spy writes its profile then
                proc.wait(60)
            else:
                proc.terminate()
                proc.wait(10)
        broker.kill()


async def _wait_ready(url: str) -> None:
    async with httpx.AsyncClient(base_url=url, headers=H, timeout=30) as http:
        for _ in range(600):
            try:
                if (await http.get("/readyz")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError(f"the server at {url} did not become ready in 30 s")


def _small_org(users: int) -> dict[str, Any]:
    return {
        "tenant": TENANT,
        "users": [{"id": f"u{i:05d}"} for i in range(users)],
        "addins": [{"manifest": str(MANIFEST)}],
    }


# -- writes per second --------------------------------------------------------------------


async def run_writes(
    writes: int, concurrency: int, users: int, db_url: str | None, replicas: int = 1
) -> dict[str, Any]:
    async with server(_small_org(users), db_url, replicas) as srv:
        last_topic = f"addins/v1/{TENANT}/assign/user/u{(writes - 1) % users:05d}/{ADDIN}"
        seen = asyncio.Event()
        target_rev = 0

        async def watch(ready: asyncio.Event) -> None:
            async with aiomqtt.Client("127.0.0.1", srv.broker.port) as c:
                await c.subscribe(f"addins/v1/{TENANT}/assign/user/+/+", qos=1)
                ready.set()
                async for m in c.messages:
                    if str(m.topic) == last_topic and not m.retain:
                        rev = json.loads(bytes(m.payload))["revision"]
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
        lat: list[float] = []
        sessions = [
            aiohttp.ClientSession(url, headers=H, connector=aiohttp.TCPConnector(limit=0))
            for url, _ in srv.replicas
        ]

        async def worker(http: aiohttp.ClientSession) -> None:
            # One keep-alive connection per worker, as 16 admin tools would hold.
            while not queue.empty():
                i = queue.get_nowait()
                body = {"target": "user", "target_id": f"u{i % users:05d}", "mode": "fixed"}
                t = time.perf_counter()
                async with http.post(f"/v1/addins/{ADDIN}/assign", json=body) as r:
                    reply = await r.json()
                    lat.append(time.perf_counter() - t)
                    if r.status != 200:
                        raise RuntimeError(f"write refused: {r.status} {reply}")
                revs.append(reply["revision"])

        try:
            pids = [pid for _, pid in srv.replicas]
            cpu0 = [_cpu_seconds(p) for p in pids]
            own0 = time.process_time()
            t0 = time.perf_counter()
            await asyncio.gather(
                *(worker(sessions[n % len(sessions)]) for n in range(concurrency))
            )
            t_commit = time.perf_counter() - t0
            # The last write to the last user's topic carries the highest revision for it.
            async with sessions[0].post(
                f"/v1/addins/{ADDIN}/assign",
                json={"target": "user", "target_id": last_topic.split("/")[-2], "mode": "optional"},
            ) as r:
                target_rev = (await r.json())["revision"]
            await asyncio.wait_for(seen.wait(), 120)
            t_pub = time.perf_counter() - t0
            cpu = sum(_cpu_seconds(p) - c for p, c in zip(pids, cpu0, strict=True))
            own = time.process_time() - own0
        finally:
            watcher.cancel()
            for http in sessions:
                await http.close()
        assert len(set(revs)) == writes, "two replies carried the same revision"
        return {
            "writes": writes + 1,
            "replicas": replicas,
            "commit_seconds": round(t_commit, 3),
            "committed_per_s": round(writes / t_commit, 1),
            "published_seconds": round(t_pub, 3),
            "published_per_s": round((writes + 1) / t_pub, 1),
            "write_p50_ms": _ms(_pct(lat, 0.5)),
            "write_p99_ms": _ms(_pct(lat, 0.99)),
            "server_cpu_ms_per_write": round(cpu * 1000 / (writes + 1), 3),
            # The load generator and the subscriber (this process), for the CPU budget.
            "client_cpu_ms_per_write": round(own * 1000 / (writes + 1), 3),
            "load": _load(),
        }


# -- status and explain with 10,000 devices and 200 add-ins -----------------------------------

GROUP_SIZE = 500


def _big_org(users: int, addins: int, tmp: Path) -> tuple[dict[str, Any], list[str]]:
    ngroups = max(1, users // GROUP_SIZE)
    ids = [f"00000000-0000-4000-8000-{i:012d}" for i in range(addins)]
    docs = []
    for i, a in enumerate(ids):
        xml = make_manifest(a, name=f"Bench add-in {i}", version="1.0.0.0",
                            hosts=[Host.WORD, Host.EXCEL], permissions="ReadDocument")  # fmt: skip
        path = tmp / f"{i}.xml"
        path.write_bytes(xml)
        docs.append({"manifest": str(path)})
    groups = [
        {"id": f"g{g:03d}", "members": [f"u{i:05d}" for i in range(g, users, ngroups)]}
        for g in range(ngroups)
    ]
    assignments = [
        {"addin": a, "target": f"group:g{i % ngroups:03d}", "mode": "fixed"}
        for i, a in enumerate(ids)
    ]
    org = {"tenant": TENANT, "users": [{"id": f"u{i:05d}"} for i in range(users)],
           "groups": groups, "addins": docs, "assignments": assignments}  # fmt: skip
    return org, ids


def _reports(
    users: int, ids: list[str], revision: int, of: range | None = None, prefix: str = "dev"
) -> list[tuple[str, bytes]]:
    """One device per user (of the users `of`, default all), reporting the add-ins of its
    group applied."""
    ngroups = max(1, users // GROUP_SIZE)
    out = []
    now = time.time()
    for u in of if of is not None else range(users):
        mine = [a for i, a in enumerate(ids) if i % ngroups == u % ngroups]
        client = f"{prefix}{u:05d}"
        body = {
            "client_id": client,
            "user_id": f"u{u:05d}",
            "revision": revision,
            "reported_at": now,
            "applied": [{"addin_id": a, "version": "1.0.0.0", "host": "Word"} for a in mine],
        }
        out.append((f"addins/v1/{TENANT}/report/{client}", json.dumps(body).encode()))
    return out


def _publish_burst(port: int, msgs: list[tuple[str, bytes]], connections: int = 8) -> float:
    """Publish `msgs` (QoS 1) from `connections` paho clients at once; seconds taken to have
    every PUBACK."""

    def one(part: list[tuple[str, bytes]], i: int) -> None:
        c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"bench-burst-{i}")
        c.max_inflight_messages_set(1000)
        c.max_queued_messages_set(0)
        c.connect("127.0.0.1", port)
        c.loop_start()
        infos = [c.publish(t, p, qos=1) for t, p in part]
        for info in infos:
            info.wait_for_publish(60)
        c.loop_stop()
        c.disconnect()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(msgs[i::connections], i))
               for i in range(connections)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


async def _reports_stored(db: Path | str) -> int:
    database = await Database.open(db, pool_size=1)
    try:
        return int((await database.rows("SELECT count(*) FROM reports"))[0][0])
    finally:
        await database.close()


async def _wait_stored(db: Path | str, n: int, timeout: float = 300) -> float:
    t0 = time.perf_counter()
    while await _reports_stored(db) < n:
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError(f"reports not stored within {timeout}s")
        await asyncio.sleep(0.1)
    return time.perf_counter() - t0


async def run_reads(users: int, addins: int, n: int, db_url: str | None) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-reads-"))
    org, ids = _big_org(users, addins, tmp)
    async with server(org, db_url) as srv:
        async with httpx.AsyncClient(base_url=srv.url, headers=H, timeout=60) as http:
            revision = (await http.get("/v1/status?addin=" + ids[0])).json()["revision"]
            msgs = _reports(users, ids, revision)
            await asyncio.to_thread(_publish_burst, srv.broker.port, msgs)
            await _wait_stored(srv.db, users)
            out: dict[str, Any] = {"users": users, "devices_reported": users, "addins": addins}
            probes: dict[str, Callable[[int], str]] = {
                "status_all": lambda i: "/v1/status",
                "status_one": lambda i: f"/v1/status?addin={ids[i % addins]}",
                "explain": lambda i: f"/v1/explain?user=u{(i * 37) % users:05d}"
                f"&addin={ids[(i * 37) % users % (users // GROUP_SIZE or 1)]}",
            }
            for name, path in probes.items():
                lat = []
                for i in range(n):
                    t = time.perf_counter()
                    r = await http.get(path(i))
                    lat.append(time.perf_counter() - t)
                    r.raise_for_status()
                # The first call after the reports changed reads and parses all of them.
                out[f"{name}_first_ms"] = _ms(lat[0])
                out[f"{name}_p50_ms"] = _ms(_pct(lat, 0.5))
                out[f"{name}_p99_ms"] = _ms(_pct(lat, 0.99))
            # The calls a fleet that keeps reporting and admins who keep working make:
            # the first `status` after a batch of new reports was stored, and the first
            # after an admin write (a new revision). Each AFTER_CYCLES times.
            after_reports: list[tuple[float, float]] = []
            stored = users
            for c in range(AFTER_CYCLES):
                batch = _reports(users, ids, revision, range(AFTER_BATCH), prefix=f"d{c}x")
                await asyncio.to_thread(_publish_burst, srv.broker.port, batch)
                stored += len(batch)
                await _wait_stored(srv.db, stored)
                after_reports.append(await _timed_get(http, srv.pid, "/v1/status"))
            after_write: list[tuple[float, float]] = []
            for c in range(AFTER_CYCLES):
                body = {"target": "user", "target_id": f"u{c:05d}", "mode": "available"}
                (await http.post(f"/v1/addins/{ids[-1]}/assign", json=body)).raise_for_status()
                after_write.append(await _timed_get(http, srv.pid, "/v1/status"))
            for name, got in (("after_reports", after_reports), ("after_write", after_write)):
                out[f"status_{name}_ms"] = _ms(statistics.median(t for t, _ in got))
                out[f"status_{name}_max_ms"] = _ms(max(t for t, _ in got))
                out[f"status_{name}_cpu_ms"] = _ms(statistics.median(c for _, c in got))
            out["load"] = _load()
            return out


AFTER_CYCLES = 3
AFTER_BATCH = 500
"""New devices reporting before each "first status after new reports" call."""


async def _timed_get(http: httpx.AsyncClient, pid: int, path: str) -> tuple[float, float]:
    """(seconds, server CPU seconds) of one GET."""
    cpu, t = _cpu_seconds(pid), time.perf_counter()
    r = await http.get(path)
    wall = time.perf_counter() - t
    r.raise_for_status()
    return wall, _cpu_seconds(pid) - cpu


# -- admin writes during a burst of reports ---------------------------------------------------


async def _paced_writes(
    http: httpx.AsyncClient, users: int, rate: float, stop: asyncio.Event, clients: int = 8
) -> list[float]:
    """Writes at `rate` per second (each sent on schedule by one of `clients` workers) until
    `stop`; the latency of each."""
    lat: list[float] = []
    t0 = time.perf_counter()
    sem = asyncio.Semaphore(clients)
    tasks: list[asyncio.Task[None]] = []

    async def one(i: int) -> None:
        async with sem:
            body = {"target": "user", "target_id": f"u{i % users:05d}", "mode": "fixed"}
            t = time.perf_counter()
            r = await http.post(f"/v1/addins/{ADDIN}/assign", json=body)
            lat.append(time.perf_counter() - t)
            r.raise_for_status()

    i = 0
    while not stop.is_set():
        tasks.append(asyncio.create_task(one(i)))
        i += 1
        await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
    await asyncio.gather(*tasks)
    return lat


class _RetainedWatch:
    """Every retained topic the broker hands a subscriber on ``addins/v1/TENANT/#``: with
    `expect`, the moment each of those topics has been delivered (the server's restore after
    a broker restart); at the end, the revision each topic holds. On a paho thread of its
    own: the bench's event loop times the writes and must not read 10,000 messages."""

    def __init__(self, port: int, expect: set[str] | None = None) -> None:
        self.left = set(expect or ())
        self.revisions: dict[str, int] = {}
        self.all_seen = threading.Event()
        self.t_all = 0.0
        self._lock = threading.Lock()
        self._c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"bench-watch-{port}-{id(self)}")
        self._c.on_message = self._on_message
        self._c.on_connect = lambda c, *_: c.subscribe(f"addins/v1/{TENANT}/#", qos=1)
        self._port = port

    def _on_message(self, _c: Any, _u: Any, m: Any) -> None:
        with self._lock:
            try:
                self.revisions[m.topic] = max(self.revisions.get(m.topic, -1),
                                              int(json.loads(m.payload)["revision"]))  # fmt: skip
            except (ValueError, KeyError, TypeError):
                pass
            if self.left:
                self.left.discard(m.topic)
                if not self.left:
                    self.t_all = time.perf_counter()
                    self.all_seen.set()

    def start(self) -> None:
        for _ in range(100):  # the broker may still be starting
            try:
                self._c.connect("127.0.0.1", self._port)
                break
            except OSError:
                time.sleep(0.1)
        self._c.loop_start()

    def stop(self) -> None:
        self._c.loop_stop()
        self._c.disconnect()


def _watch_restore(port: int, topics: set[str]) -> float:
    """When (``time.perf_counter``, one clock for every process) a subscriber has been
    given every one of `topics` again after a broker restart."""
    watch = _RetainedWatch(port, topics)
    watch.start()
    try:
        if not watch.all_seen.wait(120):
            raise TimeoutError(f"{len(watch.left)} topics never restored")
        return watch.t_all
    finally:
        watch.stop()


async def _retained_in_db(db: Path | str) -> dict[str, int]:
    database = await Database.open(db, pool_size=1)
    try:
        return {str(t): int(r) for t, r in await database.rows("SELECT topic, revision FROM retained")}
    finally:
        await database.close()


async def _broker_holds(port: int, want: dict[str, int], timeout: float = 60) -> list[str]:
    """The topics of `want` whose retained revision on the broker is below the database's,
    after at most `timeout` seconds of waiting for the last publishes."""
    watch = _RetainedWatch(port)
    watch.start()
    try:
        deadline = time.perf_counter() + timeout
        while True:
            await asyncio.sleep(0.5)
            with watch._lock:
                missing = [t for t, r in want.items() if watch.revisions.get(t, -1) < r]
            if not missing or time.perf_counter() > deadline:
                return missing
    finally:
        watch.stop()


async def run_burst(users: int, reports: int, rate: float, quiet: float, db_url: str | None) -> dict[str, Any]:
    # The fleet publishes, and the restore is watched, from processes of their own: their
    # paho threads in this one took the GIL from the event loop that times the admin writes
    # (writes the server had answered within milliseconds measured 600 ms here).
    fleet = multiprocessing.get_context("spawn").Pool(2)
    try:
        # One device per user: the reports claim users the server knows.
        async with server(_small_org(max(users, reports)), db_url) as srv:
            async with httpx.AsyncClient(base_url=srv.url, headers=H, timeout=60) as http:
                msgs = _reports(reports, [ADDIN], 1)
                stop = asyncio.Event()
                writer = asyncio.create_task(_paced_writes(http, users, rate, stop))
                await asyncio.sleep(quiet)
                stop.set()
                quiet_lat = await writer
                # The broker restarts (its fleet reconnects and reports at once).
                before = await _retained_in_db(srv.db)
                cpu0 = _cpu_seconds(srv.pid)
                await asyncio.to_thread(srv.broker.restart, hard=True)
                t_up = time.perf_counter()
                restore = fleet.apply_async(_watch_restore, (srv.broker.port, set(before)))
                for _ in range(600):
                    if (await http.get("/readyz")).status_code == 200:
                        break
                    await asyncio.sleep(0.05)
                stop = asyncio.Event()
                writer = asyncio.create_task(_paced_writes(http, users, rate, stop))
                t0 = time.perf_counter()
                await asyncio.to_thread(fleet.apply, _publish_burst, (srv.broker.port, msgs))
                await _wait_stored(srv.db, reports)
                ingest = time.perf_counter() - t0
                stop.set()
                burst_lat = await writer
                t_restored = await asyncio.to_thread(restore.get, 120)
                cpu = _cpu_seconds(srv.pid) - cpu0
                # Every retained topic restored, every admin write published: the broker holds
                # each topic at the database's revision.
                missing = await _broker_holds(srv.broker.port, await _retained_in_db(srv.db))
                assert not missing, f"{len(missing)} topics not restored/published: {missing[:3]}"
                return {
                    "reports": reports,
                    "write_rate_per_s": rate,
                    "quiet_writes": len(quiet_lat),
                    "quiet_p50_ms": _ms(_pct(quiet_lat, 0.5)),
                    "quiet_p99_ms": _ms(_pct(quiet_lat, 0.99)),
                    "burst_writes": len(burst_lat),
                    "burst_p50_ms": _ms(_pct(burst_lat, 0.5)),
                    "burst_p99_ms": _ms(_pct(burst_lat, 0.99)),
                    "p99_delay_ms": _ms(_pct(burst_lat, 0.99) - _pct(quiet_lat, 0.99)),
                    "reports_stored_s": round(ingest, 2),
                    "retained_topics": len(before),
                    "restore_s": round(t_restored - t_up, 2),
                    # The restore, the reports and the writes of the burst phase, per report.
                    "server_cpu_ms_per_report": round(cpu * 1000 / reports, 3),
                    "load": _load(),
                }
    finally:
        fleet.terminate()


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per numeric field: the median of the runs, with [min, max]."""
    out: dict[str, Any] = {}
    for k, v in runs[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            vals = [r[k] for r in runs]
            out[k] = statistics.median(vals)
            if len(set(vals)) > 1:
                out[k + "_range"] = [min(vals), max(vals)]
        else:
            out[k] = [r[k] for r in runs] if k == "load" else v
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", default="writes", help="writes,reads,burst (comma separated)")
    ap.add_argument("--runs", type=int, default=1, help="runs of each part; the median is shown")
    ap.add_argument("--writes", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--users", type=int, default=1000, help="users of the writes and burst parts")
    ap.add_argument("--devices", type=int, default=10_000, help="reports (reads and burst parts)")
    ap.add_argument("--addins", type=int, default=200, help="add-ins of the reads part")
    ap.add_argument("--rate", type=float, default=100.0, help="admin writes/s of the burst part")
    ap.add_argument("--db", default=None, help="an empty postgresql:// database instead of SQLite")
    ap.add_argument(
        "--replicas", type=int, default=1, help="servers sharing the --db (writes part)"
    )
    a = ap.parse_args()
    if a.replicas > 1 and not a.db:
        raise SystemExit("--replicas needs --db postgresql://... (replicas share PostgreSQL)")
    result: dict[str, Any] = {"backend": "postgresql" if a.db else "sqlite"}
    for part in a.part.split(","):
        runs = []
        for _ in range(a.runs):
            if part == "writes":
                runs.append(asyncio.run(run_writes(a.writes, a.concurrency, a.users, a.db, a.replicas)))
            elif part == "reads":
                runs.append(asyncio.run(run_reads(a.devices, a.addins, 30, a.db)))
            elif part == "burst":
                runs.append(asyncio.run(run_burst(a.users, a.devices, a.rate, 5.0, a.db)))
            else:
                raise SystemExit(f"unknown part {part!r}: use writes, reads or burst")
        result[part] = _median(runs) if len(runs) > 1 else runs[0]
        if part == "writes":
            result[part]["concurrency"] = a.concurrency
    result["machine"] = (
        f"{platform.machine()} {os.cpu_count()} cpus, Python {platform.python_version()}"
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

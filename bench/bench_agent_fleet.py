"""Per-agent cost when many agents share one process (what a simulator worker pays per client).

N real `Agent`s in this process, no broker and no HTTP: each is given its membership and a
catalog entry, then the measured work of a fleet-wide change — accepting one Everyone
assignment (`handle_message`), verifying the manifest (`verify`) and recording it
(`_record_manifest`) — and finally one launch per host. Prints CPU per agent for each stage
and RSS per agent (model + cache, without the MQTT client), for each cache kind.

    .venv/bin/python bench/bench_agent_fleet.py --agents 4000
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from addin_core.protocol import (
    Assignment,
    CatalogEntry,
    Host,
    Membership,
    Mode,
    Source,
    Topic,
)
from agent.applier import MemoryApplier
from agent.config import AgentConfig
from agent.daemon import Agent
from agent.fetcher import verify
from simulator.orggen import make_manifest

TENANT = "contoso"
ADDIN = "0b5cb8a0-1f53-4e4e-8a60-1d1a8cd8e001"
HOSTS = [Host.WORD, Host.EXCEL, Host.POWERPOINT]


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1])
    return 0


async def measure(agents: int, cache: str) -> dict[str, float]:
    xml = make_manifest(
        ADDIN, name="Contoso Notes", version="1.0.0.0", hosts=HOSTS, permissions="ReadDocument"
    )
    sha = hashlib.sha256(xml).hexdigest()
    now = time.time()
    entry = CatalogEntry(
        revision=2, committed_at=now, addin_id=ADDIN, name="Contoso Notes", source=Source.LOB,
        version="1.0.0.0", manifest_sha256=sha, manifest_url=f"/v1/manifests/{sha}",
        hosts=HOSTS, permissions="ReadDocument", enabled=True,
    )  # fmt: skip
    assignment = Assignment(revision=3, committed_at=now, mode=Mode.FIXED).to_bytes()
    membership = Membership(revision=1, committed_at=now, groups=["g1", "g2"]).to_bytes()
    gc.collect()
    gc.freeze()  # as the simulator's workers do
    rss0 = _rss_kb()
    fleet: list[Agent] = []
    for i in range(agents):
        config = AgentConfig(
            tenant=TENANT, user_id=f"u{i}", client_id=f"c{i}", insecure=True,
            broker_url="mqtt://127.0.0.1:1",
            server_url="http://127.0.0.1:1", cache_path=cache, applier="memory", control=None,
            watch_hosts=False,
        )  # fmt: skip
        agent = Agent(config, applier=MemoryApplier())
        await agent.open()
        await agent.handle_message(str(Topic.member(TENANT, f"u{i}")), membership)
        await agent.handle_message(str(Topic.catalog(TENANT, ADDIN)), entry.to_bytes())
        fleet.append(agent)
    gc.freeze()
    topic = str(Topic.assign_everyone(TENANT, ADDIN))

    t = time.perf_counter()
    for agent in fleet:
        await agent.handle_message(topic, assignment)
    accept = (time.perf_counter() - t) / agents
    t = time.perf_counter()
    results = [verify(entry, bytes(xml)) for _ in fleet]
    verified = (time.perf_counter() - t) / agents
    t = time.perf_counter()
    for agent, result in zip(fleet, results, strict=True):
        await agent._record_manifest(entry, result)
    record = (time.perf_counter() - t) / agents
    t = time.perf_counter()
    for agent in fleet:
        for host in HOSTS:
            await agent.launch(host)
    launch = (time.perf_counter() - t) / agents / len(HOSTS)
    assert all(a.installed()[Host.WORD] == {ADDIN: "1.0.0.0"} for a in fleet)
    return {
        "accept_us": round(accept * 1e6, 1),
        "verify_us": round(verified * 1e6, 1),
        "record_manifest_us": round(record * 1e6, 1),
        "launch_us": round(launch * 1e6, 1),
        "rss_per_agent_kb": round((_rss_kb() - rss0) / agents, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=4000)
    ap.add_argument("--cache", choices=[":none:", ":memory:"], action="append")
    args = ap.parse_args()
    if args.cache and len(args.cache) == 1:
        print(json.dumps({"agents": args.agents, "cache": args.cache[0],
                          **asyncio.run(measure(args.agents, args.cache[0]))}))  # fmt: skip
        return
    # Each cache kind in a fresh interpreter, so that one run's memory does not count twice.
    out = {"agents": args.agents, "machine": f"{platform.machine()} {platform.python_version()}"}
    for cache in args.cache or [":none:", ":memory:"]:
        line = subprocess.run(
            [sys.executable, __file__, "--agents", str(args.agents), "--cache", cache],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        out[cache] = {k: v for k, v in json.loads(line).items() if k not in ("agents", "cache")}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

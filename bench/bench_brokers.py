"""Mosquitto vs a three-node NATS cluster, side by side:
`python bench/bench_brokers.py [--clients 10000] [--scenario phased-rollout]`.

Runs the simulator's scenario twice with the same seed and clients: on its private
Mosquitto (MQTT 5), then on a private three-node NATS cluster (its MQTT gateway, 3.1.1,
sessions and retained messages in JetStream replicated on the three nodes; the cluster is
open like the simulator's Mosquitto: one account, no passwords). Each MQTT subscription is a
JetStream consumer: by default kept on one node in memory (`--replicated-consumers`: on three
nodes, as `broker-config --target nats` writes them; on 2 cores, 1,000 clients' 7,000
replicated consumers did not finish connecting). The server and the simulator's control
channel connect to node 0, the agents to all three (`--agent-broker`, spread by client id). Prints, per step and over all changes, the notified and cached p99 on each broker
and their ratio NATS / Mosquitto; the reports are in bench-results/brokers-<broker>-<N>/.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from simulator.nats_cluster import NatsCluster, free_nodes, write_open_cluster

REPO = Path(__file__).resolve().parents[1]
SIM = str(Path(sys.executable).parent / "addin-sim")


def run_sim(
    clients: int,
    scenario: str,
    report: Path,
    broker_url: str | None,
    agents_on: list[str],
    mqtt_version: str = "auto",
) -> dict[str, Any]:
    cmd = [SIM, "run", "--clients", str(clients), "--scenario", scenario, "--cache", "none",
           "--no-baseline", "--report", str(report)]  # fmt: skip
    if broker_url is not None:
        cmd += ["--broker", broker_url]
    for url in agents_on:
        cmd += ["--agent-broker", url]
    if mqtt_version != "auto":
        cmd += ["--agent-mqtt-version", mqtt_version]
    print(f"==> {' '.join(cmd[1:])}", flush=True)
    done = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, timeout=3600)
    if done.returncode not in (0, 1):  # 1: mismatches, still a report to read
        raise SystemExit(f"addin-sim run failed (exit status {done.returncode})")
    result: dict[str, Any] = json.loads((report / "report.json").read_text())
    return result


def p99s(report: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """(notified p99, cached p99) in ms per step with changes, and over all changes."""
    out = {}
    for step in report["steps"]:
        stages = step.get("stages") or {}
        if step.get("revisions") and stages.get("notified", {}).get("count"):
            out[step["name"]] = (stages["notified"]["p99_ms"], stages["cached"]["p99_ms"])
    total = report["stages"]
    out["all changes"] = (total["notified"]["p99_ms"], total["cached"]["p99_ms"])
    return out


def ratio(a: float, b: float) -> str:
    return f"{b / a:.2f}" if a else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--scenario", default="phased-rollout")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results")
    parser.add_argument("--replicated-consumers", action="store_true")
    args = parser.parse_args()
    n = args.clients
    mosquitto = run_sim(n, args.scenario, args.out / f"brokers-mosquitto-{n}", None, [])
    with tempfile.TemporaryDirectory(prefix="addin-bench-nats-") as tmp:
        nodes = free_nodes(3)
        write_open_cluster(Path(tmp), nodes, light_consumers=not args.replicated_consumers)
        with NatsCluster(Path(tmp), nodes) as cluster:
            urls = [cluster.mqtt_url(i) for i in range(len(nodes))]
            # NATS speaks 3.1.1 only: agents pinned to it, as agent.toml should say for NATS,
            # instead of each one trying MQTT 5 first and being refused.
            nats = run_sim(
                n, args.scenario, args.out / f"brokers-nats-{n}", urls[0], urls, "3.1.1"
            )
    m, s = p99s(mosquitto), p99s(nats)
    consumers = "replicated" if args.replicated_consumers else "one node, in memory"
    print(f"\n{args.scenario}, {n} clients: p99 in ms, ratio = NATS (3 nodes; consumers "
          f"{consumers}) / Mosquitto")  # fmt: skip
    print(f"{'step':<14}{'notified M':>12}{'notified N':>12}{'ratio':>7}"
          f"{'cached M':>10}{'cached N':>10}{'ratio':>7}")  # fmt: skip
    for name in m:
        if name not in s:
            continue
        (mn, mc), (sn, sc) = m[name], s[name]
        print(f"{name:<14}{mn:>12.0f}{sn:>12.0f}{ratio(mn, sn):>7}"
              f"{mc:>10.0f}{sc:>10.0f}{ratio(mc, sc):>7}")  # fmt: skip
    for label, r in (("mosquitto", mosquitto), ("nats", nats)):
        print(f"{label}: {r['mismatches']} mismatches, run {r['duration_s']:.0f} s")


if __name__ == "__main__":
    main()

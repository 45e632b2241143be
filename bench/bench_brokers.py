"""Mosquitto vs a three-node NATS cluster, side by side:
`python bench/bench_brokers.py [--clients N ...] [--scenario phased-rollout]`.

Runs the simulator's scenario twice with the same seed and clients: on its private
Mosquitto (MQTT 5), then on a private three-node NATS cluster (its MQTT gateway, 3.1.1,
sessions and retained messages in JetStream replicated on the three nodes; the cluster is
open like the simulator's Mosquitto: one account, no passwords). The agents on NATS are
pinned to MQTT 3.1.1 (`--agent-mqtt-version`). Each MQTT subscription is a JetStream
consumer: by default kept on one node in memory (`--replicated-consumers`: on three nodes,
as `broker-config --target nats` writes them; on 2 cores, 1,000 clients' 7,000 replicated
consumers did not finish connecting). The server and the simulator's control channel
connect to node 0, the agents to all three (`--agent-broker`, spread by client id).

Prints, per size, step and over all changes, the notified and cached p99 on each broker and
their ratio NATS / Mosquitto, how long connecting took, and a failed run's reason (the other
broker's figures are still printed); the reports are in bench-results/brokers-<broker>-<N>/.
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
) -> tuple[dict[str, Any] | None, str]:
    """The run's report, or None and why the run failed (the simulator's last error line)."""
    cmd = [SIM, "run", "--clients", str(clients), "--scenario", scenario, "--cache", "none",
           "--no-baseline", "--report", str(report)]  # fmt: skip
    if broker_url is not None:
        cmd += ["--broker", broker_url]
    for url in agents_on:
        cmd += ["--agent-broker", url]
    if mqtt_version != "auto":
        cmd += ["--agent-mqtt-version", mqtt_version]
    print(f"==> {' '.join(cmd[1:])}", flush=True)
    done = subprocess.run(
        cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=3600
    )
    if done.returncode not in (0, 1):  # 1: mismatches, still a report to read
        lines = [ln for ln in done.stderr.splitlines() if ln.strip() and "━" not in ln]
        why = " ".join(lines[-3:]) if lines else f"exit status {done.returncode}"
        print(f"   failed: {why}", flush=True)
        return None, why
    result: dict[str, Any] = json.loads((report / "report.json").read_text())
    return result, ""


def p99s(report: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """(notified p99, cached p99) in ms per step with changes, and over all changes."""
    out = {}
    for step in report["steps"]:
        stages = step.get("stages") or {}
        if step.get("revisions") and stages.get("notified", {}).get("count"):
            out[step["name"]] = (stages["notified"]["p99_ms"], stages["cached"]["p99_ms"])
    total = report["stages"]
    if total["notified"].get("count"):
        out["all changes"] = (total["notified"]["p99_ms"], total["cached"]["p99_ms"])
    return out


def ratio(a: float, b: float) -> str:
    if not (a and b):
        return "-"
    r = b / a
    return f"{r:.2f}" if r < 100 else f"{r:,.0f}"


def connected(report: dict[str, Any]) -> str:
    storms = report.get("connect_storms") or []
    if not storms:
        return "-"
    s = storms[0]
    return f"{s['connected']:,} of {s['clients']:,} in {s['seconds']:.1f} s"


def side_by_side(n: int, scenario: str, out: Path, replicated: bool) -> None:
    mosquitto, m_err = run_sim(n, scenario, out / f"brokers-mosquitto-{n}", None, [])
    with tempfile.TemporaryDirectory(prefix="addin-bench-nats-") as tmp:
        nodes = free_nodes(3)
        write_open_cluster(Path(tmp), nodes, light_consumers=not replicated)
        with NatsCluster(Path(tmp), nodes) as cluster:
            urls = [cluster.mqtt_url(i) for i in range(len(nodes))]
            # NATS 2.9 speaks 3.1.1 only: the agents are pinned to it, as a NATS fleet's
            # agent.toml says, instead of each trying MQTT 5 first and being refused.
            nats, n_err = run_sim(
                n, scenario, out / f"brokers-nats-{n}", urls[0], urls, "3.1.1"
            )
    consumers = "replicated" if replicated else "one node, in memory"
    print(f"\n{scenario}, {n} clients: p99 in ms, ratio = NATS (3 nodes; consumers "
          f"{consumers}) / Mosquitto")  # fmt: skip
    m = p99s(mosquitto) if mosquitto else {}
    s = p99s(nats) if nats else {}
    print(f"{'step':<14}{'notified M':>12}{'notified N':>12}{'ratio':>9}"
          f"{'cached M':>10}{'cached N':>10}{'ratio':>9}")  # fmt: skip
    for name in m:
        (mn, mc) = m[name]
        sn, sc = s.get(name, (0.0, 0.0))
        cells = [f"{v:.0f}" if v else "-" for v in (mn, sn, mc, sc)]
        print(f"{name:<14}{cells[0]:>12}{cells[1]:>12}{ratio(mn, sn):>9}"
              f"{cells[2]:>10}{cells[3]:>10}{ratio(mc, sc):>9}")  # fmt: skip
    for label, r, err in (("mosquitto", mosquitto, m_err), ("nats", nats, n_err)):
        if r is None:
            print(f"{label}: run failed: {err}")
        else:
            print(f"{label}: {r['mismatches']} mismatches, connected {connected(r)}, "
                  f"run {r['duration_s']:.0f} s")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--clients", type=int, nargs="+", default=[10_000],
        help="one side-by-side run per size, in order (e.g. 2000 10000)",
    )  # fmt: skip
    parser.add_argument("--scenario", default="phased-rollout")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results")
    parser.add_argument("--replicated-consumers", action="store_true")
    args = parser.parse_args()
    for n in args.clients:
        side_by_side(n, args.scenario, args.out, args.replicated_consumers)


if __name__ == "__main__":
    main()

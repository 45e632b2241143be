"""How cost grows with the fleet: `python bench/bench_growth.py [--sizes N ...] [--repeats R]`.

Runs `addin-sim run --scenario phased-rollout --cache none` at each size (1,000 / 5,000 /
10,000 / 19,000 clients by default), `--repeats` times back to back per size, each into
bench-results/growth/<scenario>-<clients>-<k>/, then `addin-sim compare --median` over every
report.json: one table (workers' CPU-µs and KB per client, notify p99 and its ratio to the
paho floor, cached p99 and its ratio to the download floor; each the median of the repeats
with its range) and one page of plots (growth.html). Each run's load average before it starts
goes to loads.txt beside them: on a shared machine the figures mean little without it.

A run that fails is reported and left out; the others still make the table. 19,000 clients
need one Mosquitto with about 19,300 open files: `addin-sim run` raises its soft limit up to
the hard one and says what to raise when that is too low.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def addin_sim() -> list[str]:
    """The addin-sim of this interpreter's environment (the venv running this script)."""
    exe = Path(sys.executable).with_name("addin-sim")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "simulator.cli"]


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 10000, 19000])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--scenario", default="phased-rollout")
    p.add_argument("--cache", default="none", choices=["none", "memory", "file"])
    p.add_argument("--out", type=Path, default=Path("bench-results/growth"))
    p.add_argument(
        "--compare-only",
        action="store_true",
        help="Only redo the table and plots from the reports already in --out.",
    )
    args = p.parse_args()
    if args.repeats < 1 or any(n < 1 for n in args.sizes):
        p.error("--sizes and --repeats must be positive")
    args.out.mkdir(parents=True, exist_ok=True)
    sim = addin_sim()
    reports: list[Path] = []
    failed: list[str] = []
    loads = args.out / "loads.txt"
    for clients in args.sizes:
        for k in range(1, args.repeats + 1):
            name = f"{args.scenario}-{clients}-{k}"
            report = args.out / name / "report.json"
            if args.compare_only:
                if report.exists():
                    reports.append(report)
                continue
            # A report left from an earlier run of this script would pass for this one's.
            shutil.rmtree(args.out / name, ignore_errors=True)
            cmd = [*sim, "run", "--clients", str(clients), "--scenario", args.scenario,
                   "--cache", args.cache, "--report", str(args.out / name)]  # fmt: skip
            before = load()
            with loads.open("a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {name}: {before}\n")
            print(f"==> addin-sim {' '.join(cmd[len(sim) :])}  ({before})", flush=True)
            status = subprocess.run(cmd, check=False).returncode
            if status == 0 and report.exists():
                reports.append(report)
            else:
                failed.append(f"{name} (exit status {status})")
    if failed:
        print(f"failed runs, left out of the table: {', '.join(failed)}", flush=True)
    if not reports:
        print("no report to compare", file=sys.stderr)
        return 1
    html = args.out / "growth.html"
    print(f"==> addin-sim compare --median ({len(reports)} reports) --html {html}", flush=True)
    compare = [*sim, "compare", "--median", *map(str, reports), "--html", str(html)]
    # Wide: a median row's figures carry their range, and the table goes to a log file too.
    env = {**os.environ, "COLUMNS": os.environ.get("COLUMNS", "250")}
    status = subprocess.run(compare, check=False, env=env).returncode
    return status or (1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main())

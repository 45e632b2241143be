"""Longer soak of the fault suite: run it ROUNDS times, each with another rollout seed.

    .venv/bin/python bench/fault_soak.py --rounds 10

Each round runs tests/test_fault_*.py with ADDIN_FAULT_SEED set to the round number (the
seed of every rollout shifts, so changes, targets and versions differ) and prints the
outcome and the duration. Exit status is non-zero if any round failed.
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=1)
    parser.add_argument("-k", default=None, help="pytest -k expression to select tests")
    args = parser.parse_args()
    tests = sorted(glob.glob(str(REPO / "tests" / "test_fault_*.py")))
    failed = 0
    for r in range(args.first_seed, args.first_seed + args.rounds):
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests]
        if args.k:
            cmd += ["-k", args.k]
        t0 = time.monotonic()
        proc = subprocess.run(
            cmd,
            cwd=REPO,
            env=dict(os.environ, ADDIN_FAULT_SEED=str(r)),
            capture_output=True,
            text=True,
        )
        took = time.monotonic() - t0
        last = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
        print(f"seed {r}: {'ok' if proc.returncode == 0 else 'FAILED'} in {took:.0f}s: {last}")
        if proc.returncode != 0:
            failed += 1
            print(proc.stdout[-4000:])
    print(f"{args.rounds - failed}/{args.rounds} rounds passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

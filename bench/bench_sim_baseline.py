"""Bare MQTT fan-out benchmark: `python bench/bench_sim_baseline.py [CLIENTS ...]`.

Prints one JSON line per size: the time for one QoS 1 publish to reach N bare aiomqtt
subscribers (one process per core) on a private Mosquitto.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from simulator.baseline import run_baseline
from simulator.mosquitto import MosquittoBroker


def main(sizes: list[int]) -> None:
    with tempfile.TemporaryDirectory() as tmp, MosquittoBroker(Path(tmp) / "b") as broker:
        for n in sizes:
            print(json.dumps(run_baseline(broker.url, n, os.cpu_count() or 1)), flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [1000, 5000, 10000])

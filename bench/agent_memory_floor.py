"""The agent daemon's memory floor: RSS of a fresh interpreter importing each layer of what the
daemon needs, split into anonymous (the process's own) and file-backed (interpreter, shared
libraries and extension modules mapped from disk) memory. Linux only (/proc/self/smaps_rollup).

    .venv/bin/python bench/agent_memory_floor.py

Each line is a new process that imports its modules, runs one full collection, and reads its
own smaps_rollup; nothing else runs in it. The daemon's idle figures (bench/bench_agent.py)
are these plus what running holds (state, connections, the event loop's tasks).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LAYERS: list[tuple[str, str]] = [
    ("python -c pass", ""),
    ("import asyncio, sqlite3, ssl", "import asyncio, sqlite3, ssl"),
    (
        "+ pydantic, addin_core.protocol (the wire models)",
        "import asyncio, sqlite3, ssl, addin_core.protocol",
    ),
    (
        "+ aiomqtt (paho), aiosqlite, click, psutil",
        "import asyncio, sqlite3, ssl, addin_core.protocol, aiomqtt, aiosqlite, click, psutil",
    ),
    (
        "import agent.cli, agent.daemon (the daemon's import chain)",
        "import agent.cli, agent.daemon",
    ),
    (
        "the chain + addin_core.manifest (lxml): after a first download",
        "import agent.cli, agent.daemon, addin_core.manifest",
    ),
    (
        "the chain + aiohttp (the simulator's HttpPool; no longer the daemon's)",
        "import agent.cli, agent.daemon, aiohttp",
    ),
    (
        "the chain + cryptography (a config with signing_key or TLS material)",
        "import agent.cli, agent.daemon, agent.tls, addin_core.signing;"
        " from cryptography.hazmat.primitives.asymmetric import ed25519",
    ),
]

PROBE = """
import gc, json
{imports}
gc.collect()
kb = {{}}
for line in open("/proc/self/smaps_rollup"):
    p = line.split()
    if len(p) == 3 and p[2] == "kB":
        kb[p[0].rstrip(":")] = int(p[1])
print(json.dumps(kb))
"""


def measure(imports: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(imports=imports)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    kb = json.loads(out)
    return {
        "rss": kb["Rss"] / 1024,
        "anon": kb["Anonymous"] / 1024,
        "file": (kb["Rss"] - kb["Anonymous"]) / 1024,
        "pss": kb["Pss"] / 1024,
    }


def main() -> None:
    print("| what is imported | RSS | anonymous | file-backed | PSS |")
    print("|---|---|---|---|---|")
    for label, imports in LAYERS:
        # The median of three fresh processes: one page more or less is noise.
        runs = sorted((measure(imports) for _ in range(3)), key=lambda m: m["rss"])
        m = runs[1]
        print(
            f"| {label} | {m['rss']:.1f} MB | {m['anon']:.1f} MB | {m['file']:.1f} MB "
            f"| {m['pss']:.1f} MB |"
        )


if __name__ == "__main__":
    main()

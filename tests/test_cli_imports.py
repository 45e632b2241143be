"""The helpdesk commands import only what they use (docs/benchmarks.md "Helpdesk commands"):
`status`, `list`, `why` (which rebuilds the held payloads with `agent.cache_payloads`) and
`launch` through a running daemon import no pydantic, HTTP or MQTT client, cryptography,
asyncio or daemon module. Asserted on the modules a real
command leaves loaded, against a real cache and a real `addin-agent run` daemon: the import
chain, not a timing, so a regression shows here on any machine."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_report_bundle import agent_toml  # noqa: F401  (fixture: a real cache and config)

NETWORK_AND_DAEMON = {
    "httpx",
    "aiohttp",
    "aiomqtt",
    "paho",
    "cryptography",
    "aiosqlite",
    "psutil",
    "lxml",
    "agent.daemon",
    "agent.transport",
    "agent.control",
    "agent.config",
    "agent.antientropy",
    "agent.fetcher",
}
NOT_FOR_CACHE_READS = NETWORK_AND_DAEMON | {
    "pydantic",
    "asyncio",
    "addin_core.protocol",
    "rich",  # ~30 ms to import: the read commands print with click (agent/cli_common.py)
    # Other commands' modules: `addin-agent` loads them only when they run.
    "agent.cli_service",
    "agent.cli_bundle",
}

PROBE = """
import json, runpy, sys
sys.argv = ["addin-agent", *json.loads(sys.argv[1])]
code = 0
try:
    runpy.run_module("agent.cli", run_name="__main__")
except SystemExit as e:
    code = e.code or 0
names = sorted(m for m in sys.modules)
print("\\nIMPORTED " + json.dumps({"code": code, "modules": names}))
"""


def _imported(cfg: Path, *args: str) -> tuple[str, set[str]]:
    env = {**os.environ, "ADDIN_AGENT_CONFIG": str(cfg), "COLUMNS": "200"}
    r = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    out, _, tail = r.stdout.rpartition("\nIMPORTED ")
    result = json.loads(tail)
    assert result["code"] == 0, r.stderr
    mods = set(result["modules"])
    return out, mods | {m.split(".")[0] for m in mods}


@pytest.fixture
def daemon(agent_toml: Path) -> Iterator[Path]:  # noqa: F811
    """`addin-agent run` on that cache, with a control socket and no broker (nothing listens
    at its port: the daemon runs disconnected, its socket answers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with agent_toml.open("a") as f:
        f.write(
            f'broker_url = "mqtt://127.0.0.1:{port}"\ncontrol = "agent.sock"\n'
            "anti_entropy_interval = 0\nwatch_hosts = false\n"
        )
    sock = agent_toml.parent / "agent.sock"
    log = (agent_toml.parent / "daemon.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(agent_toml)],
        stdout=log,
        stderr=log,
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, (
                agent_toml.parent / "daemon.log"
            ).read_text()
            time.sleep(0.05)
        yield agent_toml
    finally:
        proc.terminate()
        proc.wait(15)
        log.close()


def test_cache_reads_import_no_pydantic_network_or_daemon(agent_toml: Path) -> None:  # noqa: F811
    out, mods = _imported(agent_toml, "status")
    assert "ann-pc" in out
    assert not mods & NOT_FOR_CACHE_READS, sorted(mods & NOT_FOR_CACHE_READS)
    out, mods = _imported(agent_toml, "list", "--json")
    assert {r["name"] for r in json.loads(out)} == {"Contoso CRM", "Fabrikam Notes"}
    assert not mods & NOT_FOR_CACHE_READS, sorted(mods & NOT_FOR_CACHE_READS)


def test_why_imports_no_pydantic_network_client_or_daemon(agent_toml: Path) -> None:  # noqa: F811
    out, mods = _imported(agent_toml, "why", "Contoso CRM", "--json")
    assert json.loads(out)["cause"] == "installed"
    assert not mods & NOT_FOR_CACHE_READS, sorted(mods & NOT_FOR_CACHE_READS)
    out, mods = _imported(agent_toml, "why", "Contoso CRM")
    assert "Contoso CRM" in out
    assert not mods & NOT_FOR_CACHE_READS, sorted(mods & NOT_FOR_CACHE_READS)


def test_launch_through_the_daemon_imports_no_daemon_code(daemon: Path) -> None:
    out, mods = _imported(daemon, "launch", "Word", "--json")
    body = json.loads(out)
    assert body["via"] == "daemon" and body["host"] == "Word"
    assert not mods & NOT_FOR_CACHE_READS, sorted(mods & NOT_FOR_CACHE_READS)


NOT_IN_AN_IDLE_DAEMON = {
    "httpx",  # the daemon downloads with agent.http_pool (its errors: agent.http_errors)
    "cryptography",  # only with a signing_key or TLS material in the config
    "aiohttp",  # at the first download
    "lxml",  # at the first download (the manifest reader)
    "addin_core.manifest",
}


def test_the_daemons_modules_load_no_http_client_crypto_or_xml_reader() -> None:
    """`addin-agent run` imports `agent.daemon`: what that pulls in is in every idle agent's
    RSS (docs/benchmarks.md "Agent"); the rest waits until a download or a key needs it."""
    probe = "import sys, agent.cli, agent.daemon; print(' '.join(sorted(sys.modules)))"
    r = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    mods = set(r.stdout.split())
    mods |= {m.split(".")[0] for m in mods}
    assert "agent.daemon" in mods
    assert not mods & NOT_IN_AN_IDLE_DAEMON, sorted(mods & NOT_IN_AN_IDLE_DAEMON)

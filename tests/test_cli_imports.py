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
    "httpx",  # the daemon downloads with agent.http_lite (its errors: agent.http_errors)
    "cryptography",  # only with a signing_key or TLS material in the config
    "aiohttp",  # never in the daemon (agent.http_lite); the simulator's shared pool uses it
    "lxml",  # at the first download (the manifest reader)
    "h11",  # at the first download too (agent.http_lite's HTTP/1.1)
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


DOWNLOAD_PROBE = """
import asyncio, hashlib, sys
from addin_core.protocol import CatalogEntry, Host, Source
from agent.fetcher import Fetcher
from simulator.orggen import make_manifest

ADDIN = "0b5cb8a0-1f53-4e4e-8a60-1d1a8cd8e0aa"
XML = make_manifest(ADDIN, name="P", version="1.0.0.0", hosts=[Host.WORD], permissions="ReadDocument")
SHA = hashlib.sha256(XML).hexdigest()

async def serve(reader, writer):
    await reader.readuntil(b"\\r\\n\\r\\n")
    writer.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n" % len(XML) + XML)
    await writer.drain()
    writer.close()

async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    fetcher = Fetcher(f"http://127.0.0.1:{port}", None)
    entry = CatalogEntry(
        addin_id=ADDIN, name="P", source=Source.LOB, version="1.0.0.0", manifest_sha256=SHA,
        manifest_url=f"/v1/manifests/{SHA}", hosts=[Host.WORD], permissions="ReadDocument",
        enabled=True, revision=1,
    )
    result = await fetcher.fetch(entry)
    await fetcher.aclose()
    server.close()
    print(result.status, " ".join(sorted(sys.modules)))

asyncio.run(main())
"""


def test_a_daemons_download_loads_no_http_library() -> None:
    """The daemon's own fetcher (no shared pool given) downloads on asyncio's streams: after a
    real download and verification neither aiohttp nor httpx is in the process (the manifest
    reader, lxml, is: it verifies)."""
    r = subprocess.run(
        [sys.executable, "-c", DOWNLOAD_PROBE],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    status, *names = r.stdout.split()
    assert status == "verified", r.stdout[:200]
    mods = {m.split(".")[0] for m in names}
    assert "lxml" in mods and not mods & {"aiohttp", "httpx"}, sorted(mods & {"aiohttp", "httpx"})

"""Manifests served from anywhere (issue 17, item 4): `addin-server manifests export DIR`
writes the stored manifests as ``DIR/<sha256>``, any static web server serves the folder, and
agents try their `manifest_mirrors` in order before the server. The hash, not the mirror,
decides: a mirror with wrong bytes is skipped, never believed, and never gets the token.

Real processes and real HTTP on loopback: the server, a broker, an agent daemon, and the
mirrors as static folders behind Python's own HTTP file server."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import sqlite3
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_helpers import ServerProcess, addin_id, lab_agent_toml, manifest, until
from harness import AgentProcess

from addin_core.protocol import CatalogEntry, Host, Source
from agent.config import AgentConfig
from agent.fetcher import Fetcher
from agent.tls import mirror_context
from simulator.mosquitto import MosquittoBroker, free_port


class Mirror:
    """A web server on loopback serving `root`, whose mirror folder is `root/addins` (a mirror
    is rarely a site's root), recording each request's path and Authorization header."""

    def __init__(self, root: Path) -> None:
        self.folder = root / "addins"
        self.folder.mkdir(parents=True)
        self.requests: list[tuple[str, str | None]] = []
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests.append((self.path, self.headers.get("Authorization")))
                super().do_GET()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(root))
        )
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/addins"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
async def server(tmp_path: Path, broker: MosquittoBroker) -> AsyncIterator[ServerProcess]:
    srv = ServerProcess(tmp_path, broker)
    await srv.user("ann")
    yield srv
    await srv.aclose()


@pytest.fixture
def mirrors(tmp_path: Path) -> Iterator[tuple[Mirror, Mirror]]:
    good, bad = Mirror(tmp_path / "good"), Mirror(tmp_path / "bad")
    yield good, bad
    good.close()
    bad.close()


def server_cli(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server_stub", *args, "--db", str(server.db)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _entry(xml: bytes, name: str, version: str = "1.0.0.0") -> CatalogEntry:
    sha = hashlib.sha256(xml).hexdigest()
    return CatalogEntry(
        revision=1,
        addin_id=addin_id(name),
        name=name,
        source=Source.LOB,
        version=version,
        manifest_sha256=sha,
        manifest_url=f"/v1/manifests/{sha}",
        hosts=[Host.WORD],
        permissions="ReadDocument",
        enabled=True,
    )


async def test_export_writes_each_manifest_once_and_repairs_a_wrong_file(
    tmp_path: Path, server: ServerProcess
) -> None:
    a, b = manifest("crm"), manifest("notes", "2.1.0.0")
    await server.upload(a)
    await server.upload(b)
    out = tmp_path / "export"
    r = server_cli(server, "manifests", "export", str(out))
    assert r.returncode == 0, r.stderr
    assert f"2 manifest(s) in {out}: 2 written ({len(a) + len(b):,} bytes), 0 already" in r.stdout
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    assert files == {hashlib.sha256(x).hexdigest(): x for x in (a, b)}

    again = server_cli(server, "manifests", "export", str(out), "--json")
    assert json.loads(again.stdout)["written"] == 0 and json.loads(again.stdout)["unchanged"] == 2

    sha_a = hashlib.sha256(a).hexdigest()
    (out / sha_a).write_bytes(b"<tampered/>")
    fixed = server_cli(server, "manifests", "export", str(out))
    assert "1 written" in fixed.stdout and "rewrote 1 file(s)" in fixed.stdout
    assert (out / sha_a).read_bytes() == a

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    bad = server_cli(server, "manifests", "export", str(blocker))
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("error: ") and str(blocker) in bad.stderr


async def test_fetcher_tries_mirrors_in_order_and_never_believes_a_wrong_hash(
    mirrors: tuple[Mirror, Mirror],
) -> None:
    good, bad = mirrors
    xml = manifest("crm")
    entry = _entry(xml, "crm")
    (good.folder / entry.manifest_sha256).write_bytes(xml)
    # The poisoned mirror has a valid manifest for the same add-in, of another version.
    (bad.folder / entry.manifest_sha256).write_bytes(manifest("crm", "9.0.0.0"))
    dead = f"http://127.0.0.1:{free_port()}"

    fetcher = Fetcher(dead, "device-token", mirrors=[dead, bad.url, good.url], base_delay=0.01)
    try:
        got = await fetcher.fetch(entry)
    finally:
        await fetcher.aclose()
    assert got.status == "verified" and got.xml == xml and got.attempts == 1
    path = f"/addins/{entry.manifest_sha256}"
    assert bad.requests == [(path, None)] and good.requests == [(path, None)]  # no token

    # Only wrong bytes and dead ends: the download fails (it is retried later); it is not
    # refused, since no source the agent trusts said these bytes are the manifest.
    fetcher = Fetcher(dead, "device-token", mirrors=[bad.url], attempts=2, base_delay=0.01)
    try:
        failed = await fetcher.fetch(entry)
    finally:
        await fetcher.aclose()
    assert failed.status == "failed" and failed.reason is not None
    assert f"mirror {bad.url}/{entry.manifest_sha256} sent bytes that do not hash" in failed.reason
    assert dead in failed.reason  # the server's failure is named too


def test_mirror_urls_are_checked_like_the_server_url() -> None:
    base: dict[str, Any] = dict(tenant="t", user_id="u", client_id="c", insecure=True)
    cfg = AgentConfig(**base, manifest_mirrors=("https://cdn.example/addins/",))
    assert cfg.manifest_mirrors == ("https://cdn.example/addins/",)
    assert mirror_context(cfg) is not None
    assert mirror_context(AgentConfig(**base)) is None
    for wrong, words in [
        ("cdn.example/addins", "the scheme is missing"),
        ("ftp://cdn.example/", "must look like"),
        ("https://cdn.example/?x=1", "query"),
    ]:
        with pytest.raises(ValueError, match=words):
            AgentConfig(**base, manifest_mirrors=(wrong,))


async def test_an_agent_installs_from_the_mirror_and_falls_back_to_the_server(
    tmp_path: Path,
    broker: MosquittoBroker,
    server: ServerProcess,
    mirrors: tuple[Mirror, Mirror],
) -> None:
    good, bad = mirrors
    crm = addin_id("crm")
    v1, v2 = manifest("crm"), manifest("crm", "1.1.0.0")
    await server.upload(v1)
    r = server_cli(server, "manifests", "export", str(good.folder))
    assert r.returncode == 0, r.stderr
    cfg = lab_agent_toml(
        tmp_path,
        broker,
        server,
        f'manifest_mirrors = ["{bad.url}", "{good.url}"]\nwatch_hosts = false\n',
    )
    daemon = AgentProcess(cfg, tmp_path / "daemon.log")
    cache = tmp_path / "cache.sqlite"

    def cached(version: str) -> bool:
        try:
            with sqlite3.connect(f"file:{cache}?mode=ro", uri=True) as db:
                rows = db.execute("SELECT version FROM manifests WHERE addin_id = ?", (crm,))
                return version in {v for (v,) in rows}
        except sqlite3.OperationalError:  # the daemon has not created its cache yet
            return False

    try:
        await server.assign(crm, "everyone")
        await until(lambda: cached("1.0.0.0"), 20, "v1 cached from the mirror")
        sha1 = hashlib.sha256(v1).hexdigest()
        assert (f"/addins/{sha1}", None) in good.requests
        assert bad.requests == [(f"/addins/{sha1}", None)]  # tried first: 404, then next

        # A new version not exported yet: both mirrors answer 404, the server serves it.
        await server.upload(v2)
        await until(lambda: cached("1.1.0.0"), 20, "v2 cached from the server")
        sha2 = hashlib.sha256(v2).hexdigest()
        assert (f"/addins/{sha2}", None) in good.requests
    finally:
        daemon.stop()
    assert "Traceback" not in (tmp_path / "daemon.log").read_text()

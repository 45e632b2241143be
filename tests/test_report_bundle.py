"""`addin-agent report-bundle` and `addin-server bundle show`, as processes, on a real cache
file built through the agent's own code (`Agent.accept`, manifest verification, launch), with
the daemon stopped: the bundle holds what a ticket needs and none of the config's secrets, and
the server prints it back; a malformed or hostile file is refused in one line."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from agent_helpers import addin_id, manifest
from tls_helpers import TestCA

from addin_core.protocol import Assignment, CatalogEntry, Host, Mode, Source, Topic
from agent.config import load_config
from agent.daemon import Agent
from agent.fetcher import verify

T = "contoso"
TOKEN = "tok-SECRET-7f3a9c"
PASSWORD = "pw-SECRET-51be02"
AGENT = [sys.executable, "-m", "agent.cli"]
SERVER = [sys.executable, "-m", "server_stub.cli"]


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("ADDIN_AGENT_CONFIG", None)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture
async def agent_toml(tmp_path: Path) -> Path:
    """An agent.toml with every kind of secret, and a cache holding two add-ins: one fixed
    (installed in Word), one available (not installed)."""
    ca = TestCA()
    crt, key = ca.device("ann-pc").write(tmp_path, "device")
    (tmp_path / "ca.crt").write_text(ca.cert_pem)
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f'tenant = "{T}"\nuser_id = "ann"\nclient_id = "ann-pc"\ninsecure = true\n'
        f'server_token = "{TOKEN}"\nbroker_username = "ann"\nbroker_password = "{PASSWORD}"\n'
        f'tls_ca = "ca.crt"\ntls_cert = "{crt.name}"\ntls_key = "{key.name}"\n'
        'cache_path = "cache.sqlite"\nhosts = ["Word", "Excel"]\n'
        'applier = "folder"\napplier_dir = "wef"\n'
    )
    agent = Agent(load_config(cfg))
    await agent.open()
    try:
        rev = 0
        for name, mode in (("Contoso CRM", Mode.FIXED), ("Fabrikam Notes", Mode.AVAILABLE)):
            aid = addin_id(name)
            xml = manifest(name, "2.1.0.0")
            digest = hashlib.sha256(xml).hexdigest()
            entry = CatalogEntry(
                revision=rev + 1,
                addin_id=aid,
                name=name,
                source=Source.LOB,
                version="2.1.0.0",
                manifest_sha256=digest,
                manifest_url=f"/v1/manifests/{digest}",
                hosts=[Host.WORD],
                permissions="ReadDocument",
                enabled=True,
            )
            await agent.accept(Topic.catalog(T, aid), entry)
            await agent._record_manifest(entry, verify(entry, xml))
            await agent.accept(
                Topic.assign_everyone(T, aid), Assignment(revision=rev + 2, mode=mode)
            )
            rev += 2
        await agent.launch(Host.WORD)
    finally:
        await agent.stop()
    return cfg


def test_bundle_round_trip_without_secrets(agent_toml: Path) -> None:
    work = agent_toml.parent
    out = work / "ticket.json"
    r = _run([*AGENT, "--config", str(agent_toml), "report-bundle", "-o", str(out)], work)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "2 add-in(s) explained" in r.stdout
    assert out.stat().st_mode & 0o077 == 0  # names users and hosts: this user's only

    text = out.read_text()
    key_body = (work / "device.key").read_text().splitlines()[1]
    for secret in (TOKEN, PASSWORD, key_body, "PRIVATE KEY", "BEGIN CERTIFICATE"):
        assert secret not in text, secret
    b = json.loads(text)
    assert b["format"] == "addin-agent-report-bundle" and b["status"]["daemon_running"] is False
    assert [i["name"] for i in b["installed"]["Word"]] == ["Contoso CRM"]
    assert b["config"]["server_token"] == b["config"]["tls_key"] == "(set; removed from the bundle)"
    assert b["config"]["tls_cert"][0]["subject"] == "CN=ann-pc"
    why = {w["name"]: w for w in b["why"]}
    assert why["Contoso CRM"]["cause"] == "installed"
    assert why["Fabrikam Notes"]["cause"] == "available"
    assert any(e["kind"] == "launch" for e in b["events"])

    r = _run([*SERVER, "bundle", "show", str(out)], work)
    assert r.returncode == 0, r.stderr
    for expected in (
        "ann-pc",
        "Contoso CRM",
        "2.1.0.0",
        why["Contoso CRM"]["verdict"],
        "Fabrikam Notes",
        "CN=ann-pc",
        "(set; removed from the bundle)",
    ):
        assert expected in r.stdout, expected
    assert TOKEN not in r.stdout

    r = _run([*SERVER, "bundle", "show", "--json", str(out)], work)
    assert r.returncode == 0 and json.loads(r.stdout)["why"] == b["why"]


def test_bundle_to_stdout_from_the_cache_alone(agent_toml: Path) -> None:
    """`--cache` without a config: the bundle has no config section, and says so."""
    work = agent_toml.parent
    r = _run([*AGENT, "report-bundle", "--cache", str(work / "cache.sqlite"), "-o", "-"], work)
    assert r.returncode == 0, r.stderr
    b = json.loads(r.stdout)
    assert b["config"] is None and len(b["why"]) == 2


def test_hostile_bundle_is_shown_escaped(agent_toml: Path) -> None:
    work = agent_toml.parent
    out = work / "ticket.json"
    assert (
        _run(
            [*AGENT, "--config", str(agent_toml), "report-bundle", "-o", str(out)], work
        ).returncode
        == 0
    )
    b = json.loads(out.read_text())
    b["why"][0]["name"] = "[bold red]evil[/] \x1b[2J\u202egnp.exe"
    b["events"].append({"at": "soon", "kind": "[/]", "detail": "\x07"})
    out.write_text(json.dumps(b))
    r = _run([*SERVER, "bundle", "show", str(out)], work)
    assert r.returncode == 0, r.stderr
    assert "[bold red]evil[/]" in r.stdout
    assert "\x1b" not in r.stdout and "\u202e" not in r.stdout and "\x07" not in r.stdout


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"", "is not JSON"),
        (b"\xff\xfe{}", "is not UTF-8"),
        (b"[" * 200_000, "nests JSON too deeply"),
        (b"[]", "not a JSON object"),
        (b'{"format": "something else"}', "format is not"),
        (
            b'{"format": "addin-agent-report-bundle", "version": 99}',
            "version '99' is not supported",
        ),
        (
            b'{"format": "addin-agent-report-bundle", "version": 1, "created_at": 1, "status": {},'
            b' "installed": {"Word": "x"}, "pending": {}, "events": [], "why": [], "config": null}',
            "'Word' is not a list",
        ),
        (
            b'{"format": "addin-agent-report-bundle", "version": 1, "created_at": 1, "status": {},'
            b' "installed": {}, "pending": {}, "events": [], "why": [1], "config": null}',
            "holds a non-object",
        ),
    ],
)
def test_malformed_bundle_is_refused_in_one_line(tmp_path: Path, content: bytes, says: str) -> None:
    f = tmp_path / "bad.json"
    f.write_bytes(content)
    r = _run([*SERVER, "bundle", "show", str(f)], tmp_path)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert says in r.stderr and "Traceback" not in r.stderr


def test_oversized_bundle_is_refused_before_parsing(tmp_path: Path) -> None:
    f = tmp_path / "huge.json"
    with f.open("wb") as w:  # sparse: no 16 MB written to disk
        w.truncate(17 * 1024 * 1024)
    r = _run([*SERVER, "bundle", "show", str(f)], tmp_path)
    assert r.returncode == 1 and "is over 16 MB" in r.stderr and r.stderr.count("\n") == 1

"""server.toml: `addin-server config check`, `serve --config` as a real process with the
environment and flags overriding the file in that order, and the server's systemd unit."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import postgres_database
from harness import REPO, stop_process

from server_stub import config
from simulator.mosquitto import MosquittoBroker, free_port


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ADDIN_SERVER_", "ADDIN_LOG"))}
    return {**env, **extra}


def addin_server(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server_stub", *args],
        capture_output=True, text=True, timeout=60, env=env or _env(), cwd=REPO,
    )  # fmt: skip


def _toml(tmp: Path, broker_url: str, port: int, extra: str = "") -> Path:
    (tmp / "admin-token").write_text("from-file\n")
    cfg = tmp / "server.toml"
    cfg.write_text(
        f"""
[server]
tenant = "contoso"
listen = "127.0.0.1:{port}"
database = "server.db"
insecure = true

[broker]
url = "{broker_url}"

[auth]
admin_token_file = "admin-token"
agent_token = "agent-from-file"
{extra}"""
    )
    return cfg


def test_the_shipped_example_is_valid_toml_for_the_model() -> None:
    cfg = config.load(REPO / "packaging" / "server.example.toml")
    assert cfg.server.tenant == "contoso" and cfg.directory.interval == 900
    assert cfg.auth.admin_token_file == Path("/etc/addin-server/admin-token")


def test_config_check_says_ok_or_names_every_problem(tmp_path: Path) -> None:
    good = _toml(tmp_path, "mqtt://127.0.0.1:1883", 8080)
    r = addin_server("config", "check", str(good))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == f"{good}: ok"
    assert "tenant contoso, insecure (lab), listen 127.0.0.1:8080" in r.stdout

    bad = tmp_path / "bad.toml"
    bad.write_text(
        """
[server]
tenant = "contoso"
max_addins = 0
insecure = true
[broker]
url = "127.0.0.1:1883"
[auth]
admin_token = "a"
admin_tokn = "typo"
[metrics]
enabled = "maybe"
"""
    )
    r = addin_server("config", "check", str(bad))
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert len(lines) == 3, r.stderr  # every problem of the model at once, one line each
    assert all(line.startswith(f"error: {bad}: [") for line in lines)
    assert any(
        "[server] max_addins: Input should be greater than or equal to 1" in x for x in lines
    )
    assert any("[auth] admin_tokn: Extra inputs are not permitted" in x for x in lines)
    assert any("[metrics] enabled: Input should be a valid boolean" in x for x in lines)
    assert "Traceback" not in r.stderr

    # Once the model accepts it, the checks serve makes: one line each too.
    bad.write_text('[server]\ntenant = "t"\n[broker]\nurl = "127.0.0.1:1883"\n')
    lines = addin_server("config", "check", str(bad)).stderr.splitlines()
    assert len(lines) == 3, lines  # database, admin token, pki-or-insecure
    assert any("--admin-token ([auth] admin_token" in x for x in lines)
    assert any("serve needs --pki DIR ([server] pki" in x for x in lines)

    r = addin_server("config", "check", str(tmp_path / "none.toml"))
    assert r.returncode == 1 and "cannot read" in r.stderr and len(r.stderr.splitlines()) == 1
    (tmp_path / "broken.toml").write_text("[server\n")
    r = addin_server("config", "check", str(tmp_path / "broken.toml"))
    assert r.returncode == 1 and "not valid TOML" in r.stderr


def test_every_file_setting_is_relative_to_the_config_files_folder(tmp_path: Path) -> None:
    """`config check` runs from another folder (the repository): the tokens file beside
    server.toml is the one read, as the admin token file is."""
    (tmp_path / "tokens.txt").write_text("helpdesk:dana:helpdesk-token-1\n")
    cfg = _toml(tmp_path, "mqtt://127.0.0.1:1883", 8080, 'tokens_file = "tokens.txt"\n')
    assert not (REPO / "tokens.txt").exists()
    r = addin_server("config", "check", str(cfg))
    assert r.returncode == 0, r.stderr
    assert config.load(cfg).auth.tokens_file == tmp_path / "tokens.txt"
    # Every Path field of the model is in the list of those made relative to the file.
    for section, model in config.ServerConfig.model_fields.items():
        assert model.annotation is not None
        for name, field in model.annotation.model_fields.items():
            if "Path" in str(field.annotation):
                assert name in config._PATHS.get(section, ()), (section, name)


def _serve(cfg: Path, port: int, log: Path, *flags: str, **env: str) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server_stub", "serve", "--config", str(cfg), *flags],
            stdout=out, stderr=out, env=_env(**env), cwd=cfg.parent,
        )  # fmt: skip
    import time

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
            return proc
        except httpx.HTTPError:
            time.sleep(0.05)
    stop_process(proc)
    raise AssertionError(log.read_text())


def _accepted(port: int, token: str) -> bool:
    r = httpx.get(
        f"http://127.0.0.1:{port}/v1/addins", headers={"Authorization": f"Bearer {token}"}
    )
    assert r.status_code in (200, 401), r.text
    return r.status_code == 200


def test_serve_config_then_environment_then_flags(tmp_path: Path, broker: MosquittoBroker) -> None:
    port = free_port()
    cfg = _toml(
        tmp_path, broker.url, port, '[logging]\nformat = "json"\n[metrics]\ntoken = "scrape"\n'
    )
    log = tmp_path / "server.log"

    proc = _serve(cfg, port, log)
    try:
        assert _accepted(port, "from-file") and not _accepted(port, "from-env")
        assert (tmp_path / "server.db").exists()  # relative to the file's folder
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).json()
        assert "checks" in ready
        # [metrics] token: /metrics wants its own bearer token, not the admin's.
        metrics = f"http://127.0.0.1:{port}/metrics"
        assert httpx.get(metrics, timeout=5).status_code == 401
        admin = {"Authorization": "Bearer from-file"}
        assert httpx.get(metrics, headers=admin, timeout=5).status_code == 401
        scraper = {"Authorization": "Bearer scrape"}
        assert "addin_revision" in httpx.get(metrics, headers=scraper, timeout=5).text
    finally:
        stop_process(proc)
    assert log.read_text().lstrip().startswith("{")  # [logging] format = "json"

    proc = _serve(cfg, port, log, ADDIN_SERVER_ADMIN_TOKEN="from-env")
    try:
        assert _accepted(port, "from-env") and not _accepted(port, "from-file")
    finally:
        stop_process(proc)

    other = free_port()
    proc = _serve(
        cfg, other, log, "--admin-token", "from-flag", "--listen", f"127.0.0.1:{other}",
        "--no-metrics", ADDIN_SERVER_ADMIN_TOKEN="from-env",
    )  # fmt: skip
    try:
        assert _accepted(other, "from-flag") and not _accepted(other, "from-env")
        assert httpx.get(f"http://127.0.0.1:{other}/metrics", timeout=5).status_code == 404
    finally:
        stop_process(proc)


@pytest.mark.postgresql
def test_serve_config_with_a_postgresql_database(tmp_path: Path, broker: MosquittoBroker) -> None:
    """[server] database takes a URL as it is (not a path under the file's folder); `config
    check` shows it without its password."""
    with postgres_database() as url:
        port = free_port()
        cfg = _toml(tmp_path, broker.url, port)
        with_password = url.replace("postgres@", "postgres:hunter2@", 1)
        cfg.write_text(cfg.read_text().replace('database = "server.db"', f'database = "{with_password}"'))
        checked = addin_server("config", "check", str(cfg))
        assert checked.returncode == 0, checked.stderr
        assert f"database {url}" in checked.stdout and "hunter2" not in checked.stdout
        proc = _serve(cfg, port, tmp_path / "server.log")
        try:
            r = httpx.post(f"http://127.0.0.1:{port}/v1/users", json={"id": "ann", "name": "Ann"},
                           headers={"Authorization": "Bearer from-file"}, timeout=5)  # fmt: skip
            assert r.status_code == 200, r.text
        finally:
            stop_process(proc)
        assert not (tmp_path / "postgresql:").exists()
        listed = addin_server("--db", url, "user", "show", "ann")
        assert listed.returncode == 0 and "Ann" in listed.stdout, listed.stderr


def test_serve_refuses_a_bad_config_with_one_line_per_problem(tmp_path: Path) -> None:
    cfg = _toml(tmp_path, "mqtts://127.0.0.1:1", free_port(), "[health]\nmax_outbox_lag = -1\n")
    r = addin_server("serve", "--config", str(cfg), env=_env())
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        f"error: {cfg}: [health] max_outbox_lag: Input should be greater than 0"
    ]
    cfg = _toml(tmp_path, "mqtts://127.0.0.1:1", free_port())
    r = addin_server("serve", "--config", str(cfg), env=_env())
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        "error: --broker 'mqtts://127.0.0.1:1' must look like mqtt://HOST:PORT"
    ]
    assert not (tmp_path / "server.db").exists()


def test_server_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    unit = REPO / "packaging" / "addin-server.service"
    text = unit.read_text()
    for hardening in ("NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes",
                      "ProtectHome=yes", "StateDirectory=addin-server"):  # fmt: skip
        assert hardening in text
    assert "--config /etc/addin-server/server.toml" in text
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is missing: apt-get install systemd (scripts/bootstrap.sh)")
    # verify needs the ExecStart binary to exist: point it at a stand-in in tmp.
    exe = tmp_path / "addin-server"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    copy = tmp_path / "addin-server.service"
    copy.write_text(text.replace("/usr/local/bin/addin-server", str(exe)))
    r = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    # An unknown or misspelt key is only a warning (exit 0) naming the file: none allowed.
    problems = [line for line in r.stderr.splitlines() if str(copy) in line]
    assert r.returncode == 0, r.stderr
    assert problems == [], problems

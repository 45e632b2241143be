"""`addin-agent run` as a real process: a bad configuration, an unusable cache or a control
endpoint that cannot be created ends the process at once with one `error:` line naming the
field or file, and relative paths in the config file are taken from the file's folder."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from tls_helpers import TestCA

from agent.config import MAX_SOCKET_PATH, ConfigError, load_config, parse_control
from simulator.mosquitto import MosquittoBroker

EXIT_WITHIN = 30.0
"""Seconds a refused start may take before the test calls it a hang (it takes well under one)."""

GOOD = {
    "tenant": '"contoso"',
    "user_id": '"ann"',
    "client_id": '"ann-laptop"',
    "insecure": "true",
    "broker_url": '"mqtt://127.0.0.1:1"',
    "server_url": '"http://127.0.0.1:1"',
    "cache_path": '"cache.sqlite"',
    "hosts": '["Word", "Excel", "Outlook"]',
    "applier": '"folder"',
    "applier_dir": '"wef"',
    "control": '"agent.sock"',
}


def agent_command() -> list[str]:
    script = Path(sys.executable).parent / "addin-agent"
    return [str(script)] if script.exists() else [sys.executable, "-m", "agent.cli"]


def write_toml(path: Path, **fields: str | None) -> Path:
    values = {**GOOD, **fields}
    path.write_text("".join(f"{k} = {v}\n" for k, v in values.items() if v is not None))
    return path


def run_agent(
    config: Path, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ADDIN_AGENT_")}
    try:
        return subprocess.run(
            [*agent_command(), "run", "--config", str(config)],
            cwd=cwd,
            env={**clean, **(env or {})},
            capture_output=True,
            text=True,
            timeout=EXIT_WITHIN,
        )
    except subprocess.TimeoutExpired as e:  # subprocess.run has killed it
        raise AssertionError(
            f"addin-agent run did not exit within {EXIT_WITHIN}s; stderr:\n{e.stderr}"
        ) from None


def one_error_line(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode != 0, r.stderr
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in r.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"control": '"127.0.0.1:8765"'}, ["control", "TCP endpoint", "unix socket only"]),
        ({"control": '"10.0.0.1:8765"'}, ["control", "TCP endpoint", "socket path"]),
        ({"control": '"8765"'}, ["control", "'8765'", "unix socket only"]),
        ({"broker_url": '"mqtt://127.0.0.1:notaport"'}, ["broker_url", "'notaport'"]),
        ({"broker_url": '"127.0.0.1:1883"'}, ["broker_url", "scheme is missing"]),
        ({"broker_url": '"http://127.0.0.1:1883"'}, ["broker_url", "mqtt://HOST:PORT"]),
        ({"server_url": '"127.0.0.1:8080"'}, ["server_url", "scheme is missing"]),
        ({"server_url": '"http://:8080"'}, ["server_url", "no host"]),
        ({"hosts": '["Word", "Wrod"]'}, ["hosts[1]", "'Wrod'"]),
        ({"keepalive": '"often"'}, ["keepalive", "'often'"]),
        ({"colour": '"blue"'}, ["colour", "unknown field"]),
        ({"client_id": None}, ["client_id", "required"]),
        ({"user_id": '"a b"'}, ["user_id", "'a b'"]),
        ({"applier_dir": None}, ["applier_dir"]),
        ({"broker_password": '"secret"'}, ["broker_username"]),
        ({"control": '"' + "s" * (MAX_SOCKET_PATH + 1) + '"'}, ["control", "at most 107"]),
    ],
)
def test_bad_field_is_one_line_naming_it(
    tmp_path: Path, fields: dict[str, str | None], expected: list[str]
) -> None:
    config = write_toml(tmp_path / "agent.toml", **fields)
    line = one_error_line(run_agent(config, tmp_path))
    assert str(config) in line
    for text in expected:
        assert text in line
    assert not (tmp_path / "cache.sqlite").exists()  # refused before anything was created


def test_each_bad_field_gets_its_own_line(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "agent.toml", broker_url='"mqtt://h:x"', control='"127.0.0.1:y"')
    r = run_agent(config, tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 2, r.stderr
    assert "broker_url" in lines[0] and "control" in lines[1]


def test_bad_value_from_the_environment_names_the_variable(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "agent.toml")
    r = run_agent(config, tmp_path, env={"ADDIN_AGENT_SERVER_URL": "addins.contoso.local"})
    line = one_error_line(r)
    assert "server_url (from ADDIN_AGENT_SERVER_URL)" in line and "scheme" in line


def _not_toml(tmp: Path) -> Path:
    (tmp / "agent.toml").write_text('tenant = "contoso\n')
    return tmp / "agent.toml"


def _a_directory(tmp: Path) -> Path:
    (tmp / "conf.d").mkdir()
    return tmp / "conf.d"


def _not_a_cache(tmp: Path) -> Path:
    (tmp / "cache.sqlite").write_text("not a database, but someone's notes\n")
    return write_toml(tmp / "agent.toml")


def _cache_is_a_directory(tmp: Path) -> Path:
    (tmp / "cache.sqlite").mkdir()
    return write_toml(tmp / "agent.toml")


def _socket_folder_missing(tmp: Path) -> Path:
    return write_toml(tmp / "agent.toml", control='"no-such-folder/agent.sock"')


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (_not_toml, ["not valid TOML"]),
        (_a_directory, ["is a directory"]),
        (_not_a_cache, ["cache.sqlite", "not a usable agent cache"]),
        (_cache_is_a_directory, ["cache.sqlite", "is a directory"]),
        (_socket_folder_missing, ["control endpoint", "no-such-folder/agent.sock"]),
    ],
)
def test_unusable_file_or_endpoint_is_one_line_and_the_process_ends(
    tmp_path: Path, make: Callable[[Path], Path], expected: list[str]
) -> None:
    line = one_error_line(run_agent(make(tmp_path), tmp_path))
    for text in expected:
        assert text in line


def test_control_socket_in_use_is_one_line_and_the_cache_is_left_closed(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as taken:
        taken.bind(str(tmp_path / "agent.sock"))
        taken.listen()
        line = one_error_line(run_agent(write_toml(tmp_path / "agent.toml"), tmp_path))
    assert f"control socket {tmp_path / 'agent.sock'} is in use by another process" in line
    # The cache was opened before the endpoint failed: it was closed cleanly (no WAL left).
    assert (tmp_path / "cache.sqlite").exists()
    assert not (tmp_path / "cache.sqlite-wal").exists()


def test_control_socket_in_a_folder_others_can_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp: another user could replace the socket
    config = write_toml(tmp_path / "agent.toml", control=f'"{shared / "agent.sock"}"')
    line = one_error_line(run_agent(config, tmp_path))
    assert f"control socket {shared / 'agent.sock'}" in line
    assert "can be written by other users" in line and "1777" in line
    assert not (shared / "agent.sock").exists()


def test_relative_paths_are_taken_from_the_config_folder(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    """The README's agent.toml (`cache_path = "cache.sqlite"`, `control = "agent.sock"`),
    started from another directory: the files go next to the config, and the helpdesk
    commands, started from a third directory, find them."""
    home, elsewhere, third = tmp_path / "ws", tmp_path / "elsewhere", tmp_path / "third"
    for d in (home, elsewhere, third):
        d.mkdir()
    write_toml(home / "agent.toml", broker_url=f'"{broker.url}"')
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ADDIN_AGENT_")}
    log = open(tmp_path / "agent.log", "wb")
    proc = subprocess.Popen(
        [*agent_command(), "run", "--config", "../ws/agent.toml"],
        cwd=elsewhere,
        env=clean,
        stdout=log,
        stderr=log,
    )
    try:
        status: dict[str, object] = {}
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not status.get("connected"):
            if proc.poll() is not None:
                raise AssertionError((tmp_path / "agent.log").read_text())
            r = subprocess.run(
                [*agent_command(), "--config", "../ws/agent.toml", "status", "--json"],
                cwd=third,
                env=clean,
                capture_output=True,
                text=True,
                timeout=EXIT_WITHIN,
            )
            if r.returncode == 0:
                status = json.loads(r.stdout)
            time.sleep(0.1)
        assert status.get("connected"), (tmp_path / "agent.log").read_text()
        assert (home / "cache.sqlite").exists() and (home / "agent.sock").is_socket()
        assert sorted(p.name for p in elsewhere.iterdir()) == []
        assert sorted(p.name for p in third.iterdir()) == []
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(EXIT_WITHIN) == 0
        assert not (home / "agent.sock").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_load_config_resolves_file_paths_not_environment_paths(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "agent.toml")
    cfg = load_config(config, env={"ADDIN_AGENT_APPLIER_DIR": "here/wef"})
    assert cfg.cache_path == str(tmp_path / "cache.sqlite")
    assert cfg.applier_dir == "here/wef"  # from the environment: the current directory's
    assert cfg.control == str(tmp_path / "agent.sock")
    memory = load_config(config, env={}, cache_path=":memory:")
    assert memory.cache_path == ":memory:"
    absolute = write_toml(tmp_path / "abs.toml", cache_path='"/var/lib/addin-agent/c.sqlite"')
    assert load_config(absolute, env={}).cache_path == "/var/lib/addin-agent/c.sqlite"


@pytest.mark.parametrize(
    "spec",
    [
        "agent.sock",
        "/run/addin-agent/agent.sock",
        "./a:b/agent.sock",
        r"C:\Users\ann\AppData\Local\addin-agent\agent.sock",  # Windows: the port+token file
    ],
)
def test_parse_control(spec: str) -> None:
    assert parse_control(spec) == spec


@pytest.mark.parametrize(
    "spec", ["8765", "127.0.0.1:8765", "localhost:8765", "[::1]:8765", "0", "example.com:80"]
)
def test_parse_control_refuses_tcp(spec: str) -> None:
    with pytest.raises(ValueError, match="unix socket only"):
        parse_control(spec)


def test_config_error_keeps_one_problem_per_field(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "agent.toml", keepalive='"x"', colour='"y"')
    with pytest.raises(ConfigError) as e:
        load_config(config, env={})
    assert len(e.value.problems) == 2
    assert str(e.value).count("\n") == 1


def test_packaged_example_config_is_valid(tmp_path: Path) -> None:
    """The example is a secure configuration; only its certificate files are elsewhere here
    (it names /etc/addin-agent/...), so they come from the environment."""
    example = Path(__file__).resolve().parents[1] / "packaging" / "agent.example.toml"
    ca = TestCA()
    (tmp_path / "ca.crt").write_text(ca.cert_pem)
    crt, key = ca.device("ann-laptop").write(tmp_path, "device")
    env = {"ADDIN_AGENT_TLS_CA": str(tmp_path / "ca.crt"), "ADDIN_AGENT_TLS_CERT": str(crt)}
    cfg = load_config(example, env={**env, "ADDIN_AGENT_TLS_KEY": str(key)})
    assert cfg.control == str(example.parent / "agent.sock") and cfg.broker_port == 8883
    assert cfg.cache_path == str(example.parent / "addin-agent.sqlite")
    assert not cfg.insecure and cfg.broker_tls and cfg.server_tls and cfg.signing_key

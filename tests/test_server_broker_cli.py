"""`addin-server broker run DIR` starts a real Mosquitto with the accounts and ACL that
`broker-config` wrote; `broker password` prints an account's password; `serve --broker`
without `mqtt://` is refused before anything starts."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import AgentConfig
from agent.doctor import check_broker
from simulator.mosquitto import free_port

EXIT_WITHIN = 30.0


def server_command() -> list[str]:
    script = Path(sys.executable).parent / "addin-server"
    return [str(script)] if script.exists() else [sys.executable, "-m", "server_stub"]


def addin_server(
    *args: str, cwd: Path, timeout: float = EXIT_WITHIN
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADDIN_SERVER_")}
    return subprocess.run(
        [*server_command(), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_error_line(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode != 0, r.stdout + r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


@pytest.fixture
def accounts(tmp_path: Path) -> Path:
    """A database with ann and bob, and `broker-config broker` run on it."""
    (tmp_path / "org.yaml").write_text(
        "tenant: contoso\nusers: [{id: ann}, {id: bob}]\ngroups: []\n"
    )
    for args in (("load", "org.yaml"), ("broker-config", "broker")):
        r = addin_server(*args, "--db", "server.db", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
    return tmp_path / "broker"


@pytest.fixture
def running_broker(accounts: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    log = open(accounts.parent / "broker.log", "wb")
    proc = subprocess.Popen(
        [*server_command(), "broker", "run", "broker", "--listen", f"127.0.0.1:{port}"],
        cwd=accounts.parent,
        stdout=log,
        stderr=log,
    )
    try:
        deadline = time.monotonic() + EXIT_WITHIN
        while True:
            assert proc.poll() is None, (accounts.parent / "broker.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the broker never listened"
                time.sleep(0.05)
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def login(port: int, username: str | None, password: str | None) -> tuple[str, str]:
    cfg = AgentConfig(
        tenant="contoso",
        user_id="ann",
        client_id="broker-cli-test",
        insecure=True,
        broker_url=f"mqtt://127.0.0.1:{port}",
        broker_username=username,
        broker_password=password,
    )
    check = check_broker(cfg)
    return check.status, check.detail


def password(accounts: Path, account: str) -> str:
    r = addin_server("broker", "password", "broker", account, cwd=accounts.parent)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_broker_run_uses_the_generated_accounts_and_stops_on_sigterm(
    accounts: Path, running_broker: tuple[subprocess.Popen[bytes], int]
) -> None:
    proc, port = running_broker
    server_pw, ann_pw = password(accounts, "addin-server-contoso"), password(accounts, "ann")
    assert len(server_pw) >= 24 and len(ann_pw) >= 18 and server_pw != ann_pw
    assert login(port, "addin-server-contoso", server_pw)[0] == "ok"
    assert login(port, "ann", ann_pw)[0] == "ok"
    assert login(port, "ann", server_pw)[0] == "fail"
    status, detail = login(port, None, None)
    assert status == "fail" and "refused the login" in detail  # no anonymous access
    conf = (accounts / "mosquitto.conf").read_text()
    assert f"listener {port} 127.0.0.1\n" in conf
    assert f"password_file {accounts.absolute() / 'passwd'}\n" in conf
    assert "1883" not in conf
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(EXIT_WITHIN) == 0
    assert (accounts / "data" / "mosquitto.db").exists()  # saved on the way out


def test_broker_run_refuses_a_busy_port_and_missing_files(
    accounts: Path, running_broker: tuple[subprocess.Popen[bytes], int]
) -> None:
    _, port = running_broker
    line = one_error_line(
        addin_server(
            "broker", "run", "broker", "--listen", f"127.0.0.1:{port}", cwd=accounts.parent
        )
    )
    assert f"127.0.0.1:{port}" in line and "in use" in line
    line = one_error_line(addin_server("broker", "run", "elsewhere", cwd=accounts.parent))
    assert "no passwd or acl" in line and "broker-config elsewhere" in line
    line = one_error_line(
        addin_server("broker", "run", "broker", "--listen", "18883", cwd=accounts.parent)
    )
    assert "HOST:PORT" in line


def test_broker_password_of_an_unknown_account_is_one_line(accounts: Path) -> None:
    line = one_error_line(addin_server("broker", "password", "broker", "zed", cwd=accounts.parent))
    assert "'zed'" in line and "addin-server-contoso" in line
    line = one_error_line(addin_server("broker", "password", "nowhere", "ann", cwd=accounts.parent))
    assert "credentials.json does not exist" in line


@pytest.mark.parametrize(
    ("broker", "expected"),
    [
        ("127.0.0.1:1883", "the scheme is missing"),
        ("mqtt://127.0.0.1:notaport", "PORT from 1 to 65535"),
        ("http://127.0.0.1:1883", "mqtt://HOST:PORT"),
    ],
)
def test_serve_refuses_a_broker_url_without_mqtt_scheme(
    tmp_path: Path, broker: str, expected: str
) -> None:
    r = addin_server(
        "serve",
        "--db",
        "server.db",
        "--tenant",
        "contoso",
        "--broker",
        broker,
        "--listen",
        f"127.0.0.1:{free_port()}",
        "--admin-token",
        "a",
        "--agent-token",
        "b",
        "--insecure",
        cwd=tmp_path,
    )
    line = one_error_line(r)
    assert f"--broker {broker!r}" in line and expected in line
    assert r.returncode == 2
    assert not (tmp_path / "server.db").exists()

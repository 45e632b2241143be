"""`addin-agent service install|uninstall|status` from a real enrollment bundle: the files it
writes (a private agent folder, a systemd user unit that `systemd-analyze verify` accepts,
running the real installed executable), the system unit, the LaunchAgent and the Windows
commands, and `--version`."""

from __future__ import annotations

import json
import os
import plistlib
import shutil
import stat
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import service as svc
from agent.config import load_config

TIMEOUT = 60
VENV_BIN = Path(os.path.abspath(sys.executable)).parent


def run(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT
    )


def ok(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ann-laptop's agent.toml as `addin-server enroll` writes it."""
    folder = tmp_path_factory.mktemp("enroll")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADDIN_SERVER_")}
    env["ADDIN_SERVER_DB"] = "server.db"
    server = ("-m", "server_stub")
    ok(run(*server, "pki", "init", "pki", "--tenant", "contoso", cwd=folder, env=env))
    ok(run(*server, "user", "add", "ann", "--tenant", "contoso", cwd=folder, env=env))
    ok(run(*server, "enroll", "--user", "ann", "--device", "ann-laptop", "--pki", "pki",
           "-o", "ann-laptop.agent.toml", cwd=folder, env=env))  # fmt: skip
    return folder / "ann-laptop.agent.toml"


@pytest.fixture
def home(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A user's home for the commands (and for plain calls in this process). A short path of
    its own, not under tmp_path: the control socket inside it must stay under the 107 bytes a
    unix socket path may have, and pytest's folders (longer still per xdist worker) are not."""
    h = Path(tempfile.mkdtemp(prefix="home-"))
    monkeypatch.setenv("HOME", str(h))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    try:
        yield h
    finally:
        shutil.rmtree(h, ignore_errors=True)


def agent(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ADDIN_AGENT_", "XDG_"))}
    env["HOME"] = str(home)
    return run("-m", "agent.cli", *args, cwd=home, env=env)


def verify(unit: Path, user: bool) -> None:
    """`systemd-analyze verify` accepts the unit (it checks ExecStart is executable, every
    directive and its value)."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    runtime = unit.parent / "runtime"  # a user manager's runtime folder, private
    runtime.mkdir(mode=0o700, exist_ok=True)
    r = subprocess.run(
        [tool, *(["--user"] if user else []), "verify", str(unit)],
        capture_output=True, text=True, timeout=TIMEOUT,
        env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)},
    )  # fmt: skip
    assert r.returncode == 0 and unit.name not in r.stdout + r.stderr, r.stdout + r.stderr


def test_install_puts_the_bundle_in_a_private_folder_and_writes_a_unit_systemd_accepts(
    bundle: Path, home: Path
) -> None:
    out = ok(agent(home, "service", "install", "--config", str(bundle), "--files-only"))
    state = home / ".config" / "addin-agent"
    config = state / "agent.toml"
    unit = home / ".config" / "systemd" / "user" / "addin-agent.service"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    installed = tomllib.loads(config.read_text())
    original = tomllib.loads(bundle.read_text())
    assert installed == {**original, "control": "agent.sock", "cache_path": "addin-agent.sqlite"}
    cfg = load_config(config)  # the cache and the socket are in the user's folder
    assert (cfg.cache_path, cfg.control) == (
        str(state / "addin-agent.sqlite"),
        str(state / "agent.sock"),
    )

    text = unit.read_text()
    exec_start = f"ExecStart={VENV_BIN / 'addin-agent'} --config {config} run"
    assert exec_start in text.splitlines()
    assert f"WorkingDirectory={state}" in text.splitlines()
    assert "Restart=on-failure" in text and "WantedBy=default.target" in text
    assert "User=" not in text and "/usr/bin" not in text
    verify(unit, user=True)
    assert out.splitlines()[-4:] == [
        "not started (--files-only); to start it now and at every login, run:",
        "  systemctl --user daemon-reload",
        "  systemctl --user enable addin-agent.service",
        "  systemctl --user restart addin-agent.service",
    ]

    status = json.loads(ok(agent(home, "service", "status", "--json")))
    assert status["installed"] and status["executable_exists"] and status["config_exists"]
    assert status["runs"] == [str(VENV_BIN / "addin-agent"), "--config", str(config), "run"]

    # A second install (a re-enrolled device) replaces the config and keeps one control line.
    ok(agent(home, "service", "install", "--config", str(bundle), "--files-only"))
    assert config.read_text().count("control =") == 1

    out = ok(agent(home, "service", "uninstall", "--files-only"))
    assert not unit.exists() and config.exists()  # the device's config and cache stay
    assert f"removed {unit}" in out and "systemctl --user disable --now addin-agent.service" in out
    r = agent(home, "service", "status")
    assert r.returncode == 3 and r.stdout.startswith(f"not installed: {unit} does not exist")


def test_without_a_user_manager_install_says_how_to_start_it(bundle: Path, home: Path) -> None:
    """A container (or an ssh session without a login manager) has no `systemctl --user`:
    the files are written and the commands printed; nothing fails."""
    fake = home / "bin"
    fake.mkdir()
    (fake / "systemctl").write_text(
        "#!/bin/sh\necho 'Failed to connect to bus: No medium found' >&2\nexit 1\n"
    )
    (fake / "systemctl").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ADDIN_AGENT_", "XDG_"))}
    env.update(HOME=str(home), PATH=f"{fake}:{env['PATH']}")
    r = run("-m", "agent.cli", "service", "install", "--config", str(bundle), cwd=home, env=env)
    lines = ok(r).splitlines()
    assert lines[-5:] == [
        "not started: `systemctl --user daemon-reload` failed: Failed to connect to bus: No medium found",
        "to start it, run in the user's login session:",
        "  systemctl --user daemon-reload",
        "  systemctl --user enable addin-agent.service",
        "  systemctl --user restart addin-agent.service",
    ]
    assert (home / ".config" / "systemd" / "user" / "addin-agent.service").is_file()


def test_a_bad_bundle_is_one_error_line_and_writes_nothing(tmp_path: Path, home: Path) -> None:
    r = agent(home, "service", "install", "--config", str(tmp_path / "missing.toml"))
    assert r.returncode == 1 and r.stderr.startswith("error: ") and len(r.stderr.splitlines()) == 1
    assert "does not exist" in r.stderr
    half = tmp_path / "half.toml"
    half.write_text('tenant = "contoso"\n')
    r = agent(home, "service", "install", "--config", str(half))
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "is not a usable agent configuration" in r.stderr and "Traceback" not in r.stderr
    r = agent(home, "service", "install")
    assert r.returncode == 2 and "give the enrollment bundle" in r.stderr
    assert not (home / ".config").exists()


def test_the_system_unit_runs_as_its_own_account_and_systemd_accepts_it(tmp_path: Path) -> None:
    config = tmp_path / "state 100%" / "agent.toml"  # a space and a % are escaped
    unit = tmp_path / "addin-agent.service"
    unit.write_text(svc.systemd_unit(svc.run_argv(config), True, "kiosk-1", ["/srv/wef"]))
    text = unit.read_text()
    assert (
        f'ExecStart={VENV_BIN / "addin-agent"} --config "{tmp_path}/state 100%%/agent.toml" run'
        in text
    )
    for line in ("User=addin-agent", "StateDirectory=addin-agent", "StateDirectoryMode=0700",
                 "ProtectSystem=strict", "ReadWritePaths=/srv/wef", "WantedBy=multi-user.target"):  # fmt: skip
        assert line in text.splitlines()
    verify(unit, user=False)


def test_the_shipped_unit_is_gone() -> None:
    """packaging/addin-agent.service ran /usr/bin/addin-agent, which nothing installs, as a
    user nothing creates; `service install` generates the unit now."""
    packaging = Path(__file__).resolve().parents[1] / "packaging"
    names = {p.name for p in packaging.iterdir()}
    # The server's unit is shipped (tests/test_server_config.py verifies it); the agent's not.
    assert "agent.example.toml" in names and not any(n.startswith("addin-agent") for n in names)


def test_the_macos_launch_agent_is_per_user_and_logs_in_the_users_library(home: Path) -> None:
    lay = svc.layout(platform="macos")
    assert lay.service_file == home / "Library" / "LaunchAgents" / f"{svc.LAUNCHD_LABEL}.plist"
    assert lay.log_file == home / "Library" / "Logs" / "addin-agent.log"
    argv = svc.run_argv(lay.config)
    plist = plistlib.loads(svc.launchd_plist(argv, lay.log_file, lay.state_dir))
    assert plist["ProgramArguments"] == argv and plist["Label"] == svc.LAUNCHD_LABEL
    assert plist["WorkingDirectory"] == str(
        home / "Library" / "Application Support" / "addin-agent"
    )
    assert plist["StandardOutPath"] == plist["StandardErrorPath"] == str(lay.log_file)
    assert plist["KeepAlive"] == {"SuccessfulExit": False} and plist["RunAtLoad"] is True
    assert svc.enable_commands(lay) == [
        ["launchctl", "bootstrap", f"gui/{os.getuid()}", str(lay.service_file)]
    ]
    with pytest.raises(ValueError, match="--system is for Linux"):
        svc.layout(system=True, platform="macos")


def test_the_windows_commands_start_the_agent_at_logon() -> None:
    argv = [r"C:\Users\ann\venv\Scripts\addin-agent.exe", "--config",
            r"C:\Users\ann\AppData\Local\addin-agent\agent.toml", "run"]  # fmt: skip
    create, start = svc.windows_commands(argv)
    assert create == (
        'schtasks /Create /TN "addin-agent" /SC ONLOGON /RL LIMITED /TR '
        r'"C:\Users\ann\venv\Scripts\addin-agent.exe --config '
        r'C:\Users\ann\AppData\Local\addin-agent\agent.toml run" /F'
    )
    assert start == 'schtasks /Run /TN "addin-agent"'
    spaced = svc.windows_commands([r"C:\Program Files\a.exe", "run"])[0]
    assert r'/TR "\"C:\Program Files\a.exe\" run"' in spaced


def test_version(home: Path) -> None:
    r = agent(home, "--version")
    assert r.returncode == 0 and r.stdout == "addin-agent, version 0.1.0\n", r.stdout + r.stderr

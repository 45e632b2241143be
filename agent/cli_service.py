"""`addin-agent service install|uninstall|status`: install the enrollment bundle in the user's
agent folder and run the daemon as a service (the files and commands: agent/service.py)."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import click

from agent import service as svc
from agent.cli_common import CONFIG_ENV, Ctx, emit_json, fail, pass_ctx
from agent.config_file import ConfigError

FILES_ONLY_HELP = (
    "Write (or remove) the files only and print the systemctl/launchctl commands instead of "
    "running them."
)


@click.group()
def service() -> None:
    """Run the agent as this user's service: a systemd user unit (Linux), a LaunchAgent
    (macOS); on Windows, print the scheduled-task commands."""


def _layout(system: bool) -> svc.Layout:
    try:
        return svc.layout(system)
    except ValueError as e:
        fail(str(e), 2)


def _write_private(path: Path, data: bytes, mode: int) -> None:
    """Write `path` atomically with `mode` from its creation (never readable by others, even
    for a moment: the bundle holds the device's private key)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _run(commands: list[list[str]]) -> str | None:
    """Run each command (bounded: 30 s each); None when all succeeded, else what went wrong."""
    for argv in commands:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        except FileNotFoundError:
            return f"{argv[0]} is not installed"
        except subprocess.TimeoutExpired:
            return f"`{svc.shell_line(argv)}` did not finish in 30 s"
        if r.returncode != 0:
            said = (r.stderr or r.stdout).strip().splitlines()
            return f"`{svc.shell_line(argv)}` failed: {said[-1] if said else r.returncode}"
    return None


def _unreachable_parent(path: Path) -> Path | None:
    """The first folder on the way to `path` that other users cannot enter (the system unit's
    account is "other" to a venv under /root or a home folder)."""
    for parent in reversed(path.parents):
        with contextlib.suppress(OSError):
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                return parent
    return None


def _ensure_system_user(state: Path) -> str:
    import pwd  # Linux only (a system unit)

    try:
        pwd.getpwnam(svc.SYSTEM_USER)
        return f"account {svc.SYSTEM_USER} exists"
    except KeyError:
        pass
    argv = ["useradd", "--system", "--user-group", "--home-dir", str(state), "--no-create-home",
            "--shell", "/usr/sbin/nologin", svc.SYSTEM_USER]  # fmt: skip
    problem = _run([argv])
    if problem:
        fail(f"cannot create the service account {svc.SYSTEM_USER}: {problem}")
    return f"created the system account {svc.SYSTEM_USER}"


def _bundle_path(c: Ctx) -> Path:
    from addin_runtime.cli_support import shared_value

    given = shared_value("config") or os.environ.get(CONFIG_ENV)
    if not given:
        fail(
            "give the enrollment bundle: addin-agent service install --config DEVICE.agent.toml "
            "(the agent.toml `addin-server enroll` wrote)",
            2,
        )
    return Path(c.config_path or given).absolute()


@service.command()
@click.option("--system", is_flag=True, help="A system unit run by a dedicated account (Linux).")
@click.option("--files-only", is_flag=True, help=FILES_ONLY_HELP)
@pass_ctx
def install(c: Ctx, system: bool, files_only: bool) -> None:
    """Install the enrollment bundle (--config FILE) and start the agent at every login."""
    from agent.config import load_config  # pydantic: not for the other commands' start

    lay = _layout(system)
    bundle = _bundle_path(c)
    if system and os.geteuid() != 0:
        fail("--system writes /etc/systemd/system and creates an account: run it as root", 1)
    try:
        cfg = load_config(bundle)
        text = bundle.read_text(encoding="utf-8")
        data = tomllib.loads(text)
    except ConfigError as e:
        fail(f"{bundle} is not a usable agent configuration: {e.problems[0]}")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        fail(f"{bundle} cannot be read: {e}")
    missing = [f'{k} = "{v}"' for k, v in svc.LOCAL_DEFAULTS.items() if k not in data]
    if missing and any(isinstance(v, dict) for v in data.values()):
        fail(f"{bundle} has TOML tables; add {' and '.join(missing)} at its top yourself")
    lines: list[str] = []
    if system:
        lines.append(_ensure_system_user(lay.state_dir))
    lay.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(lay.state_dir, 0o700)  # one user's agent folder is nobody else's to read
    dest = lay.config
    installed = svc.with_local_settings(text, set(data))
    previous = dest.read_bytes() if dest.exists() else None
    _write_private(dest, installed.encode(), 0o600)
    try:
        cfg = load_config(dest)  # relative paths are now taken from the state folder
    except ConfigError as e:
        if previous is None:
            dest.unlink()
        else:
            _write_private(dest, previous, 0o600)
        fail(f"{bundle} does not work from {lay.state_dir}: {e.problems[0]}")
    if system:
        import pwd

        account = pwd.getpwnam(svc.SYSTEM_USER)
        for p in (lay.state_dir, dest):
            os.chown(p, account.pw_uid, account.pw_gid)
    lines.append(
        f"installed {bundle} as {dest} (mode 0600; the cache and control socket are kept in "
        f"{lay.state_dir}, mode 0700)"
    )
    argv = svc.run_argv(dest)
    if system and (blocked := _unreachable_parent(Path(argv[0]))) is not None:
        lines.append(
            f"warning: {svc.SYSTEM_USER} cannot enter {blocked} to run {argv[0]}: install the "
            "agent in a virtualenv outside it (e.g. /opt/addin-agent)"
        )
    if lay.platform == "windows":
        lines.append("to start the agent at every logon, run in this user's command prompt:")
        lines += [f"  {line}" for line in svc.windows_commands(argv)]
        click.echo("\n".join(lines))
        return
    assert lay.service_file is not None
    lay.service_file.parent.mkdir(parents=True, exist_ok=True)
    if lay.platform == "linux":
        writable = []
        if cfg.applier_dir and not Path(cfg.applier_dir).is_relative_to(lay.state_dir):
            writable.append(cfg.applier_dir)
        body = svc.systemd_unit(argv, system, cfg.client_id, writable, lay.state_dir).encode()
    else:
        assert lay.log_file is not None
        lay.log_file.parent.mkdir(parents=True, exist_ok=True)
        body = svc.launchd_plist(argv, lay.log_file, lay.state_dir)
    _write_private(lay.service_file, body, 0o644)
    lines.append(f"wrote {lay.service_file} to run: {svc.shell_line(argv)}")
    lines += _enable(lay, files_only)
    click.echo("\n".join(lines))


def _enable(lay: svc.Layout, files_only: bool) -> list[str]:
    commands = svc.enable_commands(lay)
    how = [f"  {svc.shell_line(a)}" for a in commands]
    if files_only:
        return ["not started (--files-only); to start it now and at every login, run:", *how]
    if lay.platform == "macos":
        # A LaunchAgent already loaded (a re-install) must be booted out before bootstrap.
        _run(svc.disable_commands(lay))
    problem = _run(commands)
    if problem is None:
        return [f"enabled and started: {svc.shell_line(commands[-1])}"]
    where = "in the user's login session" if not lay.system else "as root"
    return [f"not started: {problem}", f"to start it, run {where}:", *how]


@service.command()
@click.option("--system", is_flag=True, help="The system unit (Linux).")
@click.option("--files-only", is_flag=True, help=FILES_ONLY_HELP)
def uninstall(system: bool, files_only: bool) -> None:
    """Stop the service and remove its unit or LaunchAgent; the agent folder (config, cache)
    is kept."""
    lay = _layout(system)
    lines: list[str] = []
    if lay.platform == "windows":
        lines.append("run in this user's command prompt:")
        lines.append(f'  schtasks /End /TN "{svc.WINDOWS_TASK}"')
        lines.append(f'  schtasks /Delete /TN "{svc.WINDOWS_TASK}" /F')
    elif lay.service_file is None or not lay.service_file.exists():
        lines.append(f"no service installed ({lay.service_file} does not exist)")
    else:
        stop = svc.disable_commands(lay)
        if files_only:
            lines.append("not stopped (--files-only); to stop it, run:")
            lines += [f"  {svc.shell_line(a)}" for a in stop]
        elif (problem := _run(stop)) is not None:
            lines.append(f"not stopped: {problem}")
        else:
            lines.append(f"stopped and disabled: {svc.shell_line(stop[-1])}")
        lay.service_file.unlink()
        lines.append(f"removed {lay.service_file}")
        if lay.platform == "linux" and not files_only:
            _run([["systemctl", *([] if system else ["--user"]), "daemon-reload"]])
    lines.append(
        f"kept {lay.state_dir} (this device's config and cache); delete it to forget the device"
    )
    click.echo("\n".join(lines))


def _exec_start(lay: svc.Layout) -> list[str] | None:
    """The command the installed unit or plist runs (None when there is none)."""
    if lay.service_file is None or not lay.service_file.is_file():
        return None
    if lay.platform == "macos":
        import plistlib

        with lay.service_file.open("rb") as f:
            return list(plistlib.load(f).get("ProgramArguments", []))
    for line in lay.service_file.read_text().splitlines():
        if line.startswith("ExecStart="):
            import shlex

            return shlex.split(line.removeprefix("ExecStart=").replace("%%", "%"))
    return None


@service.command()
@click.option("--system", is_flag=True, help="The system unit (Linux).")
@click.option("--json", "as_json", is_flag=True)
def status(system: bool, as_json: bool) -> None:
    """Where the service's files are, what it runs and whether it is running."""
    lay = _layout(system)
    argv = _exec_start(lay)
    running: str | None = None
    if (cmd := svc.status_command(lay)) is not None and argv is not None:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
            out = (r.stdout or r.stderr).strip().splitlines()
            running = (
                out[0]
                if lay.platform == "linux" and out
                else ("yes" if r.returncode == 0 else "no")
            )
            if r.returncode != 0 and lay.platform == "linux" and "bus" in (r.stderr or ""):
                running = "unknown (" + r.stderr.strip().splitlines()[-1] + ")"
        except (FileNotFoundError, subprocess.TimeoutExpired) as e:
            running = f"unknown ({e})"
    body: dict[str, Any] = {
        "platform": lay.platform,
        "system": lay.system,
        "installed": argv is not None,
        "service_file": str(lay.service_file) if lay.service_file else None,
        "config": str(lay.config),
        "config_exists": lay.config.is_file(),
        "runs": argv,
        "executable_exists": argv is not None and len(argv) > 0 and Path(argv[0]).is_file(),
        "state": running,
        "log": str(lay.log_file) if lay.log_file else None,
    }
    if as_json:
        emit_json(body)
        return
    if lay.platform == "windows":
        click.echo(f'config {lay.config}; ask Windows: schtasks /Query /TN "{svc.WINDOWS_TASK}"')
        return
    if argv is None:
        click.echo(f"not installed: {lay.service_file} does not exist (config {lay.config})")
        sys.exit(3)  # as `systemctl is-active` for a unit that is not running
    click.echo(f"service file: {lay.service_file}")
    click.echo(f"runs:         {svc.shell_line(argv)}")
    if not body["executable_exists"]:
        click.echo(f"warning: {argv[0]} does not exist (the venv moved?); run install again")
    click.echo(f"config:       {lay.config}{'' if body['config_exists'] else ' (missing)'}")
    if lay.log_file:
        click.echo(f"log:          {lay.log_file}")
    click.echo(f"state:        {running}")

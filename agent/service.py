"""Running the agent as a service: where its files go and the unit, LaunchAgent or scheduled
task that starts it (`addin-agent service install|uninstall|status`, agent/cli_service.py).

One agent per user: Office loads add-ins per user, so on a shared desktop each user runs their
own daemon with their own state folder (mode 0700), and an agent never reads another user's
files. The state folder holds the installed ``agent.toml`` (the enrollment bundle, mode 0600),
the cache and the control socket: the config's relative paths are taken from its folder, so
one folder is the whole of a user's agent.

- Linux: a systemd user unit (``~/.config/systemd/user/addin-agent.service``); ``system=True``
  writes a system unit running as the dedicated user ``addin-agent`` instead (a single-user
  kiosk or VDI image), with its state in /var/lib/addin-agent.
- macOS: a LaunchAgent (``~/Library/LaunchAgents``, per user, in the user's GUI session where
  Office runs), logging to ``~/Library/Logs/addin-agent.log``.
- Windows: the commands to run (a scheduled task at logon), printed, not run: this project
  has no Windows CI to test running them.

The unit files are generated here from the installed executable and the absolute config path;
nothing is copied from a template that would name paths this machine does not have.
"""

from __future__ import annotations

import os
import plistlib
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Platform = Literal["linux", "macos", "windows"]

APP = "addin-agent"
UNIT_NAME = "addin-agent.service"
LAUNCHD_LABEL = "org.addin-deploy.agent"
WINDOWS_TASK = "addin-agent"
SYSTEM_USER = "addin-agent"
"""The dedicated account of a system unit (created by `service install --system`)."""
SYSTEM_STATE = Path("/var/lib/addin-agent")
SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
CONTROL_SOCKET = "agent.sock"
"""The control endpoint `install` adds to a bundle without one: relative, so inside the state
folder (0700: no other user can reach or replace it). On Windows the same path holds the
endpoint's port and token (agent/control_windows.py)."""


def current_platform() -> Platform:
    if sys.platform == "darwin":
        return "macos"
    if sys.platform == "win32":
        return "windows"
    return "linux"


def user_state_dir(platform: Platform | None = None) -> Path:
    """The user's agent folder: ``$XDG_CONFIG_HOME/addin-agent`` (``~/.config/addin-agent``)
    on Linux, ``~/Library/Application Support/addin-agent`` on macOS,
    ``%LOCALAPPDATA%\\addin-agent`` on Windows (local, not roaming: the cache belongs to this
    machine and must not follow a roaming profile to another). The default config path of
    every `addin-agent` command (agent/cli_common.py) is ``agent.toml`` in it."""
    plat = platform or current_platform()
    if plat == "linux":
        base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
        return Path(base) / APP
    if plat == "macos":
        return Path.home() / "Library" / "Application Support" / APP
    local = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
    return Path(local) / APP


@dataclass(frozen=True, slots=True)
class Layout:
    """Where one installation's files are."""

    platform: Platform
    system: bool
    state_dir: Path
    service_file: Path | None
    """The systemd unit or the LaunchAgent plist; None on Windows (nothing is written)."""
    log_file: Path | None
    """macOS only: launchd writes stdout/stderr there (systemd has the journal)."""

    @property
    def config(self) -> Path:
        return self.state_dir / "agent.toml"


def layout(system: bool = False, platform: Platform | None = None) -> Layout:
    """Raises ValueError when `system` is asked where this project has no system service."""
    plat = platform or current_platform()
    if system and plat != "linux":
        raise ValueError(
            "--system is for Linux (a systemd system unit); on macOS and Windows the agent runs "
            "per user, in the session where Office runs"
        )
    if plat == "linux":
        if system:
            return Layout(plat, True, SYSTEM_STATE, SYSTEM_UNIT_DIR / UNIT_NAME, None)
        base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
        unit = Path(base) / "systemd" / "user" / UNIT_NAME
        return Layout(plat, False, user_state_dir(plat), unit, None)
    if plat == "macos":
        home = Path.home()
        plist = home / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist"
        log = home / "Library" / "Logs" / "addin-agent.log"
        return Layout(plat, False, user_state_dir(plat), plist, log)
    return Layout(plat, False, user_state_dir(plat), None, None)


def agent_command() -> list[str]:
    """The installed `addin-agent`: the script next to this interpreter (a venv's bin folder,
    where pip put it), not a guessed /usr/bin path. The interpreter path is not resolved: in a
    venv it is a symlink, and resolving it would leave the venv and its packages behind."""
    folder = Path(os.path.abspath(sys.executable)).parent
    script = folder / ("addin-agent.exe" if sys.platform == "win32" else "addin-agent")
    if script.is_file():
        return [str(script)]
    return [os.path.abspath(sys.executable), "-m", "agent.cli"]


def run_argv(config: Path) -> list[str]:
    return [*agent_command(), "--config", str(config), "run"]


def _systemd_quote(arg: str) -> str:
    """One ExecStart argument: systemd expands ``%`` specifiers and ``$`` variables and splits
    on whitespace, so those are escaped and an argument with a space or quote is quoted."""
    arg = arg.replace("%", "%%").replace("$", "$$")
    if arg and not any(c in arg for c in " \t\"'\\;"):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def systemd_unit(
    argv: list[str],
    system: bool,
    client_id: str,
    writable: list[str] | None = None,
    workdir: Path | None = None,
) -> str:
    """The unit text. A user unit runs in the user's manager (no User=: it is the user); a
    system unit runs as `SYSTEM_USER` with its state in /var/lib/addin-agent and the file
    system read-only elsewhere, except `writable` (an applier folder outside the state)."""
    lines = [
        "# Written by `addin-agent service install`; `addin-agent service uninstall` removes it.",
        "[Unit]",
        f"Description=Office add-in deployment agent ({client_id})",
    ]
    if system:  # a user manager has no network-online.target to order after
        lines += ["Wants=network-online.target", "After=network-online.target"]
    lines += [
        "",
        "[Service]",
        "Type=simple",
        "ExecStart=" + " ".join(_systemd_quote(a) for a in argv),
        *([f"WorkingDirectory={_systemd_quote(str(workdir))}"] if workdir else []),
        # The agent reconnects to the broker by itself (backoff, forever): a restart is only
        # for a crash. SIGTERM is a clean stop (the cache closes after the transaction).
        "Restart=on-failure",
        "RestartSec=5",
        "KillSignal=SIGTERM",
        "TimeoutStopSec=20",
    ]
    if system:
        lines += [
            f"User={SYSTEM_USER}",
            f"Group={SYSTEM_USER}",
            "StateDirectory=addin-agent",
            "StateDirectoryMode=0700",
            "NoNewPrivileges=true",
            "ProtectSystem=strict",
            "PrivateTmp=true",
        ]
        lines += [f"ReadWritePaths={_systemd_quote(p)}" for p in writable or []]
    lines += [
        "",
        "[Install]",
        f"WantedBy={'multi-user.target' if system else 'default.target'}",
        "",
    ]
    return "\n".join(lines)


def launchd_plist(argv: list[str], log_file: Path, workdir: Path) -> bytes:
    """The LaunchAgent: started at login in the user's session, restarted after a crash only
    (KeepAlive on an unsuccessful exit), logging to the user's ~/Library/Logs."""
    return plistlib.dumps(
        {
            "Label": LAUNCHD_LABEL,
            "ProgramArguments": argv,
            "WorkingDirectory": str(workdir),
            "RunAtLoad": True,
            "KeepAlive": {"SuccessfulExit": False},
            "ThrottleInterval": 5,
            "ExitTimeOut": 20,
            "ProcessType": "Background",
            "StandardOutPath": str(log_file),
            "StandardErrorPath": str(log_file),
        }
    )


def _windows_quote(arg: str) -> str:
    return f'"{arg}"' if any(c in arg for c in ' \t"') else arg


def windows_commands(argv: list[str]) -> list[str]:
    """What to run on Windows: a scheduled task starting the agent at this user's logon, in
    their session, with their rights (/RL LIMITED), and how to start it now."""
    command = " ".join(_windows_quote(a) for a in argv).replace('"', '\\"')
    return [
        f'schtasks /Create /TN "{WINDOWS_TASK}" /SC ONLOGON /RL LIMITED /TR "{command}" /F',
        f'schtasks /Run /TN "{WINDOWS_TASK}"',
    ]


def enable_commands(lay: Layout) -> list[list[str]]:
    """The commands that start the service now and at every login/boot."""
    if lay.platform == "linux":
        scope = [] if lay.system else ["--user"]
        # restart, not start: after a re-install (a re-enrolled device) a running daemon
        # would keep the old certificate and token.
        return [
            ["systemctl", *scope, "daemon-reload"],
            ["systemctl", *scope, "enable", UNIT_NAME],
            ["systemctl", *scope, "restart", UNIT_NAME],
        ]
    if lay.platform == "macos":
        assert lay.service_file is not None
        return [["launchctl", "bootstrap", f"gui/{os.getuid()}", str(lay.service_file)]]
    return []


def disable_commands(lay: Layout) -> list[list[str]]:
    if lay.platform == "linux":
        scope = [] if lay.system else ["--user"]
        return [["systemctl", *scope, "disable", "--now", UNIT_NAME]]
    if lay.platform == "macos":
        return [["launchctl", "bootout", f"gui/{os.getuid()}/{LAUNCHD_LABEL}"]]
    return []


def status_command(lay: Layout) -> list[str] | None:
    if lay.platform == "linux":
        return ["systemctl", *([] if lay.system else ["--user"]), "is-active", UNIT_NAME]
    if lay.platform == "macos":
        return ["launchctl", "print", f"gui/{os.getuid()}/{LAUNCHD_LABEL}"]
    return None


def shell_line(argv: list[str]) -> str:
    return shlex.join(argv)


LOCAL_DEFAULTS = {"cache_path": "addin-agent.sqlite", "control": CONTROL_SOCKET}
"""What `install` adds to a bundle that does not set it: the cache and the control socket in
the state folder. Written out because only paths written in the file are taken from its
folder: a default cache_path would land in whatever folder the service manager starts in."""


def with_local_settings(bundle_text: str, present: set[str]) -> str:
    """The bundle as installed: unchanged, plus the `LOCAL_DEFAULTS` it does not set (`launch`
    and the helpdesk commands talk to the daemon through the control socket). Appended as
    top-level keys, so only to a bundle without tables (enroll writes none); the caller
    checks that with tomllib."""
    missing = {k: v for k, v in LOCAL_DEFAULTS.items() if k not in present}
    if not missing:
        return bundle_text
    sep = "" if bundle_text.endswith("\n") or not bundle_text else "\n"
    added = "".join(f'{k} = "{v}"\n' for k, v in missing.items())
    return (
        f"{bundle_text}{sep}# added by `addin-agent service install`: kept in this folder\n{added}"
    )

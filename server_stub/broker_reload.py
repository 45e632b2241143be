"""Make a running Mosquitto re-read its ACL and CRL: SIGHUP to the pid in its folder's pid file.

Measured on Mosquitto 2.0.11 (docs/security.md, "Revocation"): on SIGHUP it re-reads the
ACL file and the `crlfile`; the new ACL applies at once to the subscriptions of clients
already connected, the CRL to every new TLS handshake. Without the signal it reads neither.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

PID_FILE = "mosquitto.pid"
"""Written by the broker `addin-server broker run DIR` starts (its `pid_file`)."""


def _is_mosquitto(pid: int) -> bool | None:
    """Whether `pid` runs Mosquitto (None: cannot tell on this system). A stale pid file's
    number may belong to another process by now; it must not get our signal."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except FileNotFoundError:
        return None if not Path("/proc/self").exists() else False
    except OSError:
        return None
    return comm == "mosquitto"


def reload_broker(directory: Path) -> tuple[bool, str]:
    """SIGHUP the broker of `directory`: (done, what happened or what the admin must do)."""
    pid_path = directory / PID_FILE
    how = (
        "reload the broker yourself (SIGHUP: `kill -HUP <mosquitto pid>`, or "
        "`systemctl reload mosquitto`) so it reads the new acl and crl.pem"
    )
    try:
        pid = int(pid_path.read_text().strip())
    except FileNotFoundError:
        return (
            False,
            f"no broker pid file {pid_path} (is `addin-server broker run` running?): {how}",
        )
    except (OSError, ValueError) as e:
        return False, f"cannot read {pid_path} ({e}): {how}"
    if _is_mosquitto(pid) is False:
        return False, f"{pid_path} names pid {pid}, which is not a running mosquitto: {how}"
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        return False, f"{pid_path} names pid {pid}, which is not running: {how}"
    except PermissionError:
        return False, f"not allowed to signal the broker (pid {pid}): {how}"
    return True, f"sent SIGHUP to the broker (pid {pid}); it now uses the new acl and crl.pem"

"""Real processes named like the Office host apps (a copy of `sleep` called WINWORD.EXE):
psutil reports a process's name from its executable, so the host watcher sees them as Word,
Excel, ... on this machine."""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

SLEEP = shutil.which("sleep") or "/bin/sleep"

LIFETIME = "300"
"""Seconds a host process lives if a test forgets it (each test ends its own)."""


class HostApp:
    """One running "host app". `exit` is a normal end, `crash` a SIGKILL; both reap it."""

    def __init__(self, bindir: Path, name: str, user: int | None = None) -> None:
        bindir.mkdir(parents=True, exist_ok=True)
        exe = bindir / name
        if not exe.exists():
            shutil.copy(SLEEP, exe)
            if user is not None:
                bindir.chmod(0o755)  # another user must reach and run the copy
        # Popen returns once the exec succeeded: the process has its name from here on.
        self.proc = subprocess.Popen([str(exe), LIFETIME], user=user)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def exit(self) -> None:
        self._end(signal.SIGTERM)

    def crash(self) -> None:
        self._end(signal.SIGKILL)

    def _end(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

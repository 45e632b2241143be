"""One daemon per state file: an exclusive lock on a ``<file>.lock`` sidecar, held for the
life of the process, with the holder's pid written inside.

Two agents on one cache (or two `addin-server serve` on one database) connect to the broker
under the same client id and knock each other off it about once a second, each writing
over the other's state. The second one must refuse to start and say who holds the file.

The lock is ``flock`` (advisory, released by the kernel when the process dies however it
dies, so a crash never leaves a stale lock behind). `held_by` probes with a shared lock for
an instant; `InstanceLock.acquire` therefore retries for a moment before concluding that
the file is taken. The sidecar is never deleted: unlinking a lock file lets a third process
lock a new file while the first still holds the old one.

Windows has no ``flock``: there the lock is not taken (`SUPPORTED` is False) and a second
daemon is not detected.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

SUPPORTED = fcntl is not None


def lock_path(target: str | Path) -> Path:
    """The sidecar that guards `target`."""
    return Path(f"{target}.lock")


@dataclass(frozen=True, slots=True)
class Holder:
    """A live process holds the lock; `pid` is None if it had not written it yet."""

    pid: int | None

    def describe(self) -> str:
        return f"pid {self.pid}" if self.pid else "another process"


class AlreadyLocked(RuntimeError):
    """Another live process holds the lock."""

    def __init__(self, path: Path, holder: Holder) -> None:
        super().__init__(f"{path} is held by {holder.describe()}")
        self.path = path
        self.holder = holder


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


class InstanceLock:
    """``InstanceLock(path).acquire()`` or raise `AlreadyLocked`; `release()` at exit."""

    def __init__(self, target: str | Path) -> None:
        self.path = lock_path(target)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, patience: float = 1.0) -> None:
        if fcntl is None or self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + patience
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    # A `held_by` probe holds a shared lock for microseconds; a daemon
                    # holds it for good.
                    if time.monotonic() >= deadline:
                        raise AlreadyLocked(self.path, Holder(_read_pid(fd))) from None
                    time.sleep(0.05)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None or fcntl is None:
            return
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def held_by(target: str | Path) -> Holder | None:
    """Who holds `target`'s lock right now, or None (never creates the sidecar)."""
    if fcntl is None:
        return None
    try:
        fd = os.open(lock_path(target), os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return Holder(_read_pid(fd))
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)

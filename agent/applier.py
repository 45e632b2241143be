"""Appliers: make a host app's add-in set real.

`apply(host, addins)` is given the COMPLETE set the host must have after a launch and
makes it so; it is idempotent, so re-running it after a crash converges.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from addin_core.protocol import Host


@dataclass(frozen=True, slots=True)
class AppliedManifest:
    addin_id: str
    version: str
    sha256: str
    xml: bytes | None


class Applier(Protocol):
    needs_xml: bool

    def apply(self, host: Host, addins: dict[str, AppliedManifest]) -> None: ...

    def current(self, host: Host) -> dict[str, str]:
        """What the host would load right now: {addin_id: version or sha256}."""
        ...


class MemoryApplier:
    """Keeps the applied set in memory (the simulator; tests)."""

    needs_xml = False

    def __init__(self) -> None:
        self.hosts: dict[Host, dict[str, str]] = {}

    def apply(self, host: Host, addins: dict[str, AppliedManifest]) -> None:
        self.hosts[host] = {a: m.version for a, m in addins.items()}

    def current(self, host: Host) -> dict[str, str]:
        return dict(self.hosts.get(host, {}))


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}\.xml$")


def _has_sha(path: Path, sha256: str) -> bool:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest() == sha256
    except OSError:
        return False


class FolderApplier:
    """Writes verified manifests to ``<dir>/<Host>/<addin-id>.xml`` — the way Office for Mac
    loads manifests from its ``wef`` folder at launch.

    Each file is written to a temporary file in the same folder, flushed, and renamed over
    the old one, so a reader never sees a half-written manifest; files of add-ins no longer
    in the set are removed. Only ``*.xml`` files named like an add-in id are touched.
    """

    needs_xml = True

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def folder(self, host: Host) -> Path:
        return self.root / host.value

    def apply(self, host: Host, addins: dict[str, AppliedManifest]) -> None:
        d = self.folder(host)
        d.mkdir(parents=True, exist_ok=True)
        for addin_id, m in addins.items():
            target = d / f"{addin_id}.xml"
            if m.xml is None:
                # The caller passes no bytes for a file it saw intact (`current`); check it.
                if not _has_sha(target, m.sha256):
                    raise ValueError(f"no manifest XML for {addin_id} {m.version}")
                continue
            try:
                if target.read_bytes() == m.xml:
                    continue
            except OSError:
                pass
            fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".part")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(m.xml)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        for old in d.iterdir():
            if old.name.startswith(".tmp-"):
                old.unlink(missing_ok=True)  # left by a crash during an earlier apply
            elif _NAME.match(old.name) and old.name[:-4] not in addins:
                old.unlink(missing_ok=True)

    def current(self, host: Host) -> dict[str, str]:
        d = self.folder(host)
        if not d.is_dir():
            return {}
        return {
            f.name[:-4]: hashlib.sha256(f.read_bytes()).hexdigest()
            for f in d.iterdir()
            if _NAME.match(f.name)
        }

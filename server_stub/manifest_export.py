"""The server's stored manifests written out as a static folder that any web server or CDN
can serve to agents (`addin-server manifests export DIR`, agent setting `manifest_mirrors`).

Manifests are content-addressed and immutable, so the folder is flat: each one is the file
``DIR/<sha256>``. An agent asks a mirror for ``<base>/<sha256>`` and accepts the bytes only if
they hash to the sha256 of the signed catalog entry, so a stale, partial or tampered mirror can
delay a download (the agent falls through to the next mirror, then the server) but never
changes what is installed. Exports are incremental: a file already there with the right bytes
is left alone, a wrong one is rewritten, and every write is atomic (a web server never serves
half a manifest). Nothing is deleted: the server keeps every manifest it ever published, so a
URL once given out keeps working."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from server_stub.db import Database


class ExportError(Exception):
    """The folder cannot be written (one line, naming it)."""


@dataclass
class ExportResult:
    folder: str
    manifests: int = 0
    written: int = 0
    unchanged: int = 0
    repaired: list[str] = field(default_factory=list)
    """Files that were there with bytes that did not match their name: rewritten."""
    bytes_written: int = 0


def _sha256_of(path: Path) -> str | None:
    """The hash of the file at `path`; None when there is none, "" when it cannot be read."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None
    except OSError:
        return ""


def _write_atomically(path: Path, content: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # served by a web server running as another user
    os.replace(tmp, path)


async def stored_manifests(database: Database) -> list[tuple[str, bytes]]:
    """(sha256, content) of every manifest the server stores, checked against its name."""
    out: list[tuple[str, bytes]] = []
    for (sha,) in await database.rows("SELECT sha256 FROM manifests ORDER BY sha256"):
        content = await database.manifest(sha)
        # The database's key is the hash of its content; a row that disagrees (a damaged
        # database) must not reach a mirror under that name.
        if content is None or hashlib.sha256(content).hexdigest() != sha:
            raise ExportError(f"stored manifest {sha[:12]}… does not hash to its name")
        out.append((sha, content))
    return out


def write_folder(folder: Path, manifests: list[tuple[str, bytes]]) -> ExportResult:
    """Write `manifests` to ``folder/<sha256>``; see the module's docstring."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot create {folder}: {e.strerror or e}") from None
    result = ExportResult(str(folder))
    for sha, content in manifests:
        result.manifests += 1
        target = folder / sha
        present = _sha256_of(target)
        if present == sha:
            result.unchanged += 1
            continue
        try:
            _write_atomically(target, content)
        except OSError as e:
            raise ExportError(f"cannot write {target}: {e.strerror or e}") from None
        result.written += 1
        result.bytes_written += len(content)
        if present is not None:
            result.repaired.append(sha)
    return result

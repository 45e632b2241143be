"""Appliers: make a host app's add-in set real.

`apply(host, addins)` is given the COMPLETE set the host must have after a launch and
makes it so; it is idempotent, so re-running it after a crash converges.

Which applier a workstation uses is `agent.appliers.make_applier` (from config `applier`):
``memory`` (simulator, tests), ``folder`` (Linux, tests: a folder per host), ``mac`` (each
host's ``wef`` folder, `agent.applier_mac`) and ``windows`` (the per-user developer registry
values, `agent.applier_windows`). The file-writing ones place nothing for Outlook: Outlook
add-ins come from the user's mailbox (`MAILBOX`).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from addin_core.topics import Host

MAILBOX = (
    "Outlook add-ins are installed from your mailbox by Exchange/Microsoft 365; this agent "
    "tracks the entitlement but cannot place it locally"
)
"""What `why` and `doctor` say for Outlook with an applier that writes files: Office has no
documented local folder or registry value that makes Outlook load an add-in silently (the
developer registry value makes Outlook on Windows ask the user and then install it into the
mailbox), so the agent does not pretend to install it."""

UNPLACED = frozenset({Host.OUTLOOK})
"""Hosts whose add-ins no file-writing applier places (see `MAILBOX`)."""


@dataclass(frozen=True, slots=True)
class AppliedManifest:
    addin_id: str
    version: str
    sha256: str
    xml: bytes | None


@dataclass(slots=True)
class Survey:
    """What `doctor` reports about one host's add-in location."""

    host: Host
    location: str
    problems: list[str] = field(default_factory=list)
    """Why the agent could not write there (missing and not creatable, not writable)."""
    foreign: list[str] = field(default_factory=list)
    """Entries there the agent does not own (left alone), each described."""
    loads: list[str] = field(default_factory=list)
    """What the host will load from there at its next launch, each described."""
    note: str | None = None
    """Said instead of the above when the applier places nothing for this host."""


class ApplierUnavailable(RuntimeError):
    """The configured applier cannot work on this computer (e.g. the registry off Windows)."""


class Applier(Protocol):
    needs_xml: bool
    unplaced: frozenset[Host]
    """Hosts this applier does not put add-ins in (their `apply` only tidies up)."""

    def apply(self, host: Host, addins: dict[str, AppliedManifest]) -> None: ...

    def current(self, host: Host) -> dict[str, str]:
        """What the host would load right now: {addin_id: version or sha256}."""
        ...

    def survey(self, host: Host) -> Survey: ...


class MemoryApplier:
    """Keeps the applied set in memory (the simulator; tests)."""

    needs_xml = False
    unplaced: frozenset[Host] = frozenset()

    def __init__(self) -> None:
        self.hosts: dict[Host, dict[str, str]] = {}

    def apply(self, host: Host, addins: dict[str, AppliedManifest]) -> None:
        self.hosts[host] = {a: m.version for a, m in addins.items()}

    def current(self, host: Host) -> dict[str, str]:
        return dict(self.hosts.get(host, {}))

    def survey(self, host: Host) -> Survey:
        return Survey(host, "memory", loads=sorted(self.hosts.get(host, {})))


ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}"


SETTLED_NS = 1_000_000_000
"""A file's hash is remembered only if the file had not changed for this long when it was
read (see `HashMemo`): file times come from a coarse kernel clock (a few ms), so a file
rewritten within one tick of the read could otherwise keep every stat field and its old hash."""


class HashMemo:
    """sha256 of files, remembered while their stat fields stay the same.

    Every launch checks that the files the agent placed are intact. Reading and hashing them
    all each time (twice: `current`, then `write`) was most of a launch's work with 50
    add-ins. A file is read again whenever its inode, size, mtime or ctime differs from the
    read that was remembered; ctime cannot be set by a user (any write, rename or `utime`
    sets it to now), and a hash is remembered only for a file whose ctime was at least
    `SETTLED_NS` older than that read, so any change after the read shows in ctime."""

    def __init__(self) -> None:
        self._known: dict[str, tuple[tuple[int, int, int, int], str]] = {}

    def sha256(self, path: str) -> str | None:
        """The file's sha256; None when it cannot be read (gone, not a file, no access)."""
        try:
            st = os.stat(path)
            key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            known = self._known.get(path)
            if known is not None and known[0] == key:
                return known[1]
            now = time.time_ns()
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
        except OSError:
            self._known.pop(path, None)
            return None
        if st.st_ctime_ns < now - SETTLED_NS:
            self._known[path] = (key, digest)
        else:
            self._known.pop(path, None)
        return digest

    def keep_only(self, folder: str, names: set[str]) -> None:
        """Forget the files of `folder` not in `names` (removed since)."""
        prefix = folder + os.sep
        for path in [p for p in self._known if p.startswith(prefix)]:
            if path[len(prefix) :] not in names:
                del self._known[path]


def write_atomic(folder: Path, name: str, data: bytes, tmp_prefix: str) -> None:
    """Write `folder/name` so that a reader (Office) sees the old file or the new one, never
    half of one: a temporary file in the same folder, flushed to disk, renamed over it. A
    crash before the rename leaves the old file and a ``tmp_prefix*`` file to clean up."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=tmp_prefix, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def describe_manifest(path: Path, mine: bool = True) -> str:
    """A manifest file as doctor lists it: name, add-in id and version when readable."""
    from addin_core.manifest import ManifestError, parse_manifest  # lxml: doctor's only

    whose = "" if mine else ", not the agent's"
    try:
        m = parse_manifest(path.read_bytes())
    except (OSError, ManifestError):
        return f"{path.name} (not a readable manifest{whose})"
    return f"{path.name} ({m.display_name} {m.version}, id {m.id}{whose})"


def manifest_id(path: Path) -> str | None:
    from addin_core.manifest import ManifestError, parse_manifest  # lxml: not for `why`

    try:
        return parse_manifest(path.read_bytes()).id
    except (OSError, ManifestError):
        return None


class ManagedFolder:
    """A folder holding manifests, some of them the agent's (named by `file_name`, recognised
    by `owns`); only those are ever written or removed. Writes are atomic (`write_atomic`);
    temporary files start with `tmp_prefix` and are the agent's too."""

    def __init__(
        self,
        file_name: Callable[[str], str],
        owned_id: Callable[[str], str | None],
        tmp_prefix: str,
    ) -> None:
        self.file_name = file_name
        self.owned_id = owned_id
        self.tmp_prefix = tmp_prefix
        self._hashes = HashMemo()

    def sync(self, d: Path, addins: dict[str, AppliedManifest]) -> None:
        """Make the owned files of `d` exactly `addins`."""
        self.write(d, addins)
        self.prune(d, set(addins))

    def write(self, d: Path, addins: dict[str, AppliedManifest]) -> None:
        """Write the files of `addins` that are missing or differ; remove nothing."""
        if addins:
            d.mkdir(parents=True, exist_ok=True)
        folder = str(d)
        for addin_id, m in addins.items():
            name = self.file_name(addin_id)
            if m.xml is None:
                # The caller passes no bytes for a file it saw intact (`current`); check it.
                if self._hashes.sha256(os.path.join(folder, name)) != m.sha256:
                    raise ValueError(f"no manifest XML for {addin_id} {m.version}")
                continue
            target = d / name
            try:
                if target.read_bytes() == m.xml:
                    continue
            except OSError:
                pass
            write_atomic(d, name, m.xml, self.tmp_prefix)

    def prune(self, d: Path, keep: set[str]) -> None:
        """Remove the owned files of `d` whose add-in is not in `keep`, and temporary files
        left by a crash."""
        try:
            names = os.listdir(d)  # names, not Paths: a launch lists every file of the folder
        except (FileNotFoundError, NotADirectoryError):
            return
        for name in names:
            if name.startswith(self.tmp_prefix):
                (d / name).unlink(missing_ok=True)  # left by a crash during an earlier apply
                continue
            owned = self.owned_id(name)
            if owned is not None and owned not in keep:
                (d / name).unlink(missing_ok=True)

    def current(self, d: Path) -> dict[str, str]:
        """{addin_id: sha256} of the owned files in `d`."""
        out: dict[str, str] = {}
        folder = str(d)
        try:
            names = os.listdir(folder)
        except (FileNotFoundError, NotADirectoryError):  # nothing loaded from it
            return out
        owned = set()
        for name in names:
            addin_id = self.owned_id(name)
            if addin_id is not None:
                owned.add(name)
                sha = self._hashes.sha256(os.path.join(folder, name))
                if sha is not None:  # None: removed meanwhile, or unreadable: not loaded either
                    out[addin_id] = sha
        self._hashes.keep_only(folder, owned)
        return out

    def survey(self, host: Host, d: Path, location: str | None = None) -> Survey:
        """Whether `d` can be written, what in it is not ours, what the host loads from it."""
        s = Survey(host, location or str(d))
        s.problems = writable_problems(d)
        if not d.is_dir():
            return s
        files = sorted(d.iterdir(), key=lambda p: p.name)
        ours = {
            (self.owned_id(f.name) or "").lower(): f.name
            for f in files
            if self.owned_id(f.name) is not None
        }
        for f in files:
            if f.name.startswith(self.tmp_prefix):
                s.problems.append(f"{f.name}: left by an interrupted write (removed next launch)")
            elif self.owned_id(f.name) is not None:
                s.loads.append(describe_manifest(f))
            elif not f.name.startswith("."):
                s.foreign.append(f.name)
                if f.suffix == ".xml":
                    s.loads.append(describe_manifest(f, mine=False))
                    twin = ours.get((manifest_id(f) or "").lower())
                    if twin is not None:
                        s.foreign[-1] += f" (the same add-in as the agent's {twin})"
        return s


def writable_problems(d: Path) -> list[str]:
    """Why the agent could not write into folder `d` (empty when it can): it must exist and
    be writable, or its nearest existing parent must be, so that it can be created."""
    if d.is_dir():
        return [] if os.access(d, os.W_OK | os.X_OK) else [f"{d} is not writable by this user"]
    if d.exists():
        return [f"{d} exists but is not a folder"]
    parent = d.parent
    for _ in range(64):  # bounded: a path has far fewer parts
        if parent.exists() or parent == parent.parent:
            break
        parent = parent.parent
    if parent.is_dir() and os.access(parent, os.W_OK | os.X_OK):
        return []
    return [f"{d} does not exist and cannot be created ({parent} is not writable)"]


_FOLDER_NAME = re.compile(rf"^({ID_PATTERN})\.xml$")


class FolderApplier:
    """Writes verified manifests to ``<dir>/<Host>/<addin-id>.xml`` (Linux, tests). The
    folder is the agent's: every ``*.xml`` file named like an add-in id in it is the agent's.

    Each file is written to a temporary file in the same folder, flushed, and renamed over
    the old one, so a reader never sees a half-written manifest; files of add-ins no longer
    in the set are removed. Nothing is placed for Outlook (`MAILBOX`); a folder for it left by
    an earlier version is emptied at Outlook's next launch.
    """

    needs_xml = True
    unplaced = UNPLACED

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        self._files = ManagedFolder(
            lambda addin_id: f"{addin_id}.xml", folder_owned, tmp_prefix=".tmp-"
        )

    def folder(self, host: Host) -> Path:
        return self.root / host.value

    def apply(self, host: Host, addins: dict[str, AppliedManifest]) -> None:
        self._files.sync(self.folder(host), {} if host in self.unplaced else addins)

    def current(self, host: Host) -> dict[str, str]:
        return {} if host in self.unplaced else self._files.current(self.folder(host))

    def survey(self, host: Host) -> Survey:
        if host in self.unplaced:
            return Survey(host, str(self.folder(host)), note=MAILBOX)
        return self._files.survey(host, self.folder(host))


def folder_owned(name: str) -> str | None:
    m = _FOLDER_NAME.match(name)
    return m.group(1) if m else None

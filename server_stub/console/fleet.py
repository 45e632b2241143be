"""The fleet as the console shows it: every device's state per add-in, counted.

The server knows a device by its reports (`report/{client_id}`: the revision it holds, what
it applied, what it downloaded and waits to apply, its errors) and, with a PKI, by its
enrollment. Per add-in a device that belongs to an entitled user is

- **entitled**: its user is entitled (any mode);
- **notified**: its last report holds a revision at least that of the add-in's catalog
  entry (its current version and on/off state), or it has cached or applied it;
- **cached**: it reported the current version downloaded and waiting for its host, or applied;
- **applied**: it reported the current version applied on at least one host;
- **failed**: its last report lists the add-in in `failed` (or, from an older agent, names
  it in an error line); the reason is shown;
- **stale**: no report for `stale_after` seconds (or never, for an enrolled device).

Entitlement follows the assignments and their exclusions (an exclusion wins), and while a
rollout runs a device is due the version of the first ring of the catalog entry that reaches
its user (the entry's own version otherwise): *applied* and *cached* count that version.

`FleetView.refresh` reads what changed (the directory and catalog when the revision moved,
reports received since the last read) and recounts with set operations, never a loop over
users per add-in: 10,000 devices and 200 add-ins recount in well under a second (see
bench/bench_console.py). The counts are kept, with a timeline of their changes per add-in,
so a page load only reads them.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from server_stub.db import Database
from server_stub.entitlement import group_closure_members

COUNT_NAMES = ("entitled", "notified", "cached", "applied", "failed", "stale")
DEFAULT_STALE_AFTER = 24 * 3600.0
TIMELINE_POINTS = 720
"""Changes of counts kept per add-in for its timeline (in memory: it starts with `serve`)."""


@dataclass(frozen=True)
class Device:
    client_id: str
    user_id: str
    revision: int
    received_at: float | None
    """None: enrolled, never reported."""
    applied: dict[str, dict[str, str]]
    """add-in -> host -> version."""
    cached: frozenset[tuple[str, str]]
    """(add-in, version) downloaded and waiting for a host to start."""
    errors: tuple[str, ...]
    applied_keys: frozenset[tuple[str, str]] = frozenset()
    """(add-in, version) applied on any host: worked out once per report, not per count."""
    failures: tuple[tuple[str, str, str, str], ...] = ()
    """(add-in, version, host, reason) the report's `failed` names."""


@dataclass(frozen=True)
class AddinInfo:
    addin_id: str
    name: str
    version: str
    enabled: bool
    catalog_revision: int
    assignments: tuple[tuple[str, str, str], ...]
    """(target, target_id, mode)."""
    exceptions: tuple[tuple[int, str, str], ...] = ()
    """(index in `assignments`, "group" or "user", id): who that assignment excludes."""
    rings: tuple[tuple[str, tuple[str, ...], str], ...] = ()
    """While a rollout runs, the catalog entry's rings: (name, targets, version); a device
    is due the version of the first ring that reaches its user, else `version`."""


@dataclass
class Directory:
    """The directory and catalog at one revision: what entitlement needs."""

    revision: int
    users: frozenset[str]
    members: dict[str, list[str]]
    children: dict[str, list[str]]
    nested: bool
    addins: dict[str, AddinInfo]


@dataclass
class Counts:
    entitled: int = 0
    notified: int = 0
    cached: int = 0
    applied: int = 0
    failed: int = 0
    stale: int = 0

    def as_tuple(self) -> tuple[int, ...]:
        return tuple(getattr(self, n) for n in COUNT_NAMES)

    def as_dict(self) -> dict[str, int]:
        return {n: getattr(self, n) for n in COUNT_NAMES}


_EMPTY: frozenset[str] = frozenset()


@dataclass
class Snapshot:
    """The counts, and what a device's state per add-in is read from, at one moment. The
    per-add-in sets of devices by state are not kept: with 10,000 devices and 200 add-ins
    they would cost more to build than the counts themselves."""

    at: float
    counts: dict[str, Counts]
    devices: dict[str, Device]
    entitled: dict[str, frozenset[str] | set[str]]
    applied_by: dict[tuple[str, str], set[str]]
    cached_by: dict[tuple[str, str], set[str]]
    """(add-in, version) -> devices that downloaded it and have not applied it anywhere."""
    failed: dict[str, dict[str, list[str]]]
    """add-in -> device -> its error lines naming the add-in."""
    stale: set[str]
    addins: dict[str, AddinInfo]
    devices_of_user: dict[str, list[str]] = field(default_factory=dict)
    installing: dict[str, frozenset[str] | set[str]] = field(default_factory=dict)
    """add-in -> devices of users entitled to install it (fixed or optional, not excluded)."""
    ring_devices: dict[str, list[tuple[set[str], str]]] = field(default_factory=dict)
    """add-in -> (devices, version) of each ring of its catalog entry, first match first."""
    target_devices: Callable[[str], frozenset[str]] = field(default=lambda _t: frozenset())
    """A ring target (``everyone``, ``group:G``, ``user:U``) -> its devices."""
    failed_by: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    """(add-in, version) -> devices whose report says that version cannot be applied."""

    def due_version(self, addin_id: str, client_id: str) -> str:
        """The version a device should hold: its ring's while a rollout runs."""
        for devices, version in self.ring_devices.get(addin_id, ()):
            if client_id in devices:
                return version
        return self.addins[addin_id].version

    def state(self, addin_id: str, client_id: str) -> str:
        """One device's state for one add-in, the most telling first."""
        a = self.addins[addin_id]
        key = (addin_id, self.due_version(addin_id, client_id))
        if client_id in self.failed.get(addin_id, {}):
            return "failed"
        if client_id in self.applied_by.get(key, _EMPTY):
            return "applied"
        if client_id in self.cached_by.get(key, _EMPTY):
            return "cached"
        d = self.devices.get(client_id)
        if d is not None and d.received_at is not None and d.revision >= a.catalog_revision:
            return "notified"
        return "stale" if client_id in self.stale else "waiting"


def _failures(errors: Iterable[str], names: dict[str, str]) -> list[tuple[str, str]]:
    """(add-in id, line) for each report error naming an add-in: the agent writes
    "HOST NAME VERSION: reason" (agent/model.py `report`)."""
    found = []
    for line in errors:
        _, _, rest = line.partition(" ")
        for name, addin_id in names.items():
            if rest.startswith(name + " "):
                found.append((addin_id, line))
                break
    return found


def compute(directory: Directory, devices: dict[str, Device], now: float, stale_after: float) -> Snapshot:
    """Count every add-in's devices by state (pure: runs in a worker thread). Set
    operations only, each over the smaller side; no set of 10,000 is copied per add-in."""
    devices_of_user: dict[str, list[str]] = defaultdict(list)
    for d in devices.values():
        devices_of_user[d.user_id].append(d.client_id)
    all_devices = frozenset(devices)
    target_devices: dict[tuple[str, str], frozenset[str]] = {}

    def devices_of(target: str, target_id: str) -> frozenset[str]:
        key = (target, target_id)
        got = target_devices.get(key)
        if got is None:
            if target == "everyone":
                got = all_devices
            else:
                users = (
                    [target_id]
                    if target == "user"
                    else group_closure_members(
                        target_id, directory.members, directory.children, directory.nested
                    )
                )
                got = frozenset(c for u in users for c in devices_of_user.get(u, ()))
            target_devices[key] = got
        return got

    def ring_target(text: str) -> frozenset[str]:
        kind, _, ident = text.partition(":")
        return devices_of(kind, ident)

    applied_by: dict[tuple[str, str], set[str]] = defaultdict(set)
    cached_by: dict[tuple[str, str], set[str]] = defaultdict(set)
    failed_by: dict[tuple[str, str], set[str]] = defaultdict(set)
    failed: dict[str, dict[str, list[str]]] = defaultdict(dict)
    names = {a.name: a.addin_id for a in directory.addins.values()}
    stale: set[str] = set()
    by_revision: list[tuple[int, str]] = []
    for d in devices.values():
        for key in d.applied_keys:
            applied_by[key].add(d.client_id)
        for key in d.cached:
            if key not in d.applied_keys:
                cached_by[key].add(d.client_id)
        for addin_id, version, host, reason in d.failures:
            failed_by[(addin_id, version)].add(d.client_id)
            failed[addin_id].setdefault(d.client_id, []).append(f"{host} {version}: {reason}")
        if d.errors:
            # Agents older than the report's `failed` say it only in words.
            for addin_id, line in _failures(d.errors, names):
                lines = failed[addin_id].setdefault(d.client_id, [])
                if not any(line.endswith(x.split(" ", 1)[1]) for x in lines):
                    lines.append(line)
        if d.received_at is None or now - d.received_at > stale_after:
            stale.add(d.client_id)
        by_revision.append((-1 if d.received_at is None else d.revision, d.client_id))
    by_revision.sort()
    revisions = [r for r, _ in by_revision]
    ids = [c for _, c in by_revision]

    snap = Snapshot(now, {}, devices, {}, applied_by, cached_by, failed, stale,
                    dict(directory.addins), dict(devices_of_user), target_devices=ring_target,
                    failed_by=failed_by)  # fmt: skip
    for a in directory.addins.values():
        parts = [devices_of(t, tid) for t, tid, _ in a.assignments]
        ent: frozenset[str] | set[str] = (
            _EMPTY if not parts else parts[0] if len(parts) == 1 else set().union(*parts)
        )
        install_parts = [p for p, (_, _, m) in zip(parts, a.assignments, strict=True) if m != "available"]
        install: frozenset[str] | set[str] = (
            ent if len(install_parts) == len(parts) else set().union(*install_parts)
        )
        if a.exceptions:
            # An exclusion wins over every assignment of the add-in (for the users the
            # excluding assignment reaches).
            out: set[str] = set()
            for i, kind, ident in a.exceptions:
                out |= devices_of(kind, ident) & parts[i]
            ent, install = ent - out, install - out
        rings: list[tuple[set[str], str]] = []
        taken: set[str] = set()
        for _, targets, version in a.rings:
            ring = set().union(*(ring_target(t) for t in targets)) - taken
            taken |= ring
            rings.append((ring, version))
        if rings:
            snap.ring_devices[a.addin_id] = rings
        due = [(ent & r, v) for r, v in rings] + [(ent - taken if rings else ent, a.version)]
        applied = cached = 0
        done: set[str] = set()
        for part, version in due:
            applied_set = applied_by.get((a.addin_id, version), _EMPTY)
            cached_set = cached_by.get((a.addin_id, version), _EMPTY)
            n = len(part & applied_set)
            applied += n
            cached += n + len(part & cached_set)
            if rings:
                done |= (part & applied_set) | (part & cached_set)
        # Devices behind the add-in's catalog revision are few once a change has spread:
        # count those rather than the many that are not.
        behind = ids[: bisect.bisect_left(revisions, a.catalog_revision)]
        if rings:
            not_notified = sum(1 for c in behind if c in ent and c not in done)
        else:
            key = (a.addin_id, a.version)
            applied_set = applied_by.get(key, _EMPTY)
            cached_set = cached_by.get(key, _EMPTY)
            not_notified = sum(
                1 for c in behind if c in ent and c not in applied_set and c not in cached_set
            )
        snap.entitled[a.addin_id] = ent
        snap.installing[a.addin_id] = install
        snap.counts[a.addin_id] = Counts(
            len(ent), len(ent) - not_notified, cached, applied,
            sum(1 for c in failed.get(a.addin_id, {}) if c in ent), len(ent & stale),
        )  # fmt: skip
    return snap


def _parse_reports(rows: list[tuple[Any, ...]]) -> list[Device]:
    devices = []
    for r in rows:
        applied: dict[str, dict[str, str]] = defaultdict(dict)
        keys = set()
        for a in json.loads(r[4]):
            applied[a["addin_id"]][a["host"]] = a["version"]
            keys.add((a["addin_id"], a["version"]))
        devices.append(
            Device(
                str(r[0]), str(r[1]), int(r[2]), float(r[3]), dict(applied),
                frozenset((c["addin_id"], c["version"]) for c in json.loads(r[6])),
                tuple(json.loads(r[5])), frozenset(keys),
                tuple((f["addin_id"], f["version"], f["host"], f["reason"]) for f in json.loads(r[7])),
            )
        )
    return devices


DEVICE_STATES = ("failed", "applied", "cached", "notified", "stale", "waiting")


class FleetView:
    """The counts of one server's database, refreshed from what changed."""

    def __init__(
        self,
        database: Database,
        tenant: str,
        *,
        stale_after: float = DEFAULT_STALE_AFTER,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.database = database
        self.tenant = tenant
        self.stale_after = stale_after
        self.clock = clock
        self.directory: Directory | None = None
        self.devices: dict[str, Device] = {}
        self.snapshot: Snapshot | None = None
        self.version = 0
        """Bumped whenever a count changes: what the event stream waits on."""
        self.timeline: dict[str, deque[tuple[float, tuple[int, ...]]]] = {}
        self.changed = asyncio.Event()
        self._watermark = 0.0
        self._last_stale_check = 0.0
        self._lock = asyncio.Lock()

    async def _load_directory(self, revision: int) -> Directory:
        rows = self.database.rows
        users = frozenset(str(r[0]) for r in await rows("SELECT id FROM users"))
        members: dict[str, list[str]] = defaultdict(list)
        for g, u in await rows("SELECT group_id, user_id FROM memberships"):
            members[g].append(u)
        children: dict[str, list[str]] = defaultdict(list)
        for c, p in await rows("SELECT child, parent FROM nesting"):
            children[p].append(c)
        nested = bool(await rows("SELECT 1 FROM meta WHERE key='nested_groups' AND value='1'"))
        prefix = f"addins/v1/{self.tenant}/catalog/"
        catalog_rev: dict[str, int] = {}
        catalog_rings: dict[str, tuple[tuple[str, tuple[str, ...], str], ...]] = {}
        for t, r, payload in await rows(
            "SELECT topic, revision, payload FROM retained WHERE topic LIKE ?", (prefix + "%",)
        ):
            addin_id = str(t)[len(prefix) :]
            catalog_rev[addin_id] = int(r)
            entry = json.loads(bytes(payload))
            catalog_rings[addin_id] = tuple(
                (str(x["ring"]), tuple(x["targets"]), str(x["version"]))
                for x in entry.get("rings") or ()
            )
        assigns: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
        for a, t, tid, m in await rows(
            "SELECT addin_id, target, target_id, mode FROM assignments "
            "ORDER BY addin_id, target, target_id"
        ):
            assigns[a].append((t, tid, m))
        excepted: dict[str, list[tuple[int, str, str]]] = defaultdict(list)
        for a, t, tid, kind, ident in await rows(
            "SELECT addin_id, target, target_id, kind, id FROM assignment_exceptions"
        ):
            at = next((i for i, x in enumerate(assigns.get(a, ())) if x[:2] == (t, tid)), None)
            if at is not None:
                excepted[a].append((at, str(kind), str(ident)))
        addins = {}
        for r in await rows(
            "SELECT a.id, a.current_version, a.enabled, v.display_name FROM addins a "
            "JOIN addin_versions v ON v.addin_id=a.id AND v.version=a.current_version"
        ):
            addin_id = str(r[0])
            addins[addin_id] = AddinInfo(addin_id, str(r[3]), str(r[1]), bool(r[2]),
                                         catalog_rev.get(addin_id, 0),
                                         tuple(assigns.get(addin_id, ())),
                                         tuple(excepted.get(addin_id, ())),
                                         catalog_rings.get(addin_id, ()))  # fmt: skip
        return Directory(revision, users, dict(members), dict(children), nested, addins)

    async def _load_devices(self) -> bool:
        """Reports received since the last read (a few seconds of overlap: a batch's time
        is taken before its commit), and enrolled devices never heard from. The rows are
        parsed in a worker thread: 10,000 reports at once are ~0.5 s of JSON."""
        since = self._watermark - 5.0
        rows = await self.database.rows(
            "SELECT client_id, user_id, revision, received_at, applied, errors, cached, failed "
            "FROM reports WHERE received_at > ?",
            (since,),
        )
        known = self.devices
        fresh = [
            tuple(r) for r in rows
            if (d := known.get(str(r[0]))) is None
            or (d.received_at, d.revision) != (float(r[3]), int(r[2]))
        ]  # fmt: skip
        changed = False
        for d in await asyncio.to_thread(_parse_reports, fresh):
            self.devices[d.client_id] = d
            changed = True
        for r in rows:
            self._watermark = max(self._watermark, float(r[3]))
        for device_id, user_id in await self.database.rows(
            "SELECT device_id, user_id FROM devices WHERE revoked_at IS NULL"
        ):
            if device_id not in self.devices:
                self.devices[device_id] = Device(device_id, user_id, 0, None, {}, frozenset(), ())
                changed = True
        return changed

    async def refresh(self) -> bool:
        """Read what changed and recount; True when a count changed."""
        async with self._lock:
            revision = await self.database.revision()
            moved = self.directory is None or self.directory.revision != revision
            if moved:
                self.directory = await self._load_directory(revision)
            changed = await self._load_devices()
            now = self.clock()
            # Devices turn stale with time alone: recount now and then even when quiet.
            aging = now - self._last_stale_check > 30.0
            if not (moved or changed or aging or self.snapshot is None):
                return False
            self._last_stale_check = now
            assert self.directory is not None
            snap = await asyncio.to_thread(
                compute, self.directory, dict(self.devices), now, self.stale_after
            )
            before = self.snapshot
            self.snapshot = snap
            differs = before is None or moved or any(
                before.counts.get(a) != c for a, c in snap.counts.items()
            )
            if differs:
                self._sample(snap)
                self.version += 1
                self.changed.set()
                self.changed = asyncio.Event()
            return differs

    def _sample(self, snap: Snapshot) -> None:
        for addin_id, c in snap.counts.items():
            line = self.timeline.setdefault(addin_id, deque(maxlen=TIMELINE_POINTS))
            if not line or line[-1][1] != c.as_tuple():
                line.append((snap.at, c.as_tuple()))

    def counts(self) -> dict[str, dict[str, int]]:
        snap = self.snapshot
        return {} if snap is None else {a: c.as_dict() for a, c in snap.counts.items()}

    def devices_of(self, addin_id: str, state: str | None, offset: int, limit: int) -> tuple[int, list[dict[str, Any]]]:
        """One page of an add-in's devices (of one state, or all): (how many, the page)."""
        snap = self.snapshot
        if snap is None:
            return 0, []
        everyone = sorted(snap.entitled.get(addin_id, ()))
        if state is None:
            rows = [(c, "") for c in everyone]
        else:
            rows = [(c, state) for c in everyone if snap.state(addin_id, c) == state]
        page = []
        for client_id, s in rows[offset : offset + limit]:
            s = s or snap.state(addin_id, client_id)
            d = snap.devices.get(client_id)
            page.append(
                {
                    "client_id": client_id,
                    "user_id": d.user_id if d else "",
                    "state": s,
                    "versions": sorted(set(d.applied.get(addin_id, {}).values())) if d else [],
                    "received_at": d.received_at if d else None,
                    "errors": snap.failed.get(addin_id, {}).get(client_id, []),
                }
            )
        return len(rows), page

    def rollout_rings(
        self, addin_id: str, rings: Sequence[tuple[str, Sequence[str]]], version: str
    ) -> list[dict[str, Any]]:
        """Per ring of a rollout: the devices of its users that are to install the add-in
        (a user counts in the first ring that reaches them, as the gate counts), how many
        applied the rollout's version, how many report it failed."""
        snap = self.snapshot
        if snap is None or addin_id not in snap.addins:
            return []
        install = snap.installing.get(addin_id, _EMPTY)
        applied = snap.applied_by.get((addin_id, version), _EMPTY)
        failed = snap.failed_by.get((addin_id, version), _EMPTY)
        taken: set[str] = set()
        out = []
        for name, targets in rings:
            devices = set().union(*(snap.target_devices(t) for t in targets)) - taken
            taken |= devices
            mine = devices & install
            out.append({"name": name, "targets": list(targets), "devices": len(mine),
                        "applied": len(mine & applied), "failed": len(mine & failed)})  # fmt: skip
        return out

    def failures(self, addin_id: str, limit: int = 50) -> list[tuple[str, str, str]]:
        """(device, user, line) of the add-in's failures, at most `limit`."""
        snap = self.snapshot
        if snap is None:
            return []
        out: list[tuple[str, str, str]] = []
        for client_id, lines in sorted(snap.failed.get(addin_id, {}).items())[:limit]:
            d = self.devices.get(client_id)
            out.extend((client_id, d.user_id if d else "", line) for line in lines)
        return out[:limit]

    def devices_of_user(self, user_id: str) -> list[Device]:
        return sorted(
            (d for d in self.devices.values() if d.user_id == user_id), key=lambda d: d.client_id
        )

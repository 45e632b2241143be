"""Pending changes per host: what the next launch of each host app will do, and why
anything waits. Pure: computed from entitlements, the installed set, the manifests held
and the user's own choices.

Rules:
* an add-in is wanted in a host when it is entitled there and its mode says so: fixed
  always, optional unless the user removed it, available only if the user installed it;
* an update needs a strictly greater version: a lower version is applied only when the
  catalog marks it as the admin's rollback (`Entitlement.rollback`), never otherwise;
* a change needs a verified manifest; a refused one waits with its reason and the
  installed version stays;
* a manifest whose permissions or hosts differ from what the catalog entry (the version
  the admin consented to) declares waits as ``needs_consent``; the installed version stays;
* removal happens only because the entitlement changed through an explicit message (the
  caller passes the reason), never because data is missing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from addin_core.topics import Host, Mode
from addin_core.version import is_newer
from agent.resolver import Entitlement

Action = Literal["install", "update", "remove"]
PendingState = Literal["ready", "waiting", "needs_consent"]


@dataclass(frozen=True, slots=True)
class ManifestRecord:
    """A manifest this agent fetched: verified (usable) or refused (with the reason)."""

    sha256: str
    addin_id: str
    version: str
    status: Literal["verified", "refused"]
    reason: str | None
    permissions: str | None
    hosts: tuple[Host, ...]
    fetched_at: float


@dataclass(frozen=True, slots=True)
class InstalledAddin:
    host: Host
    addin_id: str
    name: str
    version: str
    sha256: str
    permissions: str
    hosts: tuple[Host, ...]
    installed_at: float
    revision: int


@dataclass(frozen=True, slots=True)
class PendingChange:
    host: Host
    addin_id: str
    name: str
    action: Action
    from_version: str | None
    to_version: str | None
    sha256: str | None
    state: PendingState
    reason: str
    since: float = 0.0
    revision: int = 0
    committed_at: float | None = None

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def same_change(self, other: PendingChange) -> bool:
        """Same target (action, versions, manifest): the stamps of `other` carry over."""
        return (self.action, self.to_version, self.sha256) == (
            other.action,
            other.to_version,
            other.sha256,
        )

    def stamped(self, since: float, revision: int, committed_at: float | None) -> PendingChange:
        # dataclasses.replace() introspects the fields on every call; this runs for every
        # pending change of every transition.
        return PendingChange(
            self.host,
            self.addin_id,
            self.name,
            self.action,
            self.from_version,
            self.to_version,
            self.sha256,
            self.state,
            self.reason,
            since,
            revision,
            committed_at,
        )

    def content(self) -> tuple[object, ...]:
        return (
            self.action,
            self.from_version,
            self.to_version,
            self.sha256,
            self.state,
            self.reason,
            self.name,
        )


PendingKey = tuple[Host, str]


def next_start(hosts: Iterable[Host] | Iterable[str]) -> str:
    """The words for the hosts' next start: "when Word next starts", "when Word and Excel
    next start"."""
    names = [str(h) for h in hosts]
    if len(names) == 1:
        return f"when {names[0]} next starts"
    return f"when {', '.join(names[:-1])} and {names[-1]} next start"


def wanted(ent: Entitlement, choices: Mapping[str, str]) -> bool:
    choice = choices.get(ent.addin_id)
    if ent.mode == Mode.FIXED:
        return True
    if ent.mode == Mode.OPTIONAL:
        return choice != "remove"
    return choice == "install"


def consent_problem(ent: Entitlement, rec: ManifestRecord) -> str | None:
    """Why this manifest may not be applied without (new) admin consent, or None."""
    problems = []
    if rec.permissions is not None and rec.permissions != ent.permissions:
        problems.append(
            f"its manifest asks for permission {rec.permissions}, the consented level is {ent.permissions}"
        )
    if rec.hosts and set(rec.hosts) != set(ent.catalog_hosts):
        problems.append(
            f"its manifest lists hosts {', '.join(rec.hosts)}, "
            f"the consented hosts are {', '.join(ent.catalog_hosts)}"
        )
    return "; ".join(problems) or None


def _is_newer(candidate: str, current: str) -> bool:
    return bool(is_newer(candidate, current))


def plan(
    entitlements: Mapping[str, Entitlement],
    installed: Mapping[Host, Mapping[str, InstalledAddin]],
    manifests: Mapping[str, ManifestRecord],
    choices: Mapping[str, str],
    hosts: Iterable[Host],
    removal_reason: Callable[[str, Host], str],
    fetch_errors: Mapping[str, str] | None = None,
) -> dict[PendingKey, PendingChange]:
    """The pending change of every (host, add-in) that differs from what is installed."""
    fetch_errors = fetch_errors or {}
    out: dict[PendingKey, PendingChange] = {}
    for host in hosts:
        have = installed.get(host, {})
        want = {a: e for a, e in entitlements.items() if host in e.hosts and wanted(e, choices)}
        for addin_id, ent in want.items():
            cur = have.get(addin_id)
            rollback = (
                cur is not None and ent.rollback is not None and _is_newer(cur.version, ent.version)
            )
            if cur is not None and (
                cur.sha256 == ent.sha256 or not (_is_newer(ent.version, cur.version) or rollback)
            ):
                # Same manifest, the same version re-published, or a lower version that is
                # no rollback: the installed one stays (`why` says so).
                continue
            action: Action = "update" if cur else "install"
            rec = manifests.get(ent.sha256)
            state: PendingState
            if rec is None:
                state = "waiting"
                err = fetch_errors.get(ent.sha256)
                reason = "manifest not downloaded yet" + (f" (last attempt: {err})" if err else "")
            elif rec.status == "refused":
                state = "waiting"
                reason = f"manifest {ent.version} was refused: {rec.reason}"
            elif (problem := consent_problem(ent, rec)) is not None:
                state = "needs_consent"
                reason = f"needs admin consent: {problem}"
            else:
                state = "ready"
                reason = f"applies when {host} next starts"
                if rollback:
                    reason = f"the admin's rollback (revision {ent.rollback}) {reason}"
            out[(host, addin_id)] = PendingChange(
                host=host,
                addin_id=addin_id,
                name=ent.name,
                action=action,
                from_version=cur.version if cur else None,
                to_version=ent.version,
                sha256=ent.sha256,
                state=state,
                reason=reason,
            )
        for addin_id, cur in have.items():
            if addin_id not in want:
                out[(host, addin_id)] = PendingChange(
                    host=host,
                    addin_id=addin_id,
                    name=cur.name,
                    action="remove",
                    from_version=cur.version,
                    to_version=None,
                    sha256=None,
                    state="ready",
                    reason=removal_reason(addin_id, host),
                )
    return out


def carry_stamps(
    new: dict[PendingKey, PendingChange],
    old: Mapping[PendingKey, PendingChange],
    now: float,
    revision: int,
    committed_at: float | None,
) -> dict[PendingKey, PendingChange]:
    """Stamp new pending changes with the cause (revision, commit time) and keep the
    original stamps of changes that only moved from waiting to ready."""
    out: dict[PendingKey, PendingChange] = {}
    for key, p in new.items():
        prev = old.get(key)
        if prev is not None and prev.same_change(p):
            out[key] = p.stamped(prev.since, prev.revision, prev.committed_at)
        else:
            out[key] = p.stamped(now, revision, committed_at)
    return out

"""The agent's working model and its state transitions, without I/O.

`AgentModel` holds what the daemon knows in memory (the received state, entitlements,
manifests, installed sets, pending changes, the user's choices). Each transition — a
message accepted, a manifest recorded, a fetch failed, a launch staged, a user's choice —
updates the model and writes the matching rows and events into a `Tx`, which the daemon
(agent/daemon.py) commits as ONE transaction under its lock.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from dataclasses import dataclass

from addin_core.protocol import (
    AgentReport,
    AnyPayload,
    AppliedAddin,
    FailedAddin,
    Host,
    Mode,
    Tombstone,
    Topic,
    TopicKind,
    decode,
)
from addin_runtime.cli_support import did_you_mean
from agent.cache import CachedRows, Tx
from agent.cache_rows import (
    entitlement_row,
    former_name_row,
    installed_record,
    installed_row,
    lost_row,
    manifest_record,
    manifest_row,
    pending_record,
    pending_row,
    received_row,
    received_state,
)
from agent.losses import lost_reach, may_take_reach
from agent.pending import (
    InstalledAddin,
    ManifestRecord,
    PendingChange,
    PendingKey,
    carry_stamps,
    next_start,
    plan,
)
from agent.resolver import Entitlement, explain, reach, resolve
from agent.state import ReceivedState
from agent.subscriptions import ancestry


class AgentRefusal(Exception):
    """A user request the agent refuses (e.g. removing a fixed add-in); the message says why."""


@dataclass(frozen=True, slots=True)
class UserChoice:
    """What a user's install/remove request records (`record` False: nothing to record)
    and the answer the user reads."""

    addin_id: str
    choice: str | None
    """"install"/"remove", or None to clear an earlier choice."""
    detail: str
    answer: str
    record: bool = True


class AgentModel:
    def __init__(self, tenant: str, user_id: str, hosts: tuple[Host, ...]) -> None:
        self.user_id = user_id
        self.hosts = hosts
        self.state = ReceivedState(tenant)
        self.ents: dict[str, Entitlement] = {}
        self.manifests: dict[str, ManifestRecord] = {}
        self.installed: dict[Host, dict[str, InstalledAddin]] = {}
        self.pending: dict[PendingKey, PendingChange] = {}
        self.choices: dict[str, str] = {}
        self.fetch_errors: dict[str, str] = {}

    def load(self, rows: CachedRows) -> None:
        self.state = received_state(rows.received, self.state.tenant)
        for r in rows.manifests:
            m = manifest_record(r)
            self.manifests[m.sha256] = m
        for r in rows.installed:
            i = installed_record(r)
            self.installed.setdefault(i.host, {})[i.addin_id] = i
        for r in rows.pending:
            p = pending_record(r)
            self.pending[(p.host, p.addin_id)] = p
        for r in rows.choices:
            self.choices[r["addin_id"]] = r["choice"]
        for addin_id in rows.entitled_ids:
            # Placeholder so the first recompute writes only real differences.
            self.ents[addin_id] = None  # type: ignore[assignment]

    # -- resolution ----------------------------------------------------------------------------
    def removal_reason(self, addin_id: str, host: Host) -> str:
        ent = self.ents.get(addin_id)
        if ent is not None:
            if host not in ent.hosts:
                return f"it no longer supports {host}"
            if ent.mode == Mode.OPTIONAL:
                return "you removed it"
            return "it is now only available (not installed by default)"
        x = explain(self.state, self.user_id, addin_id, self.hosts)
        if x.entry is None:
            return "the admin removed it from the catalog"
        if x.excluded is not None:
            return f"you are {x.excluded.describe()}"
        if not x.entry.enabled:
            return "the admin turned it off"
        if x.blocked:
            return "it now reaches you only through a nested group, and nesting is disabled"
        return "no assignment reaches you any more"

    def recompute(self, tx: Tx, revision: int, committed_at: float | None) -> None:
        """Re-resolve entitlements and pending changes; write the differences into `tx`."""
        ents = resolve(self.state, self.user_id, self.hosts)
        old, self.ents = self.ents, ents
        for addin_id, e in ents.items():
            if tx.rows and old.get(addin_id) != e:
                tx.upsert("entitlements", entitlement_row(e, tx.now))
        for addin_id in old.keys() - ents.keys():
            tx.delete("entitlements", addin_id=addin_id)
            tx.event("unentitled", "no longer entitled", addin_id=addin_id, revision=revision)
        new = plan(
            ents,
            self.installed,
            self.manifests,
            self.choices,
            self.hosts,
            self.removal_reason,
            self.fetch_errors,
        )
        new = carry_stamps(new, self.pending, tx.now, revision, committed_at)
        for key, p in new.items():
            prev = self.pending.get(key)
            if tx.rows and (prev is None or prev.content() != p.content() or prev.since != p.since):
                tx.upsert("pending", pending_row(p))
                tx.event(
                    "pending",
                    f"{p.action} {p.from_version or ''}→{p.to_version or ''}: {p.state}, {p.reason}",
                    addin_id=p.addin_id,
                    host=p.host.value,
                    revision=p.revision,
                )
        for key in self.pending.keys() - new.keys():
            tx.delete("pending", host=key[0].value, addin_id=key[1])
        self.pending = new

    # -- transitions ---------------------------------------------------------------------------
    def accept(self, tx: Tx, topic: Topic, payload: AnyPayload) -> bool:
        """Take a message newer than the one held for its topic; False (nothing written)
        when it is not newer."""
        # What `why` must still say after this message: the add-ins whose last assignment it
        # may take away, and the name of a catalog entry it may rename or remove.
        before = reach(self.state, self.user_id) if may_take_reach(topic, payload) else None
        old = (
            self.state.catalog.get(topic.addin_id or "")
            if topic.kind == TopicKind.CATALOG
            else None
        )
        if not self.state.apply(topic, payload):
            return False
        rev = int(getattr(payload, "revision", 0))
        at = getattr(payload, "committed_at", None) or tx.now
        new_entry = self.state.catalog.get(topic.addin_id or "")
        if old is not None and (new_entry is None or new_entry.name != old.name):
            tx.upsert("former_names", former_name_row(old.addin_id, old.name, rev, at))
        if tx.rows:
            tx.upsert("received", received_row(topic, self.state.held[topic], tx.now))
            tx.event(
                "received",
                str(topic).split("/", 3)[3]
                + (" (deleted)" if isinstance(payload, Tombstone) else ""),
                addin_id=topic.addin_id,
                revision=rev,
            )
        tx.sync("last_message_at", tx.now)
        tx.sync("revision", self.state.revision)
        if topic.kind in (TopicKind.MEMBER, TopicKind.GROUP_PARENTS):
            self._forget_foreign_groups(tx, rev)
        if before is not None and tx.rows:
            for addin_id, loss in lost_reach(before, self.state, self.user_id).items():
                tx.upsert("lost", lost_row(addin_id, loss, rev, at))
        self.recompute(tx, rev, getattr(payload, "committed_at", None))
        return True

    def _forget_foreign_groups(self, tx: Tx, revision: int) -> None:
        """Drop the topics of groups the user is no longer in (directly or nested)."""
        keep = ancestry(self.state, self.user_id)
        held_groups = {t.group_id for t in self.state.held if t.group_id is not None}
        gone = {g for g in held_groups if g not in keep}
        for t in self.state.forget_groups(gone):
            tx.delete("received", topic=str(t))
        if gone:
            tx.event("left_groups", ", ".join(sorted(gone)), revision=revision)

    def record_manifest(
        self, tx: Tx, m: ManifestRecord, xml: bytes | None, keep_xml: bool, revision: int
    ) -> None:
        self.manifests[m.sha256] = m
        self.fetch_errors.pop(m.sha256, None)
        tx.upsert("manifests", manifest_row(m, xml, keep_xml))
        if m.status == "verified":
            detail = f"{m.version} sha256 {m.sha256[:12]}…"
            tx.event("manifest_verified", detail, addin_id=m.addin_id, revision=revision)
        else:
            tx.event("manifest_refused", m.reason or "", addin_id=m.addin_id, revision=revision)

    def next_set(self, host: Host) -> dict[str, tuple[str, str]]:
        """What `host` loads at its next start once its ready changes are written:
        {addin_id: (version, sha256)}."""
        out = {a: (i.version, i.sha256) for a, i in self.installed.get(host, {}).items()}
        for (h, a), p in self.pending.items():
            if h != host or not p.ready:
                continue
            if p.action == "remove":
                out.pop(a, None)
            elif p.to_version is not None and p.sha256 is not None:
                out[a] = (p.to_version, p.sha256)
        return out

    def stage_launch(
        self, tx: Tx, host: Host, only: set[str] | None = None
    ) -> tuple[dict[str, InstalledAddin], list[PendingChange]]:
        """Write `host`'s ready changes (those of add-ins in `only`, when given) into `tx`;
        return the installed set they make and the changes. The model changes only in
        `finish_launch`, once the applier succeeded."""
        new = dict(self.installed.get(host, {}))
        applied: list[PendingChange] = []
        for p in [p for (h, _), p in self.pending.items() if h == host and p.ready]:
            if only is not None and p.addin_id not in only:
                continue
            if p.action == "remove":
                new.pop(p.addin_id, None)
                tx.delete("installed", host=host.value, addin_id=p.addin_id)
            else:
                inst = self._installing(host, p, tx.now)
                new[p.addin_id] = inst
                tx.upsert("installed", installed_row(inst))
            tx.delete("pending", host=host.value, addin_id=p.addin_id)
            tx.event(
                "applied",
                f"{p.action} {p.from_version or ''}→{p.to_version or ''} at {host} launch",
                addin_id=p.addin_id,
                host=host.value,
                revision=p.revision,
            )
            applied.append(p)
        return new, applied

    def _installing(self, host: Host, p: PendingChange, now: float) -> InstalledAddin:
        ent = self.ents[p.addin_id]
        rec = self.manifests[ent.sha256]
        return InstalledAddin(
            host,
            p.addin_id,
            ent.name,
            ent.version,
            ent.sha256,
            ent.permissions,
            rec.hosts or ent.catalog_hosts,
            now,
            p.revision,
        )

    def finish_launch(
        self,
        tx: Tx,
        host: Host,
        new: dict[str, InstalledAddin],
        applied: list[PendingChange],
        how: str = "",
    ) -> None:
        tx.event(
            "launch",
            f"{host} started{how}: {len(applied)} change(s) applied",
            host=host.value,
            revision=self.state.revision,
        )
        tx.sync(f"last_launch_{host.value}", tx.now)
        self.installed[host] = new
        for p in applied:
            self.pending.pop((host, p.addin_id), None)
        if applied:  # an empty launch changes no entitlement or other host's pending
            self.recompute(tx, self.state.revision, None)

    def set_choice(self, tx: Tx, addin_id: str, choice: str | None, detail: str) -> None:
        if choice is None:
            self.choices.pop(addin_id, None)
            tx.delete("choices", addin_id=addin_id)
        else:
            self.choices[addin_id] = choice
            tx.upsert("choices", {"addin_id": addin_id, "choice": choice, "at": tx.now})
        tx.event("user_choice", detail, addin_id=addin_id, revision=self.state.revision)
        self.recompute(tx, self.state.revision, None)

    # -- the user's requests -------------------------------------------------------------------
    def find_addin(self, name_or_id: str) -> str:
        """Resolve a user's spelling (id or display name, any case) to an add-in id."""
        if name_or_id in self.state.catalog or name_or_id in self.ents:
            return name_or_id
        low = name_or_id.lower()
        for a, e in self.state.catalog.items():
            if a.lower() == low or e.name.lower() == low:
                return a
        raise AgentRefusal(
            f"no add-in called {name_or_id!r} is in this computer's catalog"
            + did_you_mean(name_or_id, [e.name for e in self.state.catalog.values()])
        )

    def install_choice(self, name_or_id: str) -> UserChoice:
        """What the user installing `name_or_id` (an available or removed optional add-in)
        records."""
        addin_id = self.find_addin(name_or_id)
        ent = self.ents.get(addin_id)
        if ent is None:
            raise AgentRefusal(f"{name_or_id} is not assigned to you; ask your admin")
        if ent.mode == Mode.FIXED:
            answer = f"{ent.name} is fixed by your admin: it is always installed"
            return UserChoice(addin_id, None, "", answer, record=False)
        answer = f"{ent.name} will be installed {next_start(ent.hosts)}"
        if ent.mode == Mode.OPTIONAL:
            return UserChoice(addin_id, None, "user takes back an optional add-in", answer)
        return UserChoice(addin_id, "install", "user installs an available add-in", answer)

    def remove_choice(self, name_or_id: str) -> UserChoice:
        """As `install_choice`, for the user removing `name_or_id` (a fixed one is refused)."""
        addin_id = self.find_addin(name_or_id)
        ent = self.ents.get(addin_id)
        if ent is None:
            raise AgentRefusal(
                f"{name_or_id} is not assigned to you, so there is nothing to remove"
            )
        if ent.mode == Mode.FIXED:
            raise AgentRefusal(
                f"{ent.name} is deployed as fixed by your admin and cannot be removed"
            )
        answer = f"{ent.name} will be removed {next_start(ent.hosts)}"
        if ent.mode == Mode.OPTIONAL:
            return UserChoice(addin_id, "remove", "user removes an optional add-in", answer)
        return UserChoice(addin_id, None, "user removes an available add-in", answer)

    def report(self, client_id: str) -> AgentReport:
        """What this computer has, for the server (and what waits for a reason other than
        a download in progress)."""
        applied = [
            AppliedAddin(addin_id=a, version=i.version, host=h)
            for h, s in sorted(self.installed.items())
            for a, i in sorted(s.items())
        ]
        stuck = [
            p
            for p in self.pending.values()
            if p.state != "ready" and not p.reason.startswith("manifest not downloaded")
        ]
        errors = [f"{p.host} {p.name} {p.to_version}: {p.reason}"[:500] for p in stuck][:100]
        # Per add-in, for rollout gates: which version this computer cannot apply, and why.
        failed = [
            FailedAddin(
                addin_id=p.addin_id, version=p.to_version, host=p.host, reason=p.reason[:500]
            )
            for p in stuck
            if p.to_version is not None
        ][:800]
        cached = [
            AppliedAddin(addin_id=p.addin_id, version=p.to_version, host=p.host)
            for p in self.pending.values()
            if p.ready and p.action != "remove" and p.to_version is not None
        ]
        return AgentReport(
            client_id=client_id,
            user_id=self.user_id,
            revision=self.state.revision,
            reported_at=time.time(),
            applied=applied[:4000],
            errors=errors,
            failed=failed or None,
            cached=cached[:4000],
        )

    def installed_versions(self) -> Mapping[Host, dict[str, str]]:
        return {h: {a: i.version for a, i in s.items()} for h, s in self.installed.items() if s}


_DECODED_MAX = 1024
_DECODED_MAX_BYTES = 4096
"""Only small payloads are remembered: 1,024 of them stay under 5 MB whatever is sent."""


@functools.lru_cache(maxsize=_DECODED_MAX)
def _decode_remembered(topic: Topic, payload: bytes) -> AnyPayload:
    return decode(topic, payload)  # a refusal is raised, never remembered


def decode_remembered(topic: Topic, payload: bytes) -> AnyPayload:
    """`decode`, remembering recent results: payloads are immutable models, and a process
    running many agents (the simulator) receives the same message once per agent."""
    if len(payload) > _DECODED_MAX_BYTES:
        return decode(topic, payload)
    return _decode_remembered(topic, payload)

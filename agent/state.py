"""The retained state this agent has received, with the revision held per topic. Pure.

`ReceivedState.apply` is the single gate every message passes: a message whose revision
is not newer than the one held for its topic is ignored (duplicates, QoS 1 redelivery,
queued-while-offline messages that arrive after fresher retained state).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from addin_core.topics import Topic, TopicKind

if TYPE_CHECKING:
    # Types only: the read-only commands rebuild this state from the cache without pydantic
    # (`agent.cache_payloads`), so nothing here may depend on the model classes at run time.
    from addin_core.protocol import AnyPayload, Assignment, CatalogEntry, Policy


def is_tombstone(payload: AnyPayload) -> bool:
    """A retained deletion (a `Tombstone`, or its rebuilt form from the cache)."""
    return getattr(payload, "deleted", False) is True


@dataclass(slots=True)
class Held:
    """What the agent holds for one topic: the payload (None after a tombstone)."""

    revision: int
    committed_at: float | None
    payload: AnyPayload


@dataclass(slots=True)
class ReceivedState:
    tenant: str
    held: dict[Topic, Held] = field(default_factory=dict)
    catalog: dict[str, CatalogEntry] = field(default_factory=dict)
    assign_everyone: dict[str, Assignment] = field(default_factory=dict)
    assign_group: dict[str, dict[str, Assignment]] = field(default_factory=dict)
    assign_user: dict[str, dict[str, Assignment]] = field(default_factory=dict)
    membership: dict[str, list[str]] = field(default_factory=dict)
    parents: dict[str, list[str]] = field(default_factory=dict)
    policy: Policy | None = None

    @property
    def revision(self) -> int:
        """Highest tenant revision held on any topic (0 when nothing was received)."""
        return max((h.revision for h in self.held.values()), default=0)

    @property
    def nested_groups(self) -> bool:
        return bool(self.policy and self.policy.nested_groups)

    def revision_of(self, topic: Topic) -> int:
        h = self.held.get(topic)
        return h.revision if h else 0

    def is_newer(self, topic: Topic, payload: AnyPayload) -> bool:
        rev = getattr(payload, "revision", 0)
        return bool(rev > self.revision_of(topic))

    def apply(self, topic: Topic, payload: AnyPayload) -> bool:
        """Take `payload` for `topic` if its revision is newer than the one held.

        Returns True when the state changed. Reports and foreign tenants are ignored.
        """
        if topic.tenant != self.tenant or topic.kind == TopicKind.REPORT:
            return False
        if not self.is_newer(topic, payload):
            return False
        deleted = is_tombstone(payload)
        k = TopicKind
        match topic.kind:
            case k.CATALOG:
                _put(self.catalog, topic.addin_id, payload, deleted)
            case k.ASSIGN_EVERYONE:
                _put(self.assign_everyone, topic.addin_id, payload, deleted)
            case k.ASSIGN_GROUP:
                assert topic.group_id is not None
                bucket = self.assign_group.setdefault(topic.group_id, {})
                _put(bucket, topic.addin_id, payload, deleted)
                if not bucket:
                    del self.assign_group[topic.group_id]
            case k.ASSIGN_USER:
                assert topic.user_id is not None
                ubucket = self.assign_user.setdefault(topic.user_id, {})
                _put(ubucket, topic.addin_id, payload, deleted)
                if not ubucket:
                    del self.assign_user[topic.user_id]
            case k.MEMBER:
                assert topic.user_id is not None
                if deleted:
                    self.membership.pop(topic.user_id, None)
                else:
                    self.membership[topic.user_id] = list(payload.groups)  # type: ignore[union-attr]
            case k.GROUP_PARENTS:
                assert topic.group_id is not None
                if deleted:
                    self.parents.pop(topic.group_id, None)
                else:
                    self.parents[topic.group_id] = list(payload.parents)  # type: ignore[union-attr]
            case k.POLICY:
                if deleted:
                    return False
                self.policy = payload  # type: ignore[assignment]
        self.held[topic] = Held(
            getattr(payload, "revision", 0), getattr(payload, "committed_at", None), payload
        )
        return True

    def forget_groups(self, groups: set[str]) -> list[Topic]:
        """Drop everything held about `groups` (left or no longer in the ancestry).

        Their topics are unsubscribed, so holding them would only go stale; on rejoining,
        the broker's retained messages bring them back. Returns the forgotten topics.
        """
        gone = [
            t
            for t in self.held
            if t.kind in (TopicKind.ASSIGN_GROUP, TopicKind.GROUP_PARENTS) and t.group_id in groups
        ]
        for t in gone:
            del self.held[t]
        for g in groups:
            self.assign_group.pop(g, None)
            self.parents.pop(g, None)
        return gone

    def is_tombstoned(self, topic: Topic) -> bool:
        h = self.held.get(topic)
        return bool(h and is_tombstone(h.payload))


def _put(
    table: dict[str, Any],
    key: str | None,
    payload: AnyPayload,
    deleted: bool,
) -> None:
    assert key is not None
    if deleted:
        table.pop(key, None)
    else:
        table[key] = payload

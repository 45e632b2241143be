"""Payloads read back from this agent's own cache, rebuilt without pydantic.

Every row of the cache's ``received`` table was validated by `addin_core.protocol.decode`
when it arrived, and written back as the model's own JSON. The read-only commands (`why`,
`report-bundle`) rebuild the state held from those rows; validating them again would cost
each call 60-75 ms of pydantic imports and schema building, more than the whole answer is
allowed to take (issue 14: ≤ 100 ms per command). So they rebuild frozen dataclasses with the
same field names and the same value types (enums, lists) as the protocol's models; the daemon
and everything that reads the wire keep validating with the models.

The dataclasses must stay field-for-field equal to the models: `tests/test_cache_payloads.py`
compares them, so a field added to the protocol fails that test until it is added here.
A row that does not have the expected shape (only a hand edit makes one) raises
`UnreadableRow`, and the caller skips it as it would skip an invalid one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from addin_core.topics import Host, Mode, ProtocolError, Source, Topic, TopicKind

if TYPE_CHECKING:
    from addin_core.protocol import AnyPayload


class UnreadableRow(ProtocolError):
    """A cached payload without the shape its topic's model gives it."""


@dataclass(frozen=True)
class CachedWithheld:
    version: str
    permissions: str
    hosts: list[Host]


@dataclass(frozen=True)
class CachedRingVersion:
    ring: str
    targets: list[str]
    version: str
    manifest_sha256: str
    manifest_url: str
    hosts: list[Host]
    permissions: str
    rollback: int | None = None


@dataclass(frozen=True)
class CachedCatalogEntry:
    revision: int
    addin_id: str
    name: str
    source: Source
    version: str
    manifest_sha256: str
    manifest_url: str
    hosts: list[Host]
    permissions: str
    enabled: bool
    committed_at: float | None = None
    store_asset_id: str | None = None
    withheld: CachedWithheld | None = None
    rings: list[CachedRingVersion] | None = None
    rollback: int | None = None


@dataclass(frozen=True)
class CachedAssignment:
    revision: int
    mode: Mode
    committed_at: float | None = None
    except_groups: list[str] | None = None
    except_users: list[str] | None = None


@dataclass(frozen=True)
class CachedMembership:
    revision: int
    groups: list[str]
    committed_at: float | None = None


@dataclass(frozen=True)
class CachedGroupParents:
    revision: int
    parents: list[str]
    committed_at: float | None = None


@dataclass(frozen=True)
class CachedPolicy:
    revision: int
    committed_at: float | None = None
    nested_groups: bool = False


@dataclass(frozen=True)
class CachedTombstone:
    revision: int
    deleted: bool
    committed_at: float | None = None


def _catalog(d: dict[str, Any]) -> CachedCatalogEntry:
    w, rings = d.get("withheld"), d.get("rings")
    return CachedCatalogEntry(
        **{
            **d,
            "source": Source(d["source"]),
            "hosts": [Host(h) for h in d["hosts"]],
            "withheld": None
            if w is None
            else CachedWithheld(**{**w, "hosts": [Host(h) for h in w["hosts"]]}),
            "rings": None
            if rings is None
            else [
                CachedRingVersion(**{**r, "hosts": [Host(h) for h in r["hosts"]]}) for r in rings
            ],
        }
    )


def _assignment(d: dict[str, Any]) -> CachedAssignment:
    return CachedAssignment(**{**d, "mode": Mode(d["mode"])})


_BUILDERS: dict[TopicKind, Any] = {
    TopicKind.CATALOG: _catalog,
    TopicKind.ASSIGN_EVERYONE: _assignment,
    TopicKind.ASSIGN_GROUP: _assignment,
    TopicKind.ASSIGN_USER: _assignment,
    TopicKind.MEMBER: lambda d: CachedMembership(**d),
    TopicKind.GROUP_PARENTS: lambda d: CachedGroupParents(**d),
    TopicKind.POLICY: lambda d: CachedPolicy(**d),
}


def from_cache(topic: Topic, text: bytes | bytearray | str) -> AnyPayload:
    """The payload of a cached row for `topic`, with the attributes its model would have.

    Typed as the protocol's payload: callers read attributes only, which both share."""
    try:
        d = json.loads(text)
        if not isinstance(d, dict):
            raise UnreadableRow(f"{topic}: cached payload is not a JSON object")
        if d.get("deleted") is True:
            return cast("AnyPayload", CachedTombstone(**d))
        build = _BUILDERS.get(topic.kind)
        if build is None:
            raise UnreadableRow(f"{topic}: no state is cached for this kind of topic")
        return cast("AnyPayload", build(d))
    except UnreadableRow:
        raise
    except (ValueError, TypeError, KeyError) as e:
        raise UnreadableRow(f"{topic}: cached payload unreadable: {e}") from e

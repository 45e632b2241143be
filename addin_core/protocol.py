"""The wire protocol: topics and payloads, the single source of truth.

Agent, server and simulator import this module and nothing else to speak MQTT
with each other. Values here cannot be built invalid: a `Topic`
validates its ids when constructed, and payload models reject unknown fields,
unsafe ids and oversized JSON. Pure: no I/O, no clock.

Topics, all under ``addins/v1/{tenant}/``::

    catalog/{addin_id}                      CatalogEntry      retained
    assign/everyone/{addin_id}              Assignment        retained
    assign/group/{group_id}/{addin_id}      Assignment        retained
    assign/user/{user_id}/{addin_id}        Assignment        retained
    member/{user_id}                        Membership        retained
    group/{group_id}/parents                GroupParents      retained
    policy                                  Policy            retained
    report/{client_id}                      AgentReport       not retained

Any retained state topic except ``policy`` may carry a `Tombstone` instead. The server also
keeps topics of its own under ``server/`` (see `server_topic`); they are not part of this
protocol and `Topic.parse` refuses them.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeAlias

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from addin_core.topics import (  # noqa: F401  (re-exported: the protocol's names)
    _ID_PATTERN,
    _PARSED_MAX,
    _SHA256_PATTERN,
    _VERSION_PATTERN,
    MAX_PAYLOAD_BYTES,
    PROTOCOL_PREFIX,
    RETAINED_KINDS,
    SERVER_ID_PREFIX,
    TOMBSTONE_KINDS,
    Filters,
    Host,
    InvalidPayload,
    InvalidTopic,
    Mode,
    ProtocolError,
    Source,
    Topic,
    TopicKind,
    _parse_remembered,
    check_id,
    check_unreserved,
    server_identity,
    server_topic,
)
from addin_core.validation import validation_problems
from addin_core.version import compare_versions

SafeId = Annotated[str, StringConstraints(pattern=_ID_PATTERN)]
Sha256Hex = Annotated[str, StringConstraints(pattern=_SHA256_PATTERN)]
VersionString = Annotated[str, StringConstraints(pattern=_VERSION_PATTERN)]
Revision = Annotated[int, Field(ge=1, le=2**53)]


# -- payloads --------------------------------------------------------------------------------


class _Payload(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    revision: Revision
    """Tenant-wide revision of the commit that produced this message."""
    committed_at: float | None = None
    """Server wall-clock time (Unix seconds) of that commit; used to measure propagation."""

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


_PermissionName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z]{1,32}$")]
_Hosts = Annotated[list[Host], Field(max_length=8)]


class WithheldVersion(BaseModel):
    """A newer version the server holds back until the admin consents, because its
    permissions or hosts differ from the consented version's. Shown, never installed: it
    carries no manifest hash or URL, so no agent can fetch it."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    version: VersionString
    permissions: _PermissionName
    hosts: _Hosts


_RING_TARGET_PATTERN = (
    r"^(everyone|(group|user):[A-Za-z0-9][A-Za-z0-9._@-]{0,127})$"
)
RingTarget = Annotated[str, StringConstraints(pattern=_RING_TARGET_PATTERN)]
"""Who a rollout ring reaches: ``everyone``, ``group:G`` or ``user:U``."""

MAX_RINGS = 16
MAX_EXCEPTIONS = 100
"""Exclusions per assignment, by kind: they travel in the assignment's one message."""


class RingVersion(BaseModel):
    """While a rollout runs, the version that applies to the users a ring reaches.

    A catalog entry lists the rings that differ from its own version, in order: a user gets
    the version of the FIRST listed ring that reaches them (groups counted under the nesting
    policy, like assignments), and the entry's own version otherwise. `rollback` (the
    revision of the admin's rollback decision) is the only thing that lets an agent apply a
    version lower than the one it has installed."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    ring: SafeId
    targets: Annotated[list[RingTarget], Field(min_length=1, max_length=32)]
    version: VersionString
    manifest_sha256: Sha256Hex
    manifest_url: Annotated[str, StringConstraints(pattern=r"^/v1/manifests/[0-9a-f]{64}$")]
    hosts: _Hosts
    permissions: _PermissionName
    rollback: Revision | None = None


class CatalogEntry(_Payload):
    """The current, consented version of one add-in in the tenant catalog."""

    addin_id: SafeId
    name: Annotated[str, StringConstraints(min_length=1, max_length=250)]
    source: Source
    version: VersionString
    manifest_sha256: Sha256Hex
    manifest_url: Annotated[str, StringConstraints(pattern=r"^/v1/manifests/[0-9a-f]{64}$")]
    hosts: _Hosts
    permissions: _PermissionName
    enabled: bool
    store_asset_id: SafeId | None = None
    withheld: WithheldVersion | None = None
    """The newer version waiting for admin consent, if any (its permissions or hosts changed).
    Left out of the JSON when None, so an entry without one reads as before the field existed."""
    rings: Annotated[list[RingVersion], Field(max_length=MAX_RINGS)] | None = None
    """While a rollout runs: the rings whose version differs from the entry's (first match
    wins); absent otherwise, so an entry outside a rollout is byte-for-byte as before."""
    rollback: Revision | None = None
    """The entry's version is an admin's rollback (the revision of that decision): agents
    holding a newer version apply this lower one. Absent for every other version, and then a
    lower version is refused as before."""

    @field_validator("withheld")
    @classmethod
    def _withheld_is_a_consent_change(
        cls, w: WithheldVersion | None, info: ValidationInfo
    ) -> WithheldVersion | None:
        # Only a strictly newer version is ever withheld; anything else on the wire is a
        # server bug or a forgery, and is refused. Its permissions and hosts may equal the
        # entry's: a change of manifest type also needs consent. (Fields are validated in
        # order: `info.data` holds the version if it was valid.)
        version = info.data.get("version")
        if w is None or version is None:
            return w
        if compare_versions(w.version, version) <= 0:
            raise ValueError(f"version {w.version} is not newer than the entry's {version}")
        return w


class Assignment(_Payload):
    """An assignment of the add-in named by the topic to its target, with a mode.

    `except_groups` / `except_users`: users this assignment reaches who are excluded; an
    exclusion wins over every assignment of the add-in that reaches the user (groups counted
    under the nesting policy). Left out of the JSON when there are none."""

    mode: Mode
    except_groups: Annotated[list[SafeId], Field(min_length=1, max_length=MAX_EXCEPTIONS)] | None = (
        None
    )
    except_users: Annotated[list[SafeId], Field(min_length=1, max_length=MAX_EXCEPTIONS)] | None = (
        None
    )


class Membership(_Payload):
    """A user's direct group memberships (the whole list, not a delta)."""

    groups: Annotated[list[SafeId], Field(max_length=10_000)]


class GroupParents(_Payload):
    """The groups that directly contain this group (nesting)."""

    parents: Annotated[list[SafeId], Field(max_length=10_000)]


class Policy(_Payload):
    """Tenant-wide policy."""

    nested_groups: bool = False
    """Honour nested groups. Microsoft's Centralized Deployment does not (default False)."""


class Tombstone(_Payload):
    """A retained deletion: the thing the topic names no longer exists."""

    deleted: Literal[True]


class AppliedAddin(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    addin_id: SafeId
    version: VersionString
    host: Host


class FailedAddin(BaseModel):
    """A change this client cannot apply, and why (manifest refused, consent needed...)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    addin_id: SafeId
    version: VersionString
    host: Host
    reason: Annotated[str, StringConstraints(max_length=500)]


class AgentReport(BaseModel):
    """Agent → server: what this client has applied, after each apply and on reconnect."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    client_id: SafeId
    user_id: SafeId
    revision: Annotated[int, Field(ge=0, le=2**53)]
    """Highest tenant revision this client has received."""
    reported_at: float
    applied: Annotated[list[AppliedAddin], Field(max_length=4 * 1000)]
    errors: Annotated[
        list[Annotated[str, StringConstraints(max_length=500)]], Field(max_length=100)
    ] = []
    failed: Annotated[list[FailedAddin], Field(max_length=4 * 200)] | None = None
    """Per add-in failures (what rollout gates count); None when there are none."""
    cached: Annotated[list[AppliedAddin], Field(max_length=4 * 1000)] = []
    """Installs and updates downloaded and verified, waiting for their host to start: what
    the console counts as "cached". Left out of the JSON when empty."""

    def to_bytes(self) -> bytes:
        # Both left out when empty, so a report without them reads as before they existed.
        return self.model_dump_json(
            exclude_none=True, exclude=None if self.cached else {"cached"}
        ).encode()


StatePayload: TypeAlias = CatalogEntry | Assignment | Membership | GroupParents | Policy
AnyPayload: TypeAlias = StatePayload | Tombstone | AgentReport

MODEL_BY_KIND: dict[TopicKind, type[BaseModel]] = {
    TopicKind.CATALOG: CatalogEntry,
    TopicKind.ASSIGN_EVERYONE: Assignment,
    TopicKind.ASSIGN_GROUP: Assignment,
    TopicKind.ASSIGN_USER: Assignment,
    TopicKind.MEMBER: Membership,
    TopicKind.GROUP_PARENTS: GroupParents,
    TopicKind.POLICY: Policy,
    TopicKind.REPORT: AgentReport,
}


def decode(topic: Topic, payload: bytes | bytearray | str) -> AnyPayload:
    """Validate a received payload for `topic` and return its model.

    Raises `InvalidPayload` with a readable reason for: oversized payloads, bad UTF-8,
    bad JSON, a non-object, unknown or missing fields, unsafe ids, a tombstone where
    none is allowed, and a catalog entry whose add-in id differs from the topic's.
    """
    raw = payload.encode() if isinstance(payload, str) else bytes(payload)
    if len(raw) > MAX_PAYLOAD_BYTES:
        raise InvalidPayload(
            f"{topic}: payload of {len(raw)} bytes exceeds the {MAX_PAYLOAD_BYTES}-byte limit"
        )
    value = _validate_plain(topic, raw)
    if value is None:
        value = _validate_diagnosed(topic, raw)
    if isinstance(value, CatalogEntry) and value.addin_id != topic.addin_id:
        raise InvalidPayload(
            f"{topic}: catalog entry names add-in {value.addin_id!r}, topic names {topic.addin_id!r}"
        )
    if isinstance(value, AgentReport) and value.client_id != topic.client_id:
        raise InvalidPayload(
            f"{topic}: report from client {value.client_id!r} on {topic.client_id!r}'s topic"
        )
    assert isinstance(value, (_Payload, AgentReport))
    return value  # type: ignore[return-value]


def _validate_plain(topic: Topic, raw: bytes) -> BaseModel | None:
    """The common case in one step: ASCII, no tombstone, valid for the topic's model.
    None otherwise, and `_validate_diagnosed` says what is wrong (messages unchanged):
    every agent of a fleet decodes every change, so parsing the JSON twice counts."""
    if not raw.isascii() or b"deleted" in raw:
        return None
    try:
        return MODEL_BY_KIND[topic.kind].model_validate_json(raw)
    except ValidationError:
        return None


def _validate_diagnosed(topic: Topic, raw: bytes) -> BaseModel:
    try:
        data: Any = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise InvalidPayload(f"{topic}: payload is not UTF-8 ({e.reason} at byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise InvalidPayload(f"{topic}: payload is not JSON ({e.msg} at {e.pos})") from e
    except RecursionError:
        # "[[[[..." within the size limit: the parser gives up past its depth. No payload
        # nests more than a few levels; without this the error escaped every receive loop
        # that catches the protocol's errors (a device's report could end the server's).
        raise InvalidPayload(f"{topic}: payload nests arrays or objects too deeply") from None
    if not isinstance(data, dict):
        raise InvalidPayload(f"{topic}: payload must be a JSON object, got {type(data).__name__}")
    model: type[BaseModel]
    if "deleted" in data:
        if topic.kind not in TOMBSTONE_KINDS:
            raise InvalidPayload(f"{topic}: a {topic.kind} topic cannot carry a tombstone")
        model = Tombstone
    else:
        model = MODEL_BY_KIND[topic.kind]
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        problems = validation_problems(e.errors(include_url=False), "payload")
        raise InvalidPayload(f"{topic}: invalid {model.__name__}: {problems}") from e


def decode_message(topic: str, payload: bytes | bytearray | str) -> tuple[Topic, AnyPayload]:
    """Parse a wire topic and decode its payload in one step."""
    t = Topic.parse(topic)
    return t, decode(t, payload)

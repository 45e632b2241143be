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

import functools
import json
import re
from dataclasses import dataclass, field
from enum import StrEnum
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

from addin_core.validation import validation_problems
from addin_core.version import compare_versions

PROTOCOL_PREFIX = "addins/v1"
MAX_PAYLOAD_BYTES = 64 * 1024
"""Largest JSON payload accepted on any topic. A catalog entry is well under 2 KB."""

_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$"
_ID_RE = re.compile(_ID_PATTERN)
_SHA256_PATTERN = r"^[0-9a-f]{64}$"
_VERSION_PATTERN = r"^[0-9]{1,5}(\.[0-9]{1,5}){0,3}$"


class ProtocolError(ValueError):
    """A topic or payload that does not follow the protocol. The message says why."""


class InvalidTopic(ProtocolError):
    """A topic string or topic component that is not part of the protocol."""


class InvalidPayload(ProtocolError):
    """A payload that is not valid JSON for its topic's model."""


def check_id(value: str, what: str = "id") -> str:
    """Return `value` if it is a safe id, else raise `InvalidTopic`.

    Safe ids are 1–128 characters of ``[A-Za-z0-9._@-]`` starting with a letter or
    digit, so no id can put ``+``, ``#``, ``/``, NUL or whitespace into a topic.
    """
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise InvalidTopic(
            f"invalid {what} {value!r}: use 1-128 characters of A-Z a-z 0-9 . _ @ -, "
            "starting with a letter or digit"
        )
    return value


SERVER_ID_PREFIX = "addin-server-"
"""Start of the deployment server's own identities: its broker account and MQTT client id
(``addin-server-<tenant>``). No user or client id may take one: a user named like that
would get the server's broker account, a client id like that takes the server's session."""


def server_identity(tenant: str) -> str:
    """The server's broker username and MQTT client id for `tenant`."""
    return SERVER_ID_PREFIX + check_id(tenant, "tenant id")


def check_unreserved(value: str, what: str = "id") -> str:
    """`value` if it is a safe id that is not one of the server's identities, else
    `InvalidTopic` saying why."""
    check_id(value, what)
    if value.lower().startswith(SERVER_ID_PREFIX):
        raise InvalidTopic(
            f"{what} {value!r} is reserved: ids starting with {SERVER_ID_PREFIX!r} name the "
            "deployment server's own broker account and MQTT client"
        )
    return value


SafeId = Annotated[str, StringConstraints(pattern=_ID_PATTERN)]
Sha256Hex = Annotated[str, StringConstraints(pattern=_SHA256_PATTERN)]
VersionString = Annotated[str, StringConstraints(pattern=_VERSION_PATTERN)]
Revision = Annotated[int, Field(ge=1, le=2**53)]


class Host(StrEnum):
    """Office host applications, named as a user knows them."""

    WORD = "Word"
    EXCEL = "Excel"
    POWERPOINT = "PowerPoint"
    OUTLOOK = "Outlook"


class Mode(StrEnum):
    """Deployment mode of an assignment. Stronger modes win (see `Mode.strength`)."""

    FIXED = "fixed"
    OPTIONAL = "optional"
    AVAILABLE = "available"

    @property
    def strength(self) -> int:
        return {"available": 1, "optional": 2, "fixed": 3}[self.value]


class Source(StrEnum):
    LOB = "lob"
    STORE = "store"


class TopicKind(StrEnum):
    CATALOG = "catalog"
    ASSIGN_EVERYONE = "assign/everyone"
    ASSIGN_GROUP = "assign/group"
    ASSIGN_USER = "assign/user"
    MEMBER = "member"
    GROUP_PARENTS = "group/parents"
    POLICY = "policy"
    REPORT = "report"


RETAINED_KINDS = frozenset(TopicKind) - {TopicKind.REPORT}
TOMBSTONE_KINDS = RETAINED_KINDS - {TopicKind.POLICY}


@dataclass(frozen=True, slots=True)
class Topic:
    """One concrete protocol topic. Build it with the class methods; `str()` gives the wire form.

    Only the ids meaningful for `kind` are set; the rest are None.
    """

    tenant: str
    kind: TopicKind
    addin_id: str | None = None
    group_id: str | None = None
    user_id: str | None = None
    client_id: str | None = None
    _wire: str = field(default="", init=False, repr=False, compare=False)
    """The wire form, computed on first use (agents format every topic they accept)."""

    def __post_init__(self) -> None:
        check_id(self.tenant, "tenant id")
        wanted = _IDS_BY_KIND[self.kind]
        for name in ("addin_id", "group_id", "user_id", "client_id"):
            value = getattr(self, name)
            if name in wanted:
                if value is None:
                    raise InvalidTopic(f"{self.kind} topic needs {name}")
                check_id(value, name.replace("_", " "))
            elif value is not None:
                raise InvalidTopic(f"{self.kind} topic takes no {name}")

    # -- builders ---------------------------------------------------------------------------
    @classmethod
    def catalog(cls, tenant: str, addin_id: str) -> Topic:
        return cls(tenant, TopicKind.CATALOG, addin_id=addin_id)

    @classmethod
    def assign_everyone(cls, tenant: str, addin_id: str) -> Topic:
        return cls(tenant, TopicKind.ASSIGN_EVERYONE, addin_id=addin_id)

    @classmethod
    def assign_group(cls, tenant: str, group_id: str, addin_id: str) -> Topic:
        return cls(tenant, TopicKind.ASSIGN_GROUP, group_id=group_id, addin_id=addin_id)

    @classmethod
    def assign_user(cls, tenant: str, user_id: str, addin_id: str) -> Topic:
        return cls(tenant, TopicKind.ASSIGN_USER, user_id=user_id, addin_id=addin_id)

    @classmethod
    def member(cls, tenant: str, user_id: str) -> Topic:
        return cls(tenant, TopicKind.MEMBER, user_id=user_id)

    @classmethod
    def group_parents(cls, tenant: str, group_id: str) -> Topic:
        return cls(tenant, TopicKind.GROUP_PARENTS, group_id=group_id)

    @classmethod
    def policy(cls, tenant: str) -> Topic:
        return cls(tenant, TopicKind.POLICY)

    @classmethod
    def report(cls, tenant: str, client_id: str) -> Topic:
        return cls(tenant, TopicKind.REPORT, client_id=client_id)

    # -- wire form --------------------------------------------------------------------------
    def __str__(self) -> str:
        if not self._wire:
            object.__setattr__(self, "_wire", self._format())
        return self._wire

    def _format(self) -> str:
        base = f"{PROTOCOL_PREFIX}/{self.tenant}"
        k = TopicKind
        match self.kind:
            case k.CATALOG:
                return f"{base}/catalog/{self.addin_id}"
            case k.ASSIGN_EVERYONE:
                return f"{base}/assign/everyone/{self.addin_id}"
            case k.ASSIGN_GROUP:
                return f"{base}/assign/group/{self.group_id}/{self.addin_id}"
            case k.ASSIGN_USER:
                return f"{base}/assign/user/{self.user_id}/{self.addin_id}"
            case k.MEMBER:
                return f"{base}/member/{self.user_id}"
            case k.GROUP_PARENTS:
                return f"{base}/group/{self.group_id}/parents"
            case k.POLICY:
                return f"{base}/policy"
            case k.REPORT:
                return f"{base}/report/{self.client_id}"
        raise AssertionError(self.kind)  # pragma: no cover

    @property
    def retained(self) -> bool:
        return self.kind in RETAINED_KINDS

    @classmethod
    def parse(cls, topic: str) -> Topic:
        """Parse a wire topic; raise `InvalidTopic` naming what is wrong."""
        # Topics are immutable values and a process running many agents parses the same
        # few strings thousands of times: remember the recent ones.
        if isinstance(topic, str):
            return _parse_remembered(topic)
        return cls._parse(topic)  # refused, with the reason

    @classmethod
    def _parse(cls, topic: str) -> Topic:
        if not isinstance(topic, str) or "\x00" in topic:
            raise InvalidTopic(f"topic {topic!r} is not a clean string")
        parts = topic.split("/")
        if len(parts) < 4 or "/".join(parts[:2]) != PROTOCOL_PREFIX:
            raise InvalidTopic(f"topic {topic!r} is not under {PROTOCOL_PREFIX}/{{tenant}}/")
        tenant, rest = parts[2], parts[3:]
        match rest:
            case ["catalog", addin]:
                return cls.catalog(tenant, addin)
            case ["assign", "everyone", addin]:
                return cls.assign_everyone(tenant, addin)
            case ["assign", "group", group, addin]:
                return cls.assign_group(tenant, group, addin)
            case ["assign", "user", user, addin]:
                return cls.assign_user(tenant, user, addin)
            case ["member", user]:
                return cls.member(tenant, user)
            case ["group", group, "parents"]:
                return cls.group_parents(tenant, group)
            case ["policy"]:
                return cls.policy(tenant)
            case ["report", client]:
                return cls.report(tenant, client)
        raise InvalidTopic(f"topic {topic!r} is not a known {PROTOCOL_PREFIX} topic")


_PARSED_MAX = 4096


@functools.lru_cache(maxsize=_PARSED_MAX)
def _parse_remembered(topic: str) -> Topic:
    return Topic._parse(topic)  # an InvalidTopic is raised, never remembered


_IDS_BY_KIND: dict[TopicKind, frozenset[str]] = {
    TopicKind.CATALOG: frozenset({"addin_id"}),
    TopicKind.ASSIGN_EVERYONE: frozenset({"addin_id"}),
    TopicKind.ASSIGN_GROUP: frozenset({"group_id", "addin_id"}),
    TopicKind.ASSIGN_USER: frozenset({"user_id", "addin_id"}),
    TopicKind.MEMBER: frozenset({"user_id"}),
    TopicKind.GROUP_PARENTS: frozenset({"group_id"}),
    TopicKind.POLICY: frozenset(),
    TopicKind.REPORT: frozenset({"client_id"}),
}


class Filters:
    """Subscription filters (with ``+`` wildcards) an agent or the server subscribes to."""

    @staticmethod
    def catalog(tenant: str) -> str:
        return f"{PROTOCOL_PREFIX}/{check_id(tenant, 'tenant id')}/catalog/+"

    @staticmethod
    def assign_everyone(tenant: str) -> str:
        return f"{PROTOCOL_PREFIX}/{check_id(tenant, 'tenant id')}/assign/everyone/+"

    @staticmethod
    def assign_group(tenant: str, group_id: str) -> str:
        t, g = check_id(tenant, "tenant id"), check_id(group_id, "group id")
        return f"{PROTOCOL_PREFIX}/{t}/assign/group/{g}/+"

    @staticmethod
    def assign_user(tenant: str, user_id: str) -> str:
        t, u = check_id(tenant, "tenant id"), check_id(user_id, "user id")
        return f"{PROTOCOL_PREFIX}/{t}/assign/user/{u}/+"

    @staticmethod
    def reports(tenant: str) -> str:
        return f"{PROTOCOL_PREFIX}/{check_id(tenant, 'tenant id')}/report/+"

    @staticmethod
    def retained_state(tenant: str) -> list[str]:
        """Every retained state topic of the tenant (all but the agents' reports)."""
        t = check_id(tenant, "tenant id")
        return [
            f"{PROTOCOL_PREFIX}/{t}/{rest}"
            for rest in ("catalog/+", "assign/#", "member/+", "group/+/parents", "policy")
        ]

    @staticmethod
    def everything(tenant: str) -> str:
        return f"{PROTOCOL_PREFIX}/{check_id(tenant, 'tenant id')}/#"


def server_topic(tenant: str, name: str) -> str:
    """A topic of the server's own bookkeeping on the broker, ``server/{name}`` under the
    tenant: the published-revision marker the publisher reads back after a reconnect.
    Not part of the agents' protocol: the ACL gives agents no pattern that reads it, no
    agent subscribes to it, and `Topic.parse` refuses it."""
    return f"{PROTOCOL_PREFIX}/{check_id(tenant, 'tenant id')}/server/{check_id(name, 'name')}"


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
    """An assignment of the add-in named by the topic to its target, with a mode."""

    mode: Mode


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

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


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

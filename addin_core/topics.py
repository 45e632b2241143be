"""Topics, ids and the enums of the wire protocol (`addin_core.protocol`): the part of it
that needs no payload validation, so a program that only names hosts, modes and topics
(the agent's read-only commands) does not import pydantic (~75 ms of a command's start).
`addin_core.protocol` re-exports every name here; import from there unless start-up time
matters. Pure: no I/O, no clock.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from enum import StrEnum

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

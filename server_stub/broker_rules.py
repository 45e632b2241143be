"""Who may read and write which topic: one rule list, rendered for every broker target.

The Mosquitto ACLs (pattern lines in password mode, one block per device in TLS mode, the
bridge account of a bridge tree) and the NATS permissions are all drawn from `AGENT_RULES`
and `SERVER_RULES`, so a topic added to the protocol is granted the same way everywhere.

A rule's topic is relative to ``addins/v1/{tenant}`` and may name ``{user}`` (the account's
user id) and ``{client}`` (its MQTT client id, which is the device id in TLS mode).

NATS sees MQTT topics as subjects: ``/`` becomes ``.``, a ``.`` inside a level becomes
``//``, ``+`` becomes ``*`` and ``#`` becomes ``>``. Ids may contain dots, so user
``jane.doe`` reads ``addins.v1.t.member.jane//doe``: one subject token, which ``*`` matches
and which no other user's rule names. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from addin_core.protocol import PROTOCOL_PREFIX, check_id

Access = Literal["read", "write", "readwrite"]


@dataclass(frozen=True)
class Rule:
    access: Access
    topic: str
    """Relative to ``addins/v1/{tenant}``; may name ``{user}`` and ``{client}``."""


AGENT_RULES: tuple[Rule, ...] = (
    Rule("read", "catalog/+"),
    Rule("read", "assign/everyone/+"),
    Rule("read", "assign/group/+/+"),
    Rule("read", "group/+/parents"),
    Rule("read", "policy"),
    Rule("read", "member/{user}"),
    Rule("read", "assign/user/{user}/+"),
    Rule("write", "report/{client}"),
)
"""An agent reads tenant-wide state and its own user's, and writes only its own report."""

SERVER_RULES: tuple[Rule, ...] = (Rule("readwrite", "#"),)
"""The deployment server: the only account that writes state."""


def base_topic(tenant: str) -> str:
    return f"{PROTOCOL_PREFIX}/{check_id(tenant, 'tenant id')}"


def fill(rule: Rule, tenant: str, *, user: str, client: str) -> str:
    """The rule's full MQTT topic filter for one account (`user`/`client` may be ``+``,
    or Mosquitto's ``%u``/``%c``)."""
    return f"{base_topic(tenant)}/" + rule.topic.format(user=user, client=client)


def mosquitto_lines(
    rules: Sequence[Rule], tenant: str, *, keyword: str, user: str, client: str
) -> list[str]:
    """ACL lines: ``pattern read ...`` (keyword ``pattern``, with ``%u``/``%c``) or
    ``topic read ...`` (keyword ``topic``, one account's ids)."""
    return [f"{keyword} {r.access} {fill(r, tenant, user=user, client=client)}" for r in rules]


def nats_subject(topic: str) -> str:
    """An MQTT topic filter as the NATS subject its MQTT gateway maps it to."""
    levels = []
    for level in topic.split("/"):
        if not level:
            raise ValueError(f"topic {topic!r} has an empty level: no rule needs one")
        levels.append({"+": "*", "#": ">"}.get(level, level.replace(".", "//")))
    return ".".join(levels)


def nats_permissions(
    rules: Sequence[Rule], tenant: str, *, user: str, client: str
) -> dict[str, list[str]]:
    """``{"publish": [...], "subscribe": [...]}``: the subjects the rules allow."""
    publish: list[str] = []
    subscribe: list[str] = []
    for r in rules:
        subject = nats_subject(fill(r, tenant, user=user, client=client))
        # MQTT's `a/#` also matches `a` itself: the gateway subscribes to both `a.>` and `a`.
        subjects = [subject.removesuffix(".>"), subject] if subject.endswith(".>") else [subject]
        if r.access in ("write", "readwrite"):
            publish += subjects
        if r.access in ("read", "readwrite"):
            subscribe += subjects
    return {"publish": publish, "subscribe": subscribe}

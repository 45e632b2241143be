"""Admin identities and their roles: who may do what through the API and the console.

A token names one principal (a name and a role). Three roles:

- ``admin``: everything;
- ``operator``: every read, and the writes of rollouts (the routes under ``/v1/rollouts``);
- ``helpdesk``: every read (``explain``, ``status``, the audit log…), no write.

What a role may do is decided here from the method and the path, in one place: the request
guard (`server_stub/api/guard.py`) and the console ask `refusal` before anything runs. No
I/O here except reading a tokens file (`read_tokens_file`), which only `serve` calls.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from addin_core.topics import check_id


class Role(StrEnum):
    ADMIN = "admin"
    OPERATOR = "operator"
    HELPDESK = "helpdesk"


READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True)
class Principal:
    """Who a token speaks for; `name` is what the audit log records as the actor."""

    name: str
    role: Role


ROLLOUT_ROUTES = "/v1/rollouts"
"""The API's rollout routes: the only writes an operator may make (the console names the
API path each of its writes stands for)."""


def _is_rollout_path(path: str) -> bool:
    # By the route's fixed prefix, never by any segment: a segment can be an id an admin
    # chose (a user "rollout-bot", an add-in "rollouts"), and an operator must not gain
    # writes on those by their name.
    return path == ROLLOUT_ROUTES or path.startswith(ROLLOUT_ROUTES + "/")


def may(role: Role, method: str, path: str) -> bool:
    """Whether `role` may send `method` to `path`."""
    if role is Role.ADMIN or method.upper() in READ_METHODS:
        return True
    return role is Role.OPERATOR and _is_rollout_path(path)


def refusal(principal: Principal, method: str, path: str) -> str | None:
    """None when `principal` may send `method` to `path`; otherwise the 403's message."""
    if may(principal.role, method, path):
        return None
    what = (
        "helpdesk tokens are read-only (reads and explain)"
        if principal.role is Role.HELPDESK
        else "operator tokens may change rollouts only"
    )
    return f"{principal.role} {principal.name!r} may not {method.upper()} {path}: {what}"


class TokenSpecError(ValueError):
    """A --token or tokens-file line that cannot be used (the message says why)."""


def parse_token_spec(spec: str) -> tuple[Principal, str]:
    """``ROLE:NAME:TOKEN`` -> (principal, token). The token may itself contain colons."""
    parts = spec.strip().split(":", 2)
    if len(parts) != 3 or not all(parts):
        raise TokenSpecError("expected ROLE:NAME:TOKEN (e.g. helpdesk:dana:s3cret)")
    role_text, name, token = parts
    try:
        role = Role(role_text.lower())
    except ValueError:
        raise TokenSpecError(
            f"unknown role {role_text!r}: one of {', '.join(r.value for r in Role)}"
        ) from None
    try:
        check_id(name, "token name")
    except ValueError as e:
        raise TokenSpecError(str(e)) from None
    if len(token) < 8:
        raise TokenSpecError(f"the token of {name!r} is shorter than 8 characters")
    return Principal(name, role), token


def read_tokens_file(path: Path) -> list[str]:
    """The ``ROLE:NAME:TOKEN`` lines of a tokens file (blank lines and ``#`` comments
    skipped). OSError when it cannot be read."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


class Principals:
    """The tokens a server accepts for admins, operators and helpdesk."""

    def __init__(self, entries: Iterable[tuple[Principal, str]]) -> None:
        self._entries = [(p, t.encode()) for p, t in entries]
        names = [p.name for p, _ in self._entries]
        dup_name = next((n for n in names if names.count(n) > 1), None)
        if dup_name is not None:
            raise TokenSpecError(f"two tokens are named {dup_name!r}: each name once")
        tokens = [t for _, t in self._entries]
        if len(set(tokens)) != len(tokens):
            raise TokenSpecError("two principals share one token: each token once")
        if not self._entries:
            raise TokenSpecError("no admin token: give --admin-token or --token admin:NAME:TOKEN")

    @classmethod
    def from_specs(cls, specs: Iterable[str], admin_token: str | None = None) -> Principals:
        """The principals of --token/tokens-file specs; --admin-token is an admin named
        "admin"."""
        entries = [parse_token_spec(s) for s in specs]
        if admin_token:
            entries.insert(0, (Principal("admin", Role.ADMIN), admin_token))
        return cls(entries)

    def match(self, given: bytes) -> Principal | None:
        """The principal of a presented token. Every token is compared, in constant time,
        so the answer's timing says nothing about which one matched or how far."""
        found: Principal | None = None
        for principal, token in self._entries:
            if hmac.compare_digest(given, token):
                found = principal
        return found

    def tokens(self) -> tuple[bytes, ...]:
        return tuple(t for _, t in self._entries)

"""The console's sign-in: the API's tokens, exchanged once for a session cookie.

A person signs in with the same token the API takes (`roles.Principals`); the server keeps
the session in memory (a restart signs everyone out) and sets a random id in a cookie that
is HttpOnly (no script reads it), SameSite=Strict (no other site's page sends it) and, over
HTTPS, Secure. Each session has its own CSRF token: every write carries it (a form field or
the ``X-CSRF-Token`` header htmx adds) and is refused without it. The sign-in form itself
carries a token bound to a short-lived cookie (double submit), so no other site can sign a
browser in with the attacker's token either.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from server_stub.roles import Principal, Principals

COOKIE = "addin_console"
LOGIN_COOKIE = "addin_console_login"
IDLE_LIMIT = 8 * 3600.0
"""A session unused this long is forgotten."""
MAX_SESSIONS = 10_000
"""Sign-ins kept at once; past it the least recently used goes (a flood of sign-ins with a
valid token cannot grow memory without bound)."""


@dataclass
class Session:
    principal: Principal
    csrf: str
    last_used: float


class Sessions:
    def __init__(self, principals: Principals, *, https: bool, clock: Callable[[], float] = time.time) -> None:
        self.principals = principals
        self.https = https
        self.clock = clock
        self._by_id: dict[str, Session] = {}

    def sign_in(self, token: str) -> tuple[str, Session] | None:
        principal = self.principals.match(token.encode())
        if principal is None:
            return None
        if len(self._by_id) >= MAX_SESSIONS:
            oldest = min(self._by_id, key=lambda k: self._by_id[k].last_used)
            del self._by_id[oldest]
        sid = secrets.token_urlsafe(32)
        session = Session(principal, secrets.token_urlsafe(32), self.clock())
        self._by_id[sid] = session
        return sid, session

    def get(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        session = self._by_id.get(sid)
        now = self.clock()
        if session is None:
            return None
        if now - session.last_used > IDLE_LIMIT:
            del self._by_id[sid]
            return None
        session.last_used = now
        return session

    def sign_out(self, sid: str | None) -> None:
        if sid:
            self._by_id.pop(sid, None)

    def cookie(self, name: str, value: str, max_age: int | None = None) -> str:
        """A Set-Cookie value: HttpOnly, SameSite=Strict, path /console; Secure over HTTPS."""
        parts = [f"{name}={value}", "Path=/console", "HttpOnly", "SameSite=Strict"]
        if self.https:
            parts.append("Secure")
        if max_age is not None:
            parts.append(f"Max-Age={max_age}")
        return "; ".join(parts)


def csrf_ok(expected: str, given: str | None) -> bool:
    return bool(given) and hmac.compare_digest(expected.encode(), (given or "").encode())

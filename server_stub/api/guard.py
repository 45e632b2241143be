"""The gate every HTTP request passes before routing: the bearer token the route needs,
checked before a byte of the body is read, and a size limit on every body.

FastAPI reads and parses a JSON body while solving a route's parameters, before or beside
the route's token dependency, so without this gate a client with no token at all could make
the server buffer and parse a body of any size. Here a request without the right token is
answered 401 before its body is read, and a body larger than its route's limit is answered
413: at once when its Content-Length says so, and as soon as the bytes received pass the
limit when it is sent chunked.
"""

from __future__ import annotations

import hmac
import json

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server_stub.api.auth import DEVICE_USER, PRINCIPAL, DeviceLookup, forbidden_detail
from server_stub.roles import Principals, refusal
from server_stub.service import MAX_MANIFEST_BYTES
from server_stub.service.unit_of_work import CURRENT_ACTOR, Actor

MAX_ORG_BYTES = 64 * 1024 * 1024
"""The largest ORG document ``POST /v1/org`` takes (a 100,000-user organisation is ~10 MB)."""

MAX_JSON_BYTES = 64 * 1024
"""The largest body of every other route (a user, a group, an assignment: a few hundred bytes)."""

_OPEN = frozenset({"/healthz", "/readyz", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
_CONSOLE = "/console"
"""The console authenticates by its own session cookie (`server_stub/console/session.py`)."""
_AGENT_PREFIXES = ("/v1/manifests/", "/v1/agents/")

UNAUTHORIZED_DETAIL = "missing or wrong bearer token"


def body_limit(method: str, path: str) -> tuple[int, str]:
    """The largest body a route takes, and how to say it in a 413."""
    if method == "POST" and path == "/v1/addins":
        return MAX_MANIFEST_BYTES, f"manifest is larger than {MAX_MANIFEST_BYTES} bytes (512 KB)"
    if method == "POST" and path == "/v1/org":
        return MAX_ORG_BYTES, f"ORG document is larger than {MAX_ORG_BYTES} bytes (64 MB)"
    return MAX_JSON_BYTES, f"request body is larger than {MAX_JSON_BYTES} bytes (64 KB)"


class _BodyTooLarge(HTTPException):
    def __init__(self, detail: str) -> None:
        super().__init__(413, detail)


async def _answer(send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]]) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """Pure ASGI middleware: authenticates (an admin-side token whose role may make this
    request; on the agent routes also the shared agent token or a device token, looked up
    in the database) and caps the body before the app sees the request. The routes keep
    their own token dependency too; this gate only makes sure nothing is read before it.
    The accepted principal is the actor of whatever the request writes (`CURRENT_ACTOR`)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        principals: Principals,
        agent: str | None,
        devices: DeviceLookup | None = None,
    ) -> None:
        self.app = app
        self.principals = principals
        self.agent = agent.encode() if agent is not None else None
        self.devices = devices

    async def _authorize(self, scope: Scope, path: str, authorization: bytes) -> tuple[int, str]:
        """(0, "") when the request may go on, else the status and detail to answer."""
        if path in _OPEN or path == _CONSOLE or path.startswith(_CONSOLE + "/"):
            return 0, ""
        scheme, _, given = authorization.partition(b" ")
        if scheme.lower() != b"bearer":
            return 401, UNAUTHORIZED_DETAIL
        agent_route = path.startswith(_AGENT_PREFIXES)
        principal = self.principals.match(given)
        if principal is not None:
            why = refusal(principal, scope["method"], path)
            if why is not None:
                return 403, why
            scope.setdefault("state", {})[PRINCIPAL] = principal
            return 0, ""
        # Compared in constant time, so timing says nothing about which token matched.
        if agent_route and self.agent is not None and hmac.compare_digest(given, self.agent):
            return 0, ""
        if not agent_route or self.devices is None or not given:
            return 401, UNAUTHORIZED_DETAIL
        device_user = await self.devices(given)
        if device_user is None:
            return 401, UNAUTHORIZED_DETAIL
        if path.startswith("/v1/agents/") and path.split("/")[3] != device_user:
            return 403, forbidden_detail(device_user)
        scope.setdefault("state", {})[DEVICE_USER] = device_user
        return 0, ""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path: str = scope["path"]
        authorization = b""
        declared: bytes | None = None
        for k, v in scope["headers"]:
            if k == b"authorization":
                authorization = v
            elif k == b"content-length":
                declared = v
        status, detail = await self._authorize(scope, path, authorization)
        if status == 401:
            return await _answer(send, 401, detail, [(b"www-authenticate", b"Bearer")])
        if status:
            return await _answer(send, status, detail, [])
        limit, too_large = body_limit(scope["method"], path)
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            if not declared.isdigit():
                return await _answer(send, 400, "malformed Content-Length header", [])
            return await _answer(send, 413, too_large, [])

        received = 0
        overflow = False
        started = False

        async def counted_receive() -> Message:
            nonlocal received, overflow
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    overflow = True
                    raise _BodyTooLarge(too_large)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if overflow:
                # Whatever the app made of the interrupted body (FastAPI turns errors while
                # reading it into a 400), the answer is the 413.
                if not started:
                    started = True
                    await _answer(send, 413, too_large, [])
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        principal = scope.get("state", {}).get(PRINCIPAL)
        token = (
            CURRENT_ACTOR.set(Actor(principal.name, principal.role.value, "api"))
            if principal is not None
            else None
        )
        try:
            await self.app(scope, counted_receive, guarded_send)
        except _BodyTooLarge:
            if not started:
                started = True
                await _answer(send, 413, too_large, [])
        finally:
            if token is not None:
                CURRENT_ACTOR.reset(token)


async def read_body(request: Request) -> bytearray:
    """The request body in one buffer, grown as it streams in (`Request.body()` keeps the
    chunks and their joined copy at once). Its size is capped by `RequestGuard`."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
    return body

"""``GET /v1/manifests/{sha256}``: immutable manifest bytes, with an in-memory fast path."""

from __future__ import annotations

import hmac
import re

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from server_stub.api.auth import DeviceLookup, Tokens
from server_stub.service import Service

MANIFEST_MEMORY = 32 * 1024 * 1024
"""Bytes of manifests the HTTP server keeps in memory (a fleet downloads the same few)."""

_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_MANIFEST_PREFIX = "/v1/manifests/"
_IMMUTABLE = b"public, max-age=31536000, immutable"


class ManifestFastPath:
    """ASGI middleware answering ``GET /v1/manifests/{sha256}`` for manifests already in
    memory, with the same status, headers and body as the route below, without FastAPI's
    routing, dependency solving and Request/Response objects. When a whole fleet downloads
    a new manifest at once that per-request overhead was most of the server's CPU.
    Everything else (misses, bad tokens, malformed ids, other methods) goes to the app."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        cache: dict[str, bytes],
        tokens: tuple[bytes, ...],
        devices: DeviceLookup | None = None,
    ) -> None:
        self.app = app
        self.cache = cache
        self.tokens = tokens
        self.devices = devices

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        content = (
            self.cache.get(path[len(_MANIFEST_PREFIX) :])
            if scope.get("method") == "GET" and path.startswith(_MANIFEST_PREFIX)
            else None
        )
        if content is None:
            return await self.app(scope, receive, send)
        auth = b""
        inm = b""
        for k, v in scope["headers"]:
            if k == b"authorization":
                auth = v
            elif k == b"if-none-match":
                inm = v
        scheme, _, given = auth.partition(b" ")
        if scheme.lower() != b"bearer" or not (
            any(hmac.compare_digest(given, t) for t in self.tokens)
            or (self.devices is not None and given and await self.devices(given) is not None)
        ):
            return await self.app(scope, receive, send)  # the app's 401, word for word
        etag = b'"' + path[len(_MANIFEST_PREFIX) :].encode() + b'"'
        headers = [(b"etag", etag), (b"cache-control", _IMMUTABLE)]
        if inm == etag:
            await send({"type": "http.response.start", "status": 304, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        headers += [
            (b"content-type", b"application/xml"),
            (b"content-length", str(len(content)).encode()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": content})


def router(service: Service, tokens: Tokens, cache: dict[str, bytes]) -> APIRouter:
    """The manifest route; what it reads goes into `cache`, which the fast path serves."""
    r = APIRouter(dependencies=[tokens.agent_or_admin])

    @r.get(
        "/v1/manifests/{sha256}",
        response_class=Response,
        responses={200: {"content": {"application/xml": {}}}, 404: {}},
    )
    async def manifest(sha256: str, request: Request) -> Response:
        if not _SHA_RE.match(sha256):
            return JSONResponse({"detail": f"unknown manifest {sha256!r}"}, 404)
        etag = f'"{sha256}"'
        headers = {"ETag": etag, "Cache-Control": "public, max-age=31536000, immutable"}
        content = cache.get(sha256)
        if content is None:
            content = await service.manifest(sha256)
            if content is None:
                return JSONResponse({"detail": f"unknown manifest {sha256}"}, 404)
            # Content-addressed and never deleted, so a copy can never go stale; bounded.
            if sum(map(len, cache.values())) + len(content) <= MANIFEST_MEMORY:
                cache[sha256] = content
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(content, media_type="application/xml", headers=headers)

    return r

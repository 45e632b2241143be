"""The HTTP API (FastAPI): admin operations, reads, and immutable manifest serving.

Thin: every route validates its input shape and calls one `Service` method. Tokens are
bearer tokens compared in constant time; the admin token may also fetch manifests.
Errors are ``{"detail": "..."}`` with 400 (malformed), 401, 404, 409, 413 or 422.
"""

from __future__ import annotations

import hmac
import re
import sqlite3
from typing import Annotated, Any, Literal

from fastapi import Body, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict
from starlette.types import ASGIApp, Receive, Scope, Send

from server_stub.antientropy import user_digest, user_state
from server_stub.operations import MAX_MANIFEST_BYTES, OperationError, Service

_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UserIn(_In):
    id: str
    name: str | None = None


class GroupIn(_In):
    id: str
    name: str | None = None


class StoreAddIn(_In):
    asset_id: str


class StorePublishIn(_In):
    version: str | None = None


class AssignIn(_In):
    target: Literal["everyone", "user", "group", "me"]
    target_id: str | None = None
    mode: Literal["fixed", "optional", "available"]


class UnassignIn(_In):
    target: Literal["everyone", "user", "group", "me"]
    target_id: str | None = None


class PolicyIn(_In):
    nested_groups: bool


class _Unauthorized(Exception):
    pass


_bearer = HTTPBearer(auto_error=False)
Creds = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


MANIFEST_MEMORY = 32 * 1024 * 1024
"""Bytes of manifests the HTTP server keeps in memory (a fleet downloads the same few)."""


class ManifestFastPath:
    """ASGI middleware answering ``GET /v1/manifests/{sha256}`` for manifests already in
    memory, with the same status, headers and body as the route below, without FastAPI's
    routing, dependency solving and Request/Response objects. When a whole fleet downloads
    a new manifest at once that per-request overhead was most of the server's CPU.
    Everything else (misses, bad tokens, malformed ids, other methods) goes to the app."""

    def __init__(self, app: ASGIApp, *, cache: dict[str, bytes], tokens: tuple[bytes, ...]) -> None:
        self.app = app
        self.cache = cache
        self.tokens = tokens

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
        if scheme.lower() != b"bearer" or not any(
            hmac.compare_digest(given, t) for t in self.tokens
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


_MANIFEST_PREFIX = "/v1/manifests/"
_IMMUTABLE = b"public, max-age=31536000, immutable"


def create_app(service: Service, *, admin_token: str, agent_token: str) -> FastAPI:
    if not admin_token or not agent_token:
        raise ValueError("both an admin token and an agent token are required")
    app = FastAPI(
        title="addin-server",
        version="1",
        description="Deployment service stub: directory, catalog, assignments, manifests.",
    )

    def _match(creds: HTTPAuthorizationCredentials | None, *tokens: str) -> bool:
        if creds is None or creds.scheme.lower() != "bearer":
            return False
        given = creds.credentials.encode()
        return any(hmac.compare_digest(given, t.encode()) for t in tokens)

    # async: FastAPI runs a plain `def` dependency in a worker thread, a hop per request
    # that cost the manifest endpoint a third of its CPU when a whole fleet downloads.
    async def admin(creds: Creds) -> None:
        if not _match(creds, admin_token):
            raise _Unauthorized()

    async def agent_or_admin(creds: Creds) -> None:
        if not _match(creds, agent_token, admin_token):
            raise _Unauthorized()

    @app.exception_handler(_Unauthorized)
    async def _unauth(_: Request, __: _Unauthorized) -> JSONResponse:
        return JSONResponse(
            {"detail": "missing or wrong bearer token"},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )

    @app.exception_handler(OperationError)
    async def _op_error(_: Request, e: OperationError) -> JSONResponse:
        body: dict[str, Any] = {"detail": e.message}
        if e.findings:
            body["findings"] = e.findings
        return JSONResponse(body, status_code=e.status)

    @app.exception_handler(sqlite3.OperationalError)
    async def _storage(_: Request, e: sqlite3.OperationalError) -> JSONResponse:
        # Locked by another writer past the busy timeout, disk full, I/O error: the
        # transaction was rolled back, so nothing changed and the admin may retry.
        return JSONResponse(
            {
                "detail": f"the server's database could not be written ({e}); nothing was changed, retry later"
            },
            status_code=503,
        )

    @app.exception_handler(RequestValidationError)
    async def _malformed(_: Request, e: RequestValidationError) -> JSONResponse:
        parts = []
        for err in e.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
            parts.append(f"{where}: {err.get('msg')}")
        return JSONResponse({"detail": "malformed request: " + "; ".join(parts)}, 400)

    Admin = Depends(admin)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"ok": True, "revision": await service.revision()}

    manifest_bytes: dict[str, bytes] = {}
    app.add_middleware(
        ManifestFastPath,
        cache=manifest_bytes,
        tokens=(agent_token.encode(), admin_token.encode()),
    )

    @app.get(
        "/v1/manifests/{sha256}",
        dependencies=[Depends(agent_or_admin)],
        response_class=Response,
        responses={200: {"content": {"application/xml": {}}}, 404: {}},
    )
    async def manifest(sha256: str, request: Request) -> Response:
        if not _SHA_RE.match(sha256):
            return JSONResponse({"detail": f"unknown manifest {sha256!r}"}, 404)
        etag = f'"{sha256}"'
        headers = {"ETag": etag, "Cache-Control": "public, max-age=31536000, immutable"}
        content = manifest_bytes.get(sha256)
        if content is None:
            row = await (
                await service.conn.execute(
                    "SELECT content FROM manifests WHERE sha256=?", (sha256,)
                )
            ).fetchone()
            if row is None:
                return JSONResponse({"detail": f"unknown manifest {sha256}"}, 404)
            content = bytes(row[0])
            # Content-addressed and never deleted, so a copy can never go stale; bounded.
            if sum(map(len, manifest_bytes.values())) + len(content) <= MANIFEST_MEMORY:
                manifest_bytes[sha256] = content
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(content, media_type="application/xml", headers=headers)

    # -- directory ---------------------------------------------------------------------------
    @app.post("/v1/users", dependencies=[Admin])
    async def create_user(body: UserIn) -> dict[str, Any]:
        return await service.create_user(body.id, body.name)

    @app.delete("/v1/users/{user_id}", dependencies=[Admin])
    async def delete_user(user_id: str) -> dict[str, Any]:
        return await service.delete_user(user_id)

    @app.get("/v1/users/{user_id}", dependencies=[Admin])
    async def get_user(user_id: str) -> dict[str, Any]:
        return await service.get_user(user_id)

    @app.post("/v1/groups", dependencies=[Admin])
    async def create_group(body: GroupIn) -> dict[str, Any]:
        return await service.create_group(body.id, body.name)

    @app.delete("/v1/groups/{group_id}", dependencies=[Admin])
    async def delete_group(group_id: str) -> dict[str, Any]:
        return await service.delete_group(group_id)

    @app.get("/v1/groups/{group_id}", dependencies=[Admin])
    async def get_group(group_id: str) -> dict[str, Any]:
        return await service.get_group(group_id)

    @app.put("/v1/groups/{group_id}/members/{user_id}", dependencies=[Admin])
    async def add_member(group_id: str, user_id: str) -> dict[str, Any]:
        return await service.add_member(group_id, user_id)

    @app.delete("/v1/groups/{group_id}/members/{user_id}", dependencies=[Admin])
    async def remove_member(group_id: str, user_id: str) -> dict[str, Any]:
        return await service.remove_member(group_id, user_id)

    @app.put("/v1/groups/{child}/parents/{parent}", dependencies=[Admin])
    async def nest(child: str, parent: str) -> dict[str, Any]:
        return await service.nest(child, parent)

    @app.delete("/v1/groups/{child}/parents/{parent}", dependencies=[Admin])
    async def unnest(child: str, parent: str) -> dict[str, Any]:
        return await service.unnest(child, parent)

    @app.put("/v1/policy", dependencies=[Admin])
    async def set_policy(body: PolicyIn) -> dict[str, Any]:
        return await service.set_policy(body.nested_groups)

    @app.post("/v1/org", dependencies=[Admin])
    async def load_org(body: Annotated[dict[str, Any], Body()]) -> dict[str, Any]:
        return await service.load_org(body)

    # -- catalog -----------------------------------------------------------------------------
    @app.post(
        "/v1/addins",
        dependencies=[Admin],
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/xml": {"schema": {"type": "string"}}},
            }
        },
    )
    async def add_lob(request: Request) -> Any:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > MAX_MANIFEST_BYTES:
            return JSONResponse(
                {"detail": f"manifest is larger than {MAX_MANIFEST_BYTES} bytes (512 KB)"}, 413
            )
        content = await request.body()
        if not content:
            return JSONResponse({"detail": "empty body: send the manifest XML"}, 400)
        return await service.add_lob(content)

    @app.post("/v1/addins/store", dependencies=[Admin])
    async def add_store(body: StoreAddIn) -> dict[str, Any]:
        return await service.add_store(body.asset_id)

    @app.post("/v1/store/{asset_id}/publish", dependencies=[Admin])
    async def store_publish(
        asset_id: str, body: Annotated[StorePublishIn | None, Body()] = None
    ) -> dict[str, Any]:
        return await service.store_publish(asset_id, body.version if body else None)

    @app.get("/v1/addins", dependencies=[Admin])
    async def list_addins() -> list[dict[str, Any]]:
        return await service.list_addins()

    @app.get("/v1/addins/{addin_id}", dependencies=[Admin])
    async def get_addin(addin_id: str) -> dict[str, Any]:
        return await service.get_addin(addin_id)

    @app.delete("/v1/addins/{addin_id}", dependencies=[Admin])
    async def remove_addin(addin_id: str) -> dict[str, Any]:
        return await service.remove_addin(addin_id)

    @app.post("/v1/addins/{addin_id}/consent", dependencies=[Admin])
    async def consent(addin_id: str) -> dict[str, Any]:
        return await service.consent(addin_id)

    @app.post("/v1/addins/{addin_id}/enable", dependencies=[Admin])
    async def enable(addin_id: str) -> dict[str, Any]:
        return await service.set_enabled(addin_id, True)

    @app.post("/v1/addins/{addin_id}/disable", dependencies=[Admin])
    async def disable(addin_id: str) -> dict[str, Any]:
        return await service.set_enabled(addin_id, False)

    @app.post("/v1/addins/{addin_id}/assign", dependencies=[Admin])
    async def assign(addin_id: str, body: AssignIn) -> dict[str, Any]:
        return await service.assign(addin_id, body.target, body.target_id, body.mode)

    @app.post("/v1/addins/{addin_id}/unassign", dependencies=[Admin])
    async def unassign(addin_id: str, body: UnassignIn) -> dict[str, Any]:
        return await service.unassign(addin_id, body.target, body.target_id)

    # -- anti-entropy (server_stub/antientropy.py) --------------------------------------------
    @app.get("/v1/agents/{user_id}/digest", dependencies=[Depends(agent_or_admin)])
    async def agent_digest(user_id: str) -> dict[str, Any]:
        return await user_digest(service, user_id)

    @app.get("/v1/agents/{user_id}/state", dependencies=[Depends(agent_or_admin)])
    async def agent_state(user_id: str) -> dict[str, Any]:
        return await user_state(service, user_id)

    # -- troubleshooting ---------------------------------------------------------------------
    @app.get("/v1/explain", dependencies=[Admin])
    async def explain(user: str, addin: str) -> dict[str, Any]:
        return await service.explain(user, addin)

    @app.get("/v1/status", dependencies=[Admin])
    async def status(addin: str | None = None) -> dict[str, Any]:
        return await service.status(addin)

    return app

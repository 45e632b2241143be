"""The HTTP API (FastAPI): admin operations, reads, anti-entropy and immutable manifests.

Thin: every route validates its input shape and calls one `Service` method. One router per
resource (`directory`, `catalog`, `agents`, `troubleshooting`, `manifests`); `auth` holds
the bearer-token checks and the error answers. Tokens are compared in constant time; the
admin token may also fetch manifests. `guard` checks the token and caps the body before
anything reads it. Errors are ``{"detail": "..."}`` with 400
(malformed), 401, 404, 409, 413, 422 or 503.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from server_stub.api import agents, catalog, directory, manifests, troubleshooting
from server_stub.api.auth import Tokens, install_error_handlers
from server_stub.api.guard import RequestGuard
from server_stub.api.manifests import MANIFEST_MEMORY, ManifestFastPath
from server_stub.service import Service

__all__ = ["MANIFEST_MEMORY", "ManifestFastPath", "create_app"]


def create_app(service: Service, *, admin_token: str, agent_token: str) -> FastAPI:
    if not admin_token or not agent_token:
        raise ValueError("both an admin token and an agent token are required")
    tokens = Tokens(admin=admin_token, agent=agent_token)
    app = FastAPI(
        title="addin-server",
        version="1",
        description="Deployment service stub: directory, catalog, assignments, manifests.",
    )
    install_error_handlers(app)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"ok": True, "revision": await service.revision()}

    # Inside the manifest fast path (added later, so outermost): a cached manifest download
    # is authenticated there and costs no more; every other request passes the guard.
    app.add_middleware(RequestGuard, admin=admin_token, agent=agent_token)
    manifest_bytes: dict[str, bytes] = {}
    app.add_middleware(
        ManifestFastPath,
        cache=manifest_bytes,
        tokens=(agent_token.encode(), admin_token.encode()),
    )
    app.include_router(manifests.router(service, tokens, manifest_bytes))
    app.include_router(directory.router(service, tokens))
    app.include_router(catalog.router(service, tokens))
    app.include_router(agents.router(service, tokens))
    app.include_router(troubleshooting.router(service, tokens))
    return app

"""The HTTP API (FastAPI): admin operations, reads, anti-entropy and immutable manifests.

Thin: every route validates its input shape and calls one `Service` method. One router per
resource (`directory`, `catalog`, `agents`, `troubleshooting`, `manifests`); `auth` holds
the bearer-token checks (admin, operator and helpdesk tokens by role, device tokens, the
--insecure shared agent token) and the error answers. Tokens are compared in constant time;
the admin-side tokens may also fetch manifests. `audit` serves the audit log; the console
(`server_stub/console/`) is mounted at /console. `guard` checks the token and caps the body before
anything reads it. Errors are ``{"detail": "..."}`` with 400
(malformed), 401, 403 (a device token on another user's route), 404, 409, 413, 422 or 503.
"""

from __future__ import annotations

from fastapi import FastAPI

from server_stub.api import (
    agents,
    audit,
    catalog,
    directory,
    health,
    manifests,
    rollouts,
    troubleshooting,
)
from server_stub.api.auth import Tokens, install_error_handlers
from server_stub.api.guard import RequestGuard
from server_stub.api.manifests import MANIFEST_MEMORY, ManifestFastPath
from server_stub.health import DEFAULT_MAX_OUTBOX_LAG, BrokerLink, Readiness
from server_stub.metrics import HttpMetrics, ServerMetrics
from server_stub.roles import Principals
from server_stub.service import Service

__all__ = ["MANIFEST_MEMORY", "ManifestFastPath", "create_app"]


def create_app(
    service: Service,
    *,
    admin_token: str | None = None,
    agent_token: str | None,
    principals: Principals | None = None,
    console: bool = True,
    https: bool = False,
    broker: BrokerLink | None = None,
    metrics: ServerMetrics | None = None,
    metrics_token: str | None = None,
    max_outbox_lag: float = DEFAULT_MAX_OUTBOX_LAG,
) -> FastAPI:
    """The API (and the console at /console). Admins, operators and helpdesk authenticate
    with the tokens of `principals` (`admin_token` alone: one admin named "admin"). Agents
    authenticate with their device's token (looked up in the database on every request) or,
    when `agent_token` is given (--insecure servers), the shared token. `broker` (the
    publisher) is what /readyz checks; with `metrics`, /metrics serves them and every
    request is timed."""
    if principals is None:
        if not admin_token:
            raise ValueError("an admin token is required")
        principals = Principals.from_specs([], admin_token)
    if agent_token == "":
        raise ValueError("an agent token must not be empty")
    tokens = Tokens(principals=principals, agent=agent_token)
    devices = service.devices.user_of_token
    app = FastAPI(
        title="addin-server",
        version="1",
        description="Deployment service stub: directory, catalog, assignments, manifests.",
    )
    install_error_handlers(app)
    app.include_router(
        health.router(
            service, Readiness(service.database, broker, max_outbox_lag), metrics, metrics_token
        )
    )

    # Inside the manifest fast path (added later, so outermost): a cached manifest download
    # is authenticated there and costs no more; every other request passes the guard.
    app.add_middleware(RequestGuard, principals=principals, agent=agent_token, devices=devices)
    manifest_bytes: dict[str, bytes] = {}
    static = principals.tokens() + (() if agent_token is None else (agent_token.encode(),))
    app.add_middleware(
        ManifestFastPath,
        cache=manifest_bytes,
        tokens=static,
        devices=devices,
    )
    app.include_router(manifests.router(service, tokens, manifest_bytes))
    app.include_router(directory.router(service, tokens))
    app.include_router(catalog.router(service, tokens))
    app.include_router(agents.router(service, tokens))
    app.include_router(troubleshooting.router(service, tokens))
    app.include_router(rollouts.router(service, tokens))
    app.include_router(audit.router(service, tokens))
    if console:
        from server_stub.console import mount_console

        mount_console(app, service, principals, https=https)
    if metrics is not None:
        # Outermost: the manifest fast path's answers are timed and counted too.
        app.add_middleware(HttpMetrics, metrics=metrics)
    return app

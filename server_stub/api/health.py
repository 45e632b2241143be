"""``/healthz`` (liveness), ``/readyz`` (readiness, `server_stub/health.py`) and ``/metrics``
(Prometheus text format, `server_stub/metrics.py`). Open, like a load balancer's or a
scraper's probe expects: they carry counts and reasons, no directory data. /metrics names
add-ins and versions: `--metrics-token` makes it require a bearer token of its own (never the
admin token, which a scraper must not hold)."""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from server_stub.health import Readiness
from server_stub.metrics import CONTENT_TYPE, ServerMetrics
from server_stub.service import Service


def router(
    service: Service,
    readiness: Readiness,
    metrics: ServerMetrics | None,
    metrics_token: str | None = None,
) -> APIRouter:
    r = APIRouter()

    @r.get("/healthz")
    async def healthz() -> dict[str, Any]:
        # Liveness only: the process answers. A database or broker problem is /readyz's.
        return {"ok": True, "revision": await service.revision()}

    @r.get("/readyz")
    async def readyz() -> JSONResponse:
        ready, body = await readiness.check()
        return JSONResponse(body, status_code=200 if ready else 503)

    if metrics is not None:

        expected = f"Bearer {metrics_token}".encode() if metrics_token else None

        @r.get("/metrics", response_class=Response)
        async def prometheus(request: Request) -> Response:
            given = request.headers.get("authorization", "").encode()
            if expected is not None and not hmac.compare_digest(given, expected):
                return JSONResponse(
                    {"detail": "missing or wrong bearer token"},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
            return Response(await metrics.render(), media_type=CONTENT_TYPE)

    return r

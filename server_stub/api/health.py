"""``/healthz`` (liveness), ``/readyz`` (readiness, `server_stub/health.py`) and ``/metrics``
(Prometheus text format, `server_stub/metrics.py`). Open, like a load balancer's or a
scraper's probe expects: they carry counts and reasons, no directory or catalog data."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from server_stub.health import Readiness
from server_stub.metrics import CONTENT_TYPE, ServerMetrics
from server_stub.service import Service


def router(service: Service, readiness: Readiness, metrics: ServerMetrics | None) -> APIRouter:
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

        @r.get("/metrics", response_class=Response)
        async def prometheus() -> Response:
            return Response(await metrics.render(), media_type=CONTENT_TYPE)

    return r

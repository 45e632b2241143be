"""`GET /v1/audit`: the audit log, newest first, filtered (every role may read it)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from server_stub.api.auth import Tokens
from server_stub.service import Service
from server_stub.service.audit import MAX_AUDIT_ROWS


def router(service: Service, tokens: Tokens) -> APIRouter:
    r = APIRouter(dependencies=[tokens.admin_only])

    @r.get("/v1/audit")
    async def audit(
        since: Annotated[float | None, Query(description="epoch seconds")] = None,
        actor: str | None = None,
        operation: str | None = None,
        limit: Annotated[int, Query(ge=1, le=MAX_AUDIT_ROWS)] = 200,
    ) -> list[dict[str, Any]]:
        return await service.audit.entries(
            since=since, actor=actor, operation=operation, limit=limit
        )

    return r

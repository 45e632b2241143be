"""Routes for `explain` (why a user is or is not entitled) and `status` (rollout progress)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from server_stub.api.auth import Tokens
from server_stub.service import Service


def router(service: Service, tokens: Tokens) -> APIRouter:
    r = APIRouter(dependencies=[tokens.admin_only])

    @r.get("/v1/explain")
    async def explain(user: str, addin: str) -> dict[str, Any]:
        return await service.explain(user, addin)

    @r.get("/v1/status")
    async def status(addin: str | None = None) -> dict[str, Any]:
        return await service.status(addin)

    return r

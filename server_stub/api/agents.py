"""Anti-entropy routes for agents: one user's digest and retained state
(`server_stub/antientropy.py`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from server_stub.antientropy import user_digest, user_state
from server_stub.api.auth import Tokens
from server_stub.service import Service


def router(service: Service, tokens: Tokens) -> APIRouter:
    r = APIRouter(dependencies=[tokens.agent_or_admin])

    @r.get("/v1/agents/{user_id}/digest")
    async def agent_digest(user_id: str) -> dict[str, Any]:
        return await user_digest(service, user_id)

    @r.get("/v1/agents/{user_id}/state")
    async def agent_state(user_id: str) -> dict[str, Any]:
        return await user_state(service, user_id)

    return r

"""Routes for rollouts and rollbacks (``/v1/rollouts``), with the admin token.

``POST /v1/rollouts`` starts one (``"rollback": true`` for a rollback); ``GET`` lists the
running and paused ones (``?all=true``: every one, ``?addin=``: of one add-in);
``GET /v1/rollouts/{id}`` shows rings, counts, the gate now and the timeline;
``POST /v1/rollouts/{id}/advance|pause|resume|abort`` are the admin's decisions."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from server_stub.api.auth import Tokens
from server_stub.service import Service


class RolloutIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    addin: str
    version: str
    rings: list[str] = Field(default=[], max_length=16)
    """``NAME=TARGET[+TARGET]``, e.g. ``pilot=group:pilot``; none: everyone at once."""
    gate: str | None = None
    """``applied>=95%,failed=0,wait=10m``; none: advanced by an admin only."""
    rollback: bool = False


def router(service: Service, tokens: Tokens) -> APIRouter:
    r = APIRouter(dependencies=[tokens.admin_only])
    ro = service.rollouts

    @r.post("/v1/rollouts")
    async def start(body: RolloutIn) -> dict[str, Any]:
        return await ro.start(
            body.addin, body.version, body.rings, body.gate, rollback=body.rollback
        )

    @r.get("/v1/rollouts")
    async def list_rollouts(addin: str | None = None, all: bool = False) -> list[dict[str, Any]]:
        return await ro.list_rollouts(addin, all)

    @r.get("/v1/rollouts/{rollout_id}")
    async def get(rollout_id: int) -> dict[str, Any]:
        return await ro.get(rollout_id)

    @r.post("/v1/rollouts/{rollout_id}/advance")
    async def advance(rollout_id: int) -> dict[str, Any]:
        return await ro.advance(rollout_id)

    @r.post("/v1/rollouts/{rollout_id}/{action}")
    async def set_state(
        rollout_id: int, action: Literal["pause", "resume", "abort"]
    ) -> dict[str, Any]:
        return await ro.set_state(rollout_id, action)

    return r

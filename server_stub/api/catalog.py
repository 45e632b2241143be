"""Routes for the catalog (LOB and Store add-ins, consent, on/off) and assignments."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from server_stub.api.auth import Tokens
from server_stub.api.guard import read_body
from server_stub.service import Service


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StoreAddIn(_In):
    asset_id: str


class StorePublishIn(_In):
    version: str | None = None


class AssignIn(_In):
    target: Literal["everyone", "user", "group", "me"]
    target_id: str | None = None
    mode: Literal["fixed", "optional", "available"]
    except_: list[str] = Field(default=[], alias="except", max_length=200)
    """``group:G`` / ``user:U`` excluded from this assignment (an exclusion wins)."""


class UnassignIn(_In):
    target: Literal["everyone", "user", "group", "me"]
    target_id: str | None = None


_XML_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/xml": {"schema": {"type": "string"}}},
    }
}


def router(service: Service, tokens: Tokens) -> APIRouter:
    r = APIRouter(dependencies=[tokens.admin_only])

    @r.post("/v1/addins", openapi_extra=_XML_BODY)
    async def add_lob(request: Request, staged: bool = False) -> Any:
        content = bytes(await read_body(request))  # at most 512 KB: RequestGuard
        if not content:
            return JSONResponse({"detail": "empty body: send the manifest XML"}, 400)
        return await service.add_lob(content, staged)

    @r.post("/v1/addins/store")
    async def add_store(body: StoreAddIn) -> dict[str, Any]:
        return await service.add_store(body.asset_id)

    @r.post("/v1/store/{asset_id}/publish")
    async def store_publish(
        asset_id: str, body: Annotated[StorePublishIn | None, Body()] = None
    ) -> dict[str, Any]:
        return await service.store_publish(asset_id, body.version if body else None)

    @r.get("/v1/addins")
    async def list_addins() -> list[dict[str, Any]]:
        return await service.list_addins()

    @r.get("/v1/addins/{addin_id}")
    async def get_addin(addin_id: str) -> dict[str, Any]:
        return await service.get_addin(addin_id)

    @r.delete("/v1/addins/{addin_id}")
    async def remove_addin(addin_id: str) -> dict[str, Any]:
        return await service.remove_addin(addin_id)

    @r.post("/v1/addins/{addin_id}/consent")
    async def consent(addin_id: str) -> dict[str, Any]:
        return await service.consent(addin_id)

    @r.post("/v1/addins/{addin_id}/enable")
    async def enable(addin_id: str) -> dict[str, Any]:
        return await service.set_enabled(addin_id, True)

    @r.post("/v1/addins/{addin_id}/disable")
    async def disable(addin_id: str) -> dict[str, Any]:
        return await service.set_enabled(addin_id, False)

    @r.post("/v1/addins/{addin_id}/assign")
    async def assign(addin_id: str, body: AssignIn) -> dict[str, Any]:
        return await service.assign(
            addin_id, body.target, body.target_id, body.mode, body.except_
        )

    @r.post("/v1/addins/{addin_id}/unassign")
    async def unassign(addin_id: str, body: UnassignIn) -> dict[str, Any]:
        return await service.unassign(addin_id, body.target, body.target_id)

    return r

"""Routes for users, groups, membership, nesting, the tenant policy and the bulk load."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from server_stub.api.auth import Tokens
from server_stub.api.guard import read_body
from server_stub.service import Service


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UserIn(_In):
    id: str
    name: str | None = None


class GroupIn(_In):
    id: str
    name: str | None = None


class PolicyIn(_In):
    nested_groups: bool


_ORG_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"type": "object"}}},
    }
}


def router(service: Service, tokens: Tokens) -> APIRouter:
    r = APIRouter(dependencies=[tokens.admin_only])

    @r.post("/v1/users")
    async def create_user(body: UserIn) -> dict[str, Any]:
        return await service.create_user(body.id, body.name)

    @r.delete("/v1/users/{user_id}")
    async def delete_user(user_id: str) -> dict[str, Any]:
        return await service.delete_user(user_id)

    @r.get("/v1/users/{user_id}")
    async def get_user(user_id: str) -> dict[str, Any]:
        return await service.get_user(user_id)

    @r.post("/v1/groups")
    async def create_group(body: GroupIn) -> dict[str, Any]:
        return await service.create_group(body.id, body.name)

    @r.delete("/v1/groups/{group_id}")
    async def delete_group(group_id: str) -> dict[str, Any]:
        return await service.delete_group(group_id)

    @r.get("/v1/groups/{group_id}")
    async def get_group(group_id: str) -> dict[str, Any]:
        return await service.get_group(group_id)

    @r.put("/v1/groups/{group_id}/members/{user_id}")
    async def add_member(group_id: str, user_id: str) -> dict[str, Any]:
        return await service.add_member(group_id, user_id)

    @r.delete("/v1/groups/{group_id}/members/{user_id}")
    async def remove_member(group_id: str, user_id: str) -> dict[str, Any]:
        return await service.remove_member(group_id, user_id)

    @r.put("/v1/groups/{child}/parents/{parent}")
    async def nest(child: str, parent: str) -> dict[str, Any]:
        return await service.nest(child, parent)

    @r.delete("/v1/groups/{child}/parents/{parent}")
    async def unnest(child: str, parent: str) -> dict[str, Any]:
        return await service.unnest(child, parent)

    @r.put("/v1/policy")
    async def set_policy(body: PolicyIn) -> dict[str, Any]:
        return await service.set_policy(body.nested_groups)

    @r.post("/v1/org", openapi_extra=_ORG_BODY)
    async def load_org(request: Request) -> Any:
        # Read as it streams into one buffer and parsed from it: FastAPI's own body
        # parameter would hold the chunks, their joined copy and the parsed document at
        # once, for a document of up to 64 MB.
        try:
            document = json.loads(await read_body(request))
        except ValueError as e:
            return JSONResponse({"detail": f"malformed request: body is not JSON ({e})"}, 400)
        except RecursionError:
            # Arrays or objects nested past the parser's depth ("[[[[..."): JSON, but no
            # ORG document; without this the request ended in a 500.
            return JSONResponse({"detail": "malformed request: body: nested too deeply"}, 400)
        if not isinstance(document, dict):
            return JSONResponse({"detail": "malformed request: body: must be an object"}, 400)
        return await service.load_org(document)

    return r

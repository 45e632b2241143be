"""Bearer tokens (admins, operators and helpdesk by role, the shared agent token, device
tokens) and the API's error answers.

A device token (issued by `addin-server enroll`, only its sha256 stored) is looked up in the
database on every request, so `addin-server revoke` refuses it from the next request on,
whichever process revoked it. It serves the manifests and `/v1/agents/{user}/...` of the
device's own user only (403 for another user). The shared agent token exists only on a
server started with --insecure."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.params import Depends as DependsParam
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from addin_core.validation import validation_problems
from server_stub.db import TRANSIENT_ERRORS
from server_stub.roles import Principal, Principals, refusal
from server_stub.service import OperationError


class _Unauthorized(Exception):
    pass


_bearer = HTTPBearer(auto_error=False)
Creds = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _match(creds: HTTPAuthorizationCredentials | None, *tokens: str) -> bool:
    if creds is None or creds.scheme.lower() != "bearer":
        return False
    given = creds.credentials.encode()
    return any(hmac.compare_digest(given, t.encode()) for t in tokens)


def _principal(creds: HTTPAuthorizationCredentials | None, principals: Principals) -> Principal | None:
    if creds is None or creds.scheme.lower() != "bearer":
        return None
    return principals.match(creds.credentials.encode())


class _Forbidden(Exception):
    pass


class _RoleRefused(Exception):
    pass


DeviceLookup = Callable[[bytes], Awaitable[str | None]]
"""A device token -> the user of its enrolled, unrevoked device (None: no such device)."""

DEVICE_USER = "device_user"
"""Where `RequestGuard` leaves the user of the device token it accepted (request scope state)."""

PRINCIPAL = "principal"
"""Where `RequestGuard` leaves the `Principal` of the admin-side token it accepted."""


def forbidden_detail(device_user: str) -> str:
    return (
        f"this device acts for user {device_user!r}: it may read /v1/agents/{device_user}/... only"
    )


@dataclass(frozen=True)
class Tokens:
    principals: Principals
    agent: str | None
    """The shared agent token (servers started with --insecure only)."""

    @property
    def admin_only(self) -> DependsParam:
        """Route dependency: an admin-side token (admin, operator, helpdesk) whose role may
        send this method to this path (`roles.refusal`)."""
        principals = self.principals

        # async: FastAPI runs a plain `def` dependency in a worker thread, a hop per request
        # that cost the manifest endpoint a third of its CPU when a whole fleet downloads.
        async def check(request: Request, creds: Creds) -> None:
            principal = _principal(creds, principals)
            if principal is None:
                raise _Unauthorized()
            why = refusal(principal, request.method, request.url.path)
            if why is not None:
                raise _RoleRefused(why)

        return Depends(check)

    @property
    def agent_or_admin(self) -> DependsParam:
        """Route dependency: the admin token, the shared agent token, or a device token
        (which `RequestGuard` has looked up) of the user the route's `user_id` names."""
        principals, agent = self.principals, self.agent

        async def check(request: Request, creds: Creds) -> None:
            if _principal(creds, principals) is not None:
                return
            if agent is not None and _match(creds, agent):
                return
            device_user = request.scope.get("state", {}).get(DEVICE_USER)
            if device_user is None:
                raise _Unauthorized()
            user_id = request.path_params.get("user_id")
            if user_id is not None and user_id != device_user:
                raise _Forbidden(device_user)

        return Depends(check)


async def _unauthorized(_: Request, __: Exception) -> JSONResponse:
    return JSONResponse(
        {"detail": "missing or wrong bearer token"},
        status_code=401,
        headers={"WWW-Authenticate": "Bearer"},
    )


async def _forbidden(_: Request, e: Exception) -> JSONResponse:
    return JSONResponse({"detail": forbidden_detail(str(e.args[0]))}, status_code=403)


async def _role_refused(_: Request, e: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(e.args[0])}, status_code=403)


async def _refused(_: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, OperationError)
    body: dict[str, Any] = {"detail": e.message}
    if e.findings:
        body["findings"] = e.findings
    return JSONResponse(body, status_code=e.status)


async def _storage(_: Request, e: Exception) -> JSONResponse:
    # Locked by another writer past the busy timeout, disk full, I/O error: the
    # transaction was rolled back, so nothing changed and the admin may retry.
    return JSONResponse(
        {
            "detail": f"the server's database could not be written ({e}); nothing was changed, retry later"
        },
        status_code=503,
    )


async def _malformed(_: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, RequestValidationError)
    problems = validation_problems(e.errors(), "body", skip={"body"})
    return JSONResponse({"detail": "malformed request: " + problems}, 400)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(_Unauthorized, _unauthorized)
    app.add_exception_handler(_Forbidden, _forbidden)
    app.add_exception_handler(_RoleRefused, _role_refused)
    app.add_exception_handler(OperationError, _refused)
    for error in TRANSIENT_ERRORS:
        app.add_exception_handler(error, _storage)
    app.add_exception_handler(RequestValidationError, _malformed)

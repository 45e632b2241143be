"""Bearer tokens (admin, agent) and the API's error answers."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.params import Depends as DependsParam
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from addin_core.validation import validation_problems
from server_stub.db import TRANSIENT_ERRORS
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


@dataclass(frozen=True)
class Tokens:
    admin: str
    agent: str

    @property
    def admin_only(self) -> DependsParam:
        """Route dependency: the admin token."""
        admin = self.admin

        # async: FastAPI runs a plain `def` dependency in a worker thread, a hop per request
        # that cost the manifest endpoint a third of its CPU when a whole fleet downloads.
        async def check(creds: Creds) -> None:
            if not _match(creds, admin):
                raise _Unauthorized()

        return Depends(check)

    @property
    def agent_or_admin(self) -> DependsParam:
        """Route dependency: the agent token or the admin token."""
        agent, admin = self.agent, self.admin

        async def check(creds: Creds) -> None:
            if not _match(creds, agent, admin):
                raise _Unauthorized()

        return Depends(check)


async def _unauthorized(_: Request, __: Exception) -> JSONResponse:
    return JSONResponse(
        {"detail": "missing or wrong bearer token"},
        status_code=401,
        headers={"WWW-Authenticate": "Bearer"},
    )


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
    app.add_exception_handler(OperationError, _refused)
    for error in TRANSIENT_ERRORS:
        app.add_exception_handler(error, _storage)
    app.add_exception_handler(RequestValidationError, _malformed)

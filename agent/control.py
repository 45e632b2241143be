"""The daemon's local control endpoint: a tiny HTTP/1.1 server on loopback or a unix socket.

The host app's launch hook (or `addin-agent launch HOST`) calls it. Endpoints::

    GET  /v1/installed?host=Word   -> {"host": "Word", "installed": {id: version}}
    POST /v1/launch/{host}         -> {"host": ..., "installed": {...}, "applied": n}
    POST /v1/install/{addin}       -> {"message": ...}        (409 with "detail" if refused)
    POST /v1/remove/{addin}        -> {"message": ...}
    GET  /v1/status                -> {"connected": bool, "revision": R, ...}

Deliberately minimal (one request per connection, small JSON bodies): it only ever talks
to local processes, and must not pull a web framework into every agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Mapping
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

from addin_core.protocol import Host
from agent.config import parse_control
from agent.model import AgentRefusal
from agent.pending import PendingChange, PendingKey

log = logging.getLogger("addin_agent.control")

MAX_REQUEST = 16 * 1024


def parse_endpoint(spec: str) -> tuple[str, int] | str:
    """(host, port) on loopback, or a unix socket path (see `agent.config.parse_control`)."""
    return parse_control(spec)


class ControlEndpointError(RuntimeError):
    """The socket or port cannot be created (folder missing, address in use, in use by another
    process, no permission)."""


# The name used by the single-instance checks; one error class for every way opening fails.
ControlError = ControlEndpointError


def _claim_socket_path(path: str) -> None:
    """Make way for our socket at `path`: remove one a dead process left behind, refuse
    when a live process answers on it (its launches would come to us)."""
    if not os.path.exists(path):
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect(path)
        except OSError:
            os.unlink(path)
            return
    raise ControlError(
        f"control socket {path} is in use by another process (another addin-agent?); "
        "give this agent its own `control` path"
    )


class Controlled(Protocol):
    """What the endpoint asks of the agent (agent/daemon.py's `Agent`)."""

    @property
    def pending(self) -> Mapping[PendingKey, PendingChange]: ...
    @property
    def connected(self) -> bool: ...
    @property
    def revision(self) -> int: ...
    def installed(self) -> Mapping[Host, Mapping[str, str]]: ...
    def entitlements(self) -> Mapping[str, Any]: ...
    async def launch(self, host: Host) -> dict[str, str]: ...
    async def install(self, name_or_id: str) -> str: ...
    async def remove(self, name_or_id: str) -> str: ...


class ControlServer:
    def __init__(self, agent: Controlled, spec: str) -> None:
        self.agent = agent
        self.spec = spec
        self.server: asyncio.AbstractServer | None = None
        self._socket_id: tuple[int, int] | None = None
        """(st_dev, st_ino) of the unix socket this server bound: the only one it removes."""

    async def start(self) -> None:
        where = parse_endpoint(self.spec)
        try:
            if isinstance(where, str):
                _claim_socket_path(where)
                self.server = await asyncio.start_unix_server(self._handle, path=where)
                os.chmod(where, 0o600)
                st = os.stat(where)
                self._socket_id = (st.st_dev, st.st_ino)
            else:
                self.server = await asyncio.start_server(self._handle, where[0], where[1])
        except OSError as e:
            raise ControlError(
                f"control endpoint {self.spec} cannot be created: {e.strerror or e}"
            ) from e
        log.info("control endpoint on %s", self.spec)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):  # TimeoutError included
                async with asyncio.timeout(2):
                    await self.server.wait_closed()
            self.server = None
        where = parse_endpoint(self.spec)
        if isinstance(where, str) and self._socket_id is not None:
            # Remove the socket only if it is still the one we bound: another daemon may
            # have replaced a path we no longer own.
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(where)
                if (st.st_dev, st.st_ino) == self._socket_id:
                    os.unlink(where)
            self._socket_id = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        status, body = 500, {"detail": "internal error"}
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            if len(head) > MAX_REQUEST:
                raise ValueError("request too large")
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            method, target, _ = line.split(" ", 2)
            status, body = await self.route(method, target)
        except (ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
            status, body = 400, {"detail": f"bad request: {e}"}
        except TimeoutError:
            status, body = 408, {"detail": "request timeout"}
        except Exception as e:  # report, never crash the daemon
            log.exception("control request failed")
            status, body = 500, {"detail": str(e)}
        data = json.dumps(body).encode()
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 409: "Conflict"}.get(
            status, "Error"
        )
        writer.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
            + data
        )
        with contextlib.suppress(Exception):
            await writer.drain()
            writer.close()
            await writer.wait_closed()

    async def route(self, method: str, target: str) -> tuple[int, dict[str, Any]]:
        url = urlsplit(target)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        a = self.agent
        try:
            match method, parts:
                case "GET", ["v1", "installed"]:
                    host = Host(parse_qs(url.query).get("host", [""])[0])
                    return 200, {"host": host.value, "installed": a.installed().get(host, {})}
                case "POST", ["v1", "launch", host_name]:
                    host = Host(host_name)
                    before = len([k for k in a.pending if k[0] == host and a.pending[k].ready])
                    installed = await a.launch(host)
                    return 200, {"host": host.value, "installed": installed, "applied": before}
                case "POST", ["v1", "install", addin]:
                    return 200, {"message": await a.install(addin)}
                case "POST", ["v1", "remove", addin]:
                    return 200, {"message": await a.remove(addin)}
                case "GET", ["v1", "status"]:
                    return 200, {
                        "connected": a.connected,
                        "revision": a.revision,
                        "entitlements": len(a.entitlements()),
                        "pending": len(a.pending),
                    }
        except AgentRefusal as e:
            return 409, {"detail": str(e)}
        except ValueError as e:
            return 400, {"detail": str(e)}
        return 404, {"detail": f"no such endpoint: {method} {url.path}"}

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
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from addin_core.protocol import Host

if TYPE_CHECKING:
    from agent.daemon import Agent

log = logging.getLogger("addin_agent.control")

MAX_REQUEST = 16 * 1024


def parse_endpoint(spec: str) -> tuple[str, int] | str:
    """``"8765"`` or ``"127.0.0.1:8765"`` -> (host, port); anything with a slash -> socket path."""
    if "/" in spec:
        return spec
    host, _, port = spec.rpartition(":")
    host = host or "127.0.0.1"
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"control endpoint {spec!r} must be on loopback (127.0.0.1)")
    return host, int(port)


class ControlServer:
    def __init__(self, agent: Agent, spec: str) -> None:
        self.agent = agent
        self.spec = spec
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        where = parse_endpoint(self.spec)
        if isinstance(where, str):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(where)
            self.server = await asyncio.start_unix_server(self._handle, path=where)
            os.chmod(where, 0o600)
        else:
            self.server = await asyncio.start_server(self._handle, where[0], where[1])
        log.info("control endpoint on %s", self.spec)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):  # TimeoutError included
                async with asyncio.timeout(2):
                    await self.server.wait_closed()
            self.server = None
        where = parse_endpoint(self.spec)
        if isinstance(where, str):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(where)

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
        from agent.daemon import AgentRefusal

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

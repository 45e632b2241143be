"""The daemon's local control endpoint: a tiny HTTP/1.1 server on a unix socket.

Only the agent's own user (and root) may use it: the socket is created mode 0600, in a folder
no other user can write (so nobody can replace it or squat its path), and every connection's
peer credentials (SO_PEERCRED) are checked before the request is read. There is no TCP
listener: on a port, any local user, or a process that took the port first, could talk to it.

The host app's launch hook (or `addin-agent launch HOST`) calls it. Endpoints::

    GET  /v1/installed?host=Word   -> {"host": "Word", "installed": {id: version}}
    POST /v1/launch/{host}         -> {"host": ..., "installed": {...}, "applied": n}
    POST /v1/install/{addin}       -> {"message": ...}        (409 with "detail" if refused)
    POST /v1/remove/{addin}        -> {"message": ...}
    GET  /v1/status                -> {"connected": bool, "revision": R, ...}

On Windows, where there is no unix socket with peer credentials, the same endpoint listens on
127.0.0.1 with a per-user token instead (agent/control_windows.py says why that is enough);
that fallback is never used on Linux or macOS.

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
import stat
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

from addin_core.protocol import Host
from agent import control_windows
from agent.config import parse_control
from agent.control_client import trusted_uid as trusted_uid  # re-exported
from agent.model import AgentRefusal
from agent.pending import PendingChange, PendingKey

log = logging.getLogger("addin_agent.control")

MAX_REQUEST = 16 * 1024


def parse_endpoint(spec: str) -> str:
    """The unix socket path (see `agent.config.parse_control`)."""
    return parse_control(spec)


class ControlEndpointError(RuntimeError):
    """The socket cannot be created (folder missing or writable by others, in use by another
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


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a connected unix socket (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def check_socket_folder(path: str) -> None:
    """Refuse a folder another user could write: they could remove our socket and put their
    own in its place, and the launch hook would talk to them."""
    folder = os.path.dirname(os.path.abspath(path))
    st = os.stat(folder)
    if not trusted_uid(st.st_uid) or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ControlError(
            f"control socket {path}: its folder {folder} (mode {stat.S_IMODE(st.st_mode):04o}, "
            f"owner uid {st.st_uid}) can be written by other users; put the socket in a folder "
            "only this user can write (e.g. /run/addin-agent, or $XDG_RUNTIME_DIR)"
        )


def _bind_private(path: str) -> socket.socket:
    """A listening unix socket at `path`, mode 0600 from its creation: the umask is tightened
    for the bind, so there is no moment when another user could connect."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(64)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class _Refused(Exception):
    """The peer is not allowed: answer 403 without acting on its request."""


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
        self._token_endpoint: control_windows.Endpoint | None = None
        """Windows: the port and token published at `spec` (None with a unix socket)."""

    async def start(self) -> None:
        where = parse_endpoint(self.spec)
        if control_windows.ENABLED:
            try:
                self.server, self._token_endpoint = await control_windows.start(
                    self._handle, Path(where)
                )
            except OSError as e:
                raise ControlError(
                    f"control endpoint {self.spec} cannot be created: {e.strerror or e}"
                ) from e
            log.info(
                "control endpoint on 127.0.0.1:%d (token in %s)", self._token_endpoint.port, where
            )
            return
        try:
            check_socket_folder(where)
            _claim_socket_path(where)
            self.server = await asyncio.start_unix_server(self._handle, sock=_bind_private(where))
            st = os.stat(where)
            self._socket_id = (st.st_dev, st.st_ino)
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
        if self._token_endpoint is not None:
            control_windows.remove_endpoint(Path(where), self._token_endpoint)
            self._token_endpoint = None
        if self._socket_id is not None:
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
            token = self._token_endpoint
            uid = -1 if token else peer_uid(writer.get_extra_info("socket"))
            async with asyncio.timeout(10):  # not wait_for: no Task per request
                head = await reader.readuntil(b"\r\n\r\n")
            if len(head) > MAX_REQUEST:
                raise ValueError("request too large")
            if token is not None:
                if not control_windows.authorized(head, token.token):
                    log.warning("control request without this agent's token refused")
                    status, body = 403, {"detail": "missing or wrong control token"}
                    raise _Refused
            elif not trusted_uid(uid):
                # The head is read (bounded, as for anyone) only so that closing does not
                # reset the connection before the refusal arrives; it is never acted on.
                log.warning("control request from uid %d refused (not this agent's user)", uid)
                status, body = 403, {"detail": f"uid {uid} may not use this agent's endpoint"}
                raise _Refused
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            method, target, _ = line.split(" ", 2)
            status, body = await self.route(method, target)
        except (ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
            status, body = 400, {"detail": f"bad request: {e}"}
        except _Refused:
            pass
        except TimeoutError:
            status, body = 408, {"detail": "request timeout"}
        except Exception as e:  # report, never crash the daemon
            log.exception("control request failed")
            status, body = 500, {"detail": str(e)}
        data = json.dumps(body).encode()
        reason = {
            200: "OK",
            400: "Bad Request",
            403: "Forbidden",
            404: "Not Found",
            409: "Conflict",
        }.get(status, "Error")
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

"""The client side of the daemon's control endpoint (agent/control.py): one HTTP request
over the unix socket (on Windows, the loopback port and token of agent/control_windows.py),
with the standard library's `http.client`. `launch`, `install` and `remove` call it; a whole
HTTP client library (httpx and what it imports) would cost more than the launch itself."""

from __future__ import annotations

import http.client
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

from agent.config_file import parse_control

TIMEOUT = 30.0


def trusted_uid(uid: int) -> bool:
    """The agent's own user, or root."""
    return uid in (os.getuid(), 0)


class UntrustedSocket(Exception):
    """The socket belongs to another user: never hand it a launch, nor believe its answer."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("agent", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self._path)
        except BaseException:
            s.close()
            raise
        self.sock = s


def call(control: str, method: str, path: str) -> tuple[int, Any] | None:
    """`method path` on the daemon whose endpoint `control` names: (status, decoded JSON
    body), or None when no daemon answers there. UntrustedSocket when the socket is not this
    user's (or root's)."""
    where = parse_control(control)
    headers: dict[str, str] = {}
    conn: http.client.HTTPConnection
    if sys.platform == "win32":  # a loopback port and this user's token (no unix sockets)
        from agent import control_windows

        endpoint = control_windows.read_endpoint(Path(where))
        if endpoint is None:
            return None
        conn = http.client.HTTPConnection("127.0.0.1", endpoint.port, timeout=TIMEOUT)
        headers["Authorization"] = f"Bearer {endpoint.token}"
    else:
        try:
            owner = os.stat(where).st_uid
        except OSError:
            return None
        if not trusted_uid(owner):
            raise UntrustedSocket(
                f"control socket {where} belongs to uid {owner}, not to this user; not using it"
            )
        conn = _UnixConnection(where, TIMEOUT)
    try:
        conn.request(method, path, headers=headers)
        r = conn.getresponse()
        body = r.read()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()
    try:
        return r.status, json.loads(body)
    except ValueError:
        return r.status, {"detail": f"daemon answered {r.status} with a body that is not JSON"}

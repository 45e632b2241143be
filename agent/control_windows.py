"""The control endpoint where a unix socket with peer credentials is not available: Windows.

Python on Windows has no AF_UNIX listener with peer credentials (no SO_PEERCRED), and asyncio
serves named pipes only through private methods of its proactor loop. So the daemon listens
on 127.0.0.1, on a port the OS picks, and every request must carry a random token (32 bytes)
that the daemon writes, with the port, to the `control` path in the user's agent folder
(``%LOCALAPPDATA%\\addin-agent``, which Windows' default ACL gives to that user, SYSTEM and
administrators only). Why that is acceptable:

- any local user can reach a loopback port, but not read the token: a request without it is
  refused (403) before anything is acted on, and the token is compared in constant time;
- a process that took a port first cannot catch the launch hook: the client connects only
  to the port written next to the token, which the daemon chose after binding;
- whoever can read the token file is this user or an administrator, who can read the agent's
  cache and config anyway.

Never used on Linux or macOS (`ENABLED` is false there): they have the unix socket, whose
peer is checked by the kernel. This module is the whole of the Windows-only control code; its
functions are plain and tested on Linux by calling them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import secrets
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

ENABLED = sys.platform == "win32"

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Endpoint:
    port: int
    token: str


def write_endpoint(path: Path, endpoint: Endpoint) -> None:
    """Write the port and token atomically, private from creation (0600; on Windows the
    folder's ACL is what keeps other users out)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"port": endpoint.port, "token": endpoint.token}, f)
    os.replace(tmp, path)


def read_endpoint(path: Path) -> Endpoint | None:
    """The running daemon's port and token; None when there is no (readable, well-formed)
    file: no daemon, and the caller acts on the cache instead."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        port, token = data["port"], data["token"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not (isinstance(port, int) and 0 < port < 65536 and isinstance(token, str) and token):
        return None
    return Endpoint(port, token)


def authorized(head: bytes, token: str) -> bool:
    """Whether the request head carries ``Authorization: Bearer <token>``."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"authorization":
            scheme, _, given = value.strip().partition(b" ")
            return scheme.lower() == b"bearer" and hmac.compare_digest(
                given.strip(), token.encode()
            )
    return False


async def start(handler: Handler, path: Path) -> tuple[asyncio.AbstractServer, Endpoint]:
    """Listen on 127.0.0.1 (a port the OS picks) and publish the port with a new token."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])
    endpoint = Endpoint(port, secrets.token_urlsafe(32))
    try:
        write_endpoint(path, endpoint)
    except BaseException:
        server.close()
        raise
    return server, endpoint


def remove_endpoint(path: Path, endpoint: Endpoint) -> None:
    """Remove the file only if it still holds our token (another daemon may have replaced it)."""
    if read_endpoint(path) == endpoint:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

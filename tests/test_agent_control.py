"""The control endpoint (agent/control.py) lets only the agent's own user, or root, talk to the
daemon: a unix socket created 0600 in a folder only its user can write, and every peer's
credentials (SO_PEERCRED) checked. The agent is a stand-in: this tests the endpoint alone."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from addin_core.protocol import Host
from agent.control import ControlServer
from agent.pending import PendingChange, PendingKey

NOBODY = 65534

# Run by another user: the stdlib only, one request, print the status line or the OSError.
CLIENT = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
    try:
        s.sendall(b"GET /v1/status HTTP/1.1\\r\\nHost: agent\\r\\n\\r\\n")
    except BrokenPipeError:
        pass  # refused before the request was read: the answer is still there to read
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    print(data.decode())
except OSError as e:
    print("OSError", e.errno)
"""


class StandIn:
    """Answers like an agent holding one entitlement; records launches."""

    def __init__(self) -> None:
        self.launches: list[Host] = []

    @property
    def pending(self) -> Mapping[PendingKey, PendingChange]:
        return {}

    @property
    def connected(self) -> bool:
        return True

    @property
    def revision(self) -> int:
        return 7

    def installed(self) -> Mapping[Host, Mapping[str, str]]:
        return {}

    def entitlements(self) -> Mapping[str, Any]:
        return {"a": object()}

    async def launch(self, host: Host) -> dict[str, str]:
        self.launches.append(host)
        return {}

    async def install(self, name_or_id: str) -> str:
        return "ok"

    async def remove(self, name_or_id: str) -> str:
        return "ok"


@pytest.fixture
def folder() -> Iterator[Path]:
    """A folder other users can reach (pytest's tmp_path is 0700 all the way), writable only
    by its owner: where a control socket belongs."""
    path = Path(tempfile.mkdtemp(prefix="addin-control-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def request(sock: Path, as_uid: int | None = None) -> str:
    """One GET /v1/status from a client process, as `as_uid` (via setpriv) or as us."""
    prefix = (
        ["setpriv", f"--reuid={as_uid}", f"--regid={as_uid}", "--clear-groups"]
        if as_uid is not None
        else []
    )
    proc = await asyncio.create_subprocess_exec(
        *prefix,
        sys.executable,
        "-I",
        "-c",
        CLIENT,
        str(sock),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    return out.decode()


def serve_and_ask(sock: Path, *clients: int | None, loosen: bool = False) -> list[str]:
    async def go() -> list[str]:
        server = ControlServer(StandIn(), str(sock))
        await server.start()
        try:
            if loosen:
                # As if the mode had been set wrong: the uid check must still hold.
                os.chmod(sock, 0o666)
            return [await request(sock, uid) for uid in clients]
        finally:
            await server.stop()

    return asyncio.run(go())


def test_socket_is_private_to_its_user(folder: Path) -> None:
    sock = folder / "agent.sock"

    async def go() -> os.stat_result:
        server = ControlServer(StandIn(), str(sock))
        await server.start()
        try:
            return sock.stat()
        finally:
            await server.stop()

    st = asyncio.run(go())
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.getuid()
    assert not sock.exists()  # removed at stop


def test_own_user_is_answered(folder: Path) -> None:
    (answer,) = serve_and_ask(folder / "agent.sock", None)
    assert answer.startswith("HTTP/1.1 200 OK")
    assert json.loads(answer.split("\r\n\r\n", 1)[1])["revision"] == 7


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")


@needs_root
def test_another_user_cannot_even_connect(folder: Path) -> None:
    (answer,) = serve_and_ask(folder / "agent.sock", NOBODY)
    assert answer.strip() == "OSError 13", answer  # EACCES: the socket is 0600


@needs_root
def test_another_user_is_refused_by_peer_credentials(folder: Path) -> None:
    nobody, own = serve_and_ask(folder / "agent.sock", NOBODY, None, loosen=True)
    assert nobody.startswith("HTTP/1.1 403 Forbidden"), nobody
    assert f"uid {NOBODY} may not use" in nobody and '"revision"' not in nobody
    assert own.startswith("HTTP/1.1 200 OK")

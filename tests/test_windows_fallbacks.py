"""The daemon's Windows-only paths, run here by plain calls: stopping on a signal where the
event loop has no signal handlers, and the control endpoint's loopback-port-and-token
channel (agent/control_windows.py). On Linux the daemon never opens that channel."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import stat
from pathlib import Path

import httpx
import pytest
from test_agent_control import StandIn

from addin_runtime.stop_signals import on_stop_signals
from agent import control_windows
from agent.control import ControlServer
from agent.control_windows import Endpoint, authorized, read_endpoint, write_endpoint


class NoSignalHandlers(asyncio.SelectorEventLoop):
    """Behaves like Windows' event loops: no add_signal_handler."""

    def add_signal_handler(self, sig: int, callback: object, *args: object) -> None:
        raise NotImplementedError


def test_stop_signals_fall_back_to_the_signal_module() -> None:
    loop = NoSignalHandlers()
    before = signal.getsignal(signal.SIGTERM)
    try:
        stopped = asyncio.Event()

        async def go() -> None:
            undo = on_stop_signals(asyncio.get_running_loop(), stopped.set)
            try:
                assert signal.getsignal(signal.SIGTERM) is not before
                os.kill(os.getpid(), signal.SIGTERM)
                await asyncio.wait_for(stopped.wait(), 10)
            finally:
                undo()

        loop.run_until_complete(go())
    finally:
        loop.close()
    assert signal.getsignal(signal.SIGTERM) is before  # undone


def test_stop_signals_use_the_loop_where_it_can() -> None:
    async def go() -> None:
        stopped = asyncio.Event()
        undo = on_stop_signals(asyncio.get_running_loop(), stopped.set)
        try:
            os.kill(os.getpid(), signal.SIGINT)
            await asyncio.wait_for(stopped.wait(), 10)
        finally:
            undo()

    asyncio.run(go())


def test_the_token_must_be_presented() -> None:
    head = b"GET /v1/status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n\r\n"
    assert authorized(head, "s3cret")
    assert authorized(head.replace(b"Authorization", b"authorization"), "s3cret")
    assert not authorized(head, "other")
    assert not authorized(head.replace(b"Bearer", b"Basic"), "s3cret")
    assert not authorized(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "s3cret")
    # A header line cannot smuggle the token in the request line.
    assert not authorized(b"GET /Authorization: Bearer s3cret HTTP/1.1\r\n\r\n", "s3cret")


def test_the_endpoint_file_is_private_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    write_endpoint(path, Endpoint(5123, "t0ken"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_endpoint(path) == Endpoint(5123, "t0ken")
    for bad in ("", "{", '{"port": 0, "token": "x"}', '{"port": 80}', '["x"]', '{"port": 1, "token": ""}'):  # fmt: skip
        path.write_text(bad)
        assert read_endpoint(path) is None, bad
    assert read_endpoint(tmp_path / "missing") is None


def test_on_linux_the_control_endpoint_is_a_unix_socket_only(tmp_path: Path) -> None:
    assert control_windows.ENABLED is False
    sock = tmp_path / "agent.sock"

    async def go() -> None:
        server = ControlServer(StandIn(), str(sock))
        await server.start()
        try:
            assert stat.S_ISSOCK(sock.stat().st_mode)
            assert server.server is not None
            assert all(s.family == socket.AF_UNIX for s in server.server.sockets)
        finally:
            await server.stop()

    asyncio.run(go())


def test_the_token_channel_answers_only_with_the_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The channel as Windows runs it (switched on here for this test only): real HTTP on
    127.0.0.1, the port and token read from the file as `addin-agent launch` does."""
    monkeypatch.setattr(control_windows, "ENABLED", True)
    path = tmp_path / "agent.sock"

    async def go() -> tuple[list[int], str]:
        server = ControlServer(StandIn(), str(path))
        await server.start()
        try:
            ep = read_endpoint(path)
            assert ep is not None
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ep.port}") as h:
                answers = [
                    await h.get("/v1/status"),
                    await h.get("/v1/status", headers={"Authorization": "Bearer wrong"}),
                    await h.get("/v1/status", headers={"Authorization": f"Bearer {ep.token}"}),
                ]
            return [r.status_code for r in answers], answers[2].text
        finally:
            await server.stop()

    codes, body = asyncio.run(go())
    assert codes == [403, 403, 200]
    assert json.loads(body)["revision"] == 7
    assert not path.exists()  # removed at stop: no stale port for the next client

"""Request bodies against a running `addin-server serve` on loopback: the token is checked
before the body is read, and every body is capped (413) whether or not it declares its
length. Raw sockets, so the test sends only part of a body and sees the answer arrive
before the rest was sent."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import ADMIN_TOKEN, AGENT_TOKEN, ServerProcess

from server_stub.api.guard import MAX_JSON_BYTES, MAX_ORG_BYTES
from simulator.mosquitto import MosquittoBroker

ANSWER_TIMEOUT = 15.0
"""Seconds to wait for an answer; the old server never answered before the whole body."""


@pytest.fixture
def server(tmp_path: Path, broker: MosquittoBroker) -> Iterator[ServerProcess]:
    srv = ServerProcess(tmp_path / "server.db", broker.url)
    srv.start()
    yield srv
    srv.stop()


def _partial_request(
    port: int, method: str, path: str, headers: dict[str, str], body_part: bytes
) -> tuple[int, dict[str, str], Any]:
    """Send the request line, `headers` and only `body_part` of the body, then read the
    answer: (status, headers, JSON body)."""
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_TIMEOUT) as s:
        s.sendall(head.encode() + body_part)
        data = b""
        for _ in range(10_000):  # bounded; each recv is bounded by the socket timeout
            chunk = s.recv(65536)
            data += chunk
            top, sep, rest = data.partition(b"\r\n\r\n")
            if sep:
                lines = top.decode().split("\r\n")
                got = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
                if len(rest) >= int(got.get("content-length", "0")):
                    status = int(lines[0].split()[1])
                    return status, got, json.loads(rest) if rest else None
            if not chunk:
                break
    raise AssertionError(f"no complete answer: {data[:300]!r}")


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def test_a_large_body_without_a_token_is_refused_before_it_is_read(
    server: ServerProcess,
) -> None:
    # 100 MB announced, 64 KB sent: the 401 comes without waiting for the rest.
    for path in ("/v1/org", "/v1/users", "/v1/addins"):
        status, headers, body = _partial_request(
            server.port,
            "POST",
            path,
            {"Content-Type": "application/json", "Content-Length": str(100 * 1024 * 1024)},
            b"{" + b" " * 65536,
        )
        assert status == 401, (path, body)
        assert body == {"detail": "missing or wrong bearer token"}
        assert headers["www-authenticate"] == "Bearer"
    # The agent token is not the admin's: refused the same way.
    status, _, _ = _partial_request(
        server.port,
        "POST",
        "/v1/org",
        {"Authorization": f"Bearer {AGENT_TOKEN}", "Transfer-Encoding": "chunked"},
        _chunk(b"{" + b" " * 65536),
    )
    assert status == 401
    assert server.proc is not None and server.proc.poll() is None


def test_an_authenticated_body_over_its_limit_is_refused_with_413(server: ServerProcess) -> None:
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}
    # Announced too large: refused up front, per route.
    status, _, body = _partial_request(
        server.port,
        "POST",
        "/v1/users",
        {**admin, "Content-Length": str(MAX_JSON_BYTES + 1)},
        b'{"id": "',
    )
    assert (status, body) == (413, {"detail": "request body is larger than 65536 bytes (64 KB)"})
    status, _, body = _partial_request(
        server.port, "POST", "/v1/org", {**admin, "Content-Length": str(MAX_ORG_BYTES + 1)}, b"{"
    )
    assert (status, body) == (413, {"detail": "ORG document is larger than 67108864 bytes (64 MB)"})
    # Chunked, no length: refused once the bytes received pass the limit, not at the end.
    status, _, body = _partial_request(
        server.port,
        "POST",
        "/v1/users",
        {**admin, "Transfer-Encoding": "chunked"},
        _chunk(b'{"id": "' + b"a" * (MAX_JSON_BYTES + 1)),
    )
    assert (status, body) == (413, {"detail": "request body is larger than 65536 bytes (64 KB)"})
    # Under their limits, the same routes work.
    with httpx.Client(base_url=server.url, headers=admin, timeout=10) as http:
        r = http.post("/v1/users", json={"id": "ann"})
        assert r.status_code == 200, r.text
        org = {"users": [{"id": f"u{i}"} for i in range(2000)], "groups": []}
        r = http.post("/v1/org", json=org)
        assert r.status_code == 200, r.text
        r = http.post("/v1/org", content=b"[1, 2]")
        assert r.status_code == 400 and r.json()["detail"].startswith("malformed request")
        r = http.post("/v1/org", content=b"{not json")
        assert r.status_code == 400 and r.json()["detail"].startswith("malformed request")
        assert http.get("/v1/users/u1999").status_code == 200
        assert http.get("/healthz", headers={"Authorization": ""}).status_code == 200

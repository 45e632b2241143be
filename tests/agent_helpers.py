"""Helpers for the agent's end-to-end tests: the real server stub in a subprocess, generated
manifests, and agents with real SQLite caches and folder appliers."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import harness
import httpx
from harness import ADMIN_TOKEN, AGENT_TOKEN

from addin_core.protocol import Host
from agent.config import AgentConfig
from agent.daemon import Agent
from simulator.mosquitto import MosquittoBroker
from simulator.orggen import make_manifest


def manifest(
    name: str,
    version: str = "1.0.0.0",
    hosts: tuple[str, ...] = ("Word",),
    permissions: str | None = None,
    addin_id: str | None = None,
) -> bytes:
    """A valid manifest. Outlook-only add-ins are MailApps, the rest TaskPaneApps."""
    aid = addin_id or str(uuid.uuid5(uuid.NAMESPACE_URL, f"addin:{name}"))
    outlook = hosts == ("Outlook",)
    return make_manifest(
        aid,
        name=name,
        version=version,
        hosts=[Host(h) for h in hosts],
        permissions=permissions or ("ReadItem" if outlook else "ReadDocument"),
    )


def addin_id(name: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"addin:{name}"))


class ServerProcess(harness.ServerProcess):
    """`addin-server serve` as a real process on a free loopback port, started at once, with
    the admin operations the agent tests use."""

    def __init__(
        self,
        workdir: Path,
        broker: MosquittoBroker,
        admin_user: str = "ann",
        env: Mapping[str, str] | None = None,
        db: str | None = None,
    ) -> None:
        """`db`: a postgresql:// URL (the `db_target` fixture); default an SQLite file in
        `workdir`."""
        target: Path | str = workdir / "server.db" if db is None else db
        if isinstance(target, str) and "://" not in target:
            target = Path(target)
        log = workdir / "server.log"
        super().__init__(target, broker.url, admin_user=admin_user, env=env, log=log)
        self.start()
        self.http = httpx.AsyncClient(
            base_url=self.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=20
        )

    async def call(self, method: str, path: str, expect: int = 200, **kw: Any) -> dict[str, Any]:
        r = await self.http.request(method, path, **kw)
        assert r.status_code == expect, f"{method} {path}: {r.status_code} {r.text}"
        data: dict[str, Any] = r.json()
        return data

    async def upload(self, xml: bytes, expect: int = 200) -> dict[str, Any]:
        return await self.call(
            "POST", "/v1/addins", expect, content=xml, headers={"Content-Type": "application/xml"}
        )

    async def assign(
        self, addin: str, target: str, target_id: str | None = None, mode: str = "fixed"
    ) -> int:
        body = {"target": target, "target_id": target_id, "mode": mode}
        return int((await self.call("POST", f"/v1/addins/{addin}/assign", json=body))["revision"])

    async def unassign(self, addin: str, target: str, target_id: str | None = None) -> int:
        body = {"target": target, "target_id": target_id}
        return int((await self.call("POST", f"/v1/addins/{addin}/unassign", json=body))["revision"])

    async def user(self, uid: str) -> int:
        return int(
            (await self.call("POST", "/v1/users", json={"id": uid, "name": uid}))["revision"]
        )

    async def group(self, gid: str) -> int:
        return int(
            (await self.call("POST", "/v1/groups", json={"id": gid, "name": gid}))["revision"]
        )

    async def join(self, gid: str, uid: str) -> int:
        return int((await self.call("PUT", f"/v1/groups/{gid}/members/{uid}"))["revision"])

    async def leave(self, gid: str, uid: str) -> int:
        return int((await self.call("DELETE", f"/v1/groups/{gid}/members/{uid}"))["revision"])

    async def nest(self, child: str, parent: str) -> int:
        return int((await self.call("PUT", f"/v1/groups/{child}/parents/{parent}"))["revision"])

    async def policy(self, nested: bool) -> int:
        return int(
            (await self.call("PUT", "/v1/policy", json={"nested_groups": nested}))["revision"]
        )

    async def revision(self) -> int:
        return int((await self.http.get("/healthz")).json()["revision"])

    async def aclose(self) -> None:
        await self.http.aclose()
        self.stop()


def agent_config(
    tmp: Path, broker: MosquittoBroker, server: ServerProcess, user: str = "ann", **kw: Any
) -> AgentConfig:
    client = kw.pop("client_id", f"{user}-pc")
    base: dict[str, Any] = dict(
        tenant="contoso",
        user_id=user,
        client_id=client,
        insecure=True,  # lab mode: plain MQTT/HTTP on loopback
        broker_url=broker.url,
        server_url=server.url,
        server_token=AGENT_TOKEN,
        cache_path=str(tmp / f"{client}.sqlite"),
        applier="folder",
        applier_dir=str(tmp / f"{client}-wef"),
    )
    base.update(kw)
    return AgentConfig(**base)


def offline_agent(user: str = "u", client: str = "c", cache_path: str = ":none:") -> Agent:
    """An agent with a memory applier and nowhere to connect (broker and server on port 1):
    for tests that drive its model, reports and launches directly."""
    from agent.applier import MemoryApplier

    config = AgentConfig(
        tenant="contoso", user_id=user, client_id=client, insecure=True,
        broker_url="mqtt://127.0.0.1:1", server_url="http://127.0.0.1:1",
        cache_path=cache_path, applier="memory", control=None,
    )  # fmt: skip
    return Agent(config, applier=MemoryApplier())


async def until(
    cond: Callable[[], bool | Awaitable[bool]], timeout: float = 15.0, what: str = "condition"
) -> None:
    """Poll `cond` (bounded in time) until it holds."""
    deadline = time.monotonic() + timeout
    while True:
        r = cond()
        if not isinstance(r, bool):
            r = await r
        if r:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


async def settled(agent: Agent, server: ServerProcess, timeout: float = 15.0) -> None:
    """Wait until the agent holds the server's revision, no message arrived for a moment
    (retained messages of different topics arrive in any order) and no manifest download
    is in flight. Not every revision concerns every user, so a long quiet also counts."""
    target = await server.revision()
    deadline = time.monotonic() + timeout
    last_count, quiet_since = -1, time.monotonic()
    while time.monotonic() < deadline:
        count = sum(agent.stats.values())
        now = time.monotonic()
        if count != last_count:
            last_count, quiet_since = count, now
        busy = bool(agent._fetching) or any(
            p.state == "waiting" and p.reason.startswith("manifest not downloaded")
            for p in agent.pending.values()
        )
        quiet = now - quiet_since
        if not busy and ((agent.revision >= target and quiet > 0.3) or quiet > 2.0):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"agent did not settle (holds {agent.revision}, server {target})")


def lab_agent_toml(
    tmp: Path, broker: MosquittoBroker, server: ServerProcess, extra: str = ""
) -> Path:
    """An agent.toml for a daemon process in lab mode (plain MQTT/HTTP), folder applier,
    control socket; `extra` lines appended."""
    cfg = tmp / "agent.toml"
    cfg.write_text(
        f"""
tenant = "contoso"
user_id = "ann"
client_id = "ann-laptop"
insecure = true
broker_url = "{broker.url}"
server_url = "{server.url}"
server_token = "{AGENT_TOKEN}"
cache_path = "{tmp / "cache.sqlite"}"
hosts = ["Word", "Excel"]
applier = "folder"
applier_dir = "{tmp / "wef"}"
control = "{tmp / "agent.sock"}"
{extra}"""
    )
    return cfg

"""The fault suite's harness: a restartable server process, agents as cheap subprocesses,
an admin that mirrors every accepted change into the oracle's ground truth, and the checks
run after every fault (integrity, convergence to the oracle, nothing removed or downgraded).

Run as a script, it is one agent process for the kill tests::

    python tests/fault_helpers.py CONFIG_JSON

It starts a real `agent.daemon.Agent` and launches every host app in a loop, so a SIGKILL
lands during message handling, manifest fetching or applying, at random.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # when run as a script
    sys.path.insert(0, str(REPO))

from harness import ADMIN_TOKEN, AGENT_TOKEN, CRASH_HOOK, TENANT, ServerProcess  # noqa: E402
from server_helpers import eventually, query, retained_state  # noqa: E402

from addin_core.protocol import Host, Mode  # noqa: E402
from addin_core.version import compare_versions  # noqa: E402
from agent.config import AgentConfig  # noqa: E402
from agent.daemon import Agent  # noqa: E402
from simulator.mosquitto import MosquittoBroker  # noqa: E402
from simulator.oracle import AdminAction, GroundTruth, diff_entitlements, diff_installed  # noqa: E402
from simulator.orggen import make_manifest  # noqa: E402

SEED_OFFSET = int(os.environ.get("ADDIN_FAULT_SEED", "0"))
"""Shifts every rollout's seed: `bench/fault_soak.py` runs the suite with many of them."""

DOCUMENT_HOSTS = (Host.WORD, Host.EXCEL, Host.POWERPOINT)


def addin_guid(n: int) -> str:
    return f"0000fa17-0000-4000-8000-{n:012d}"


def manifest_xml(n: int, version: str, hosts: tuple[Host, ...]) -> bytes:
    return make_manifest(
        addin_guid(n), name=f"fault{n}", version=version, hosts=hosts, permissions="ReadDocument"
    )


# -- the server --------------------------------------------------------------------------------


class Server(ServerProcess):
    """The server of a fault test: restartable on the same port and database (an SQLite file
    in `workdir` by default, or `db`: a PostgreSQL URL), optionally with the crash-after-commit
    hook or a short SQLite busy timeout, and readable in its database."""

    def __init__(
        self,
        workdir: Path,
        broker: MosquittoBroker,
        busy_timeout: float | None = None,
        db: str | None = None,
    ):
        env = {} if busy_timeout is None else {"ADDIN_SERVER_BUSY_TIMEOUT": str(busy_timeout)}
        where = db or workdir / "server.db"
        super().__init__(where, broker.url, log=workdir / "server.log", env=env)

    def start(self, *, crash_after_commit: bool = False, wait: bool = True) -> None:
        super().start(wait=wait, env={CRASH_HOOK: "1"} if crash_after_commit else None)

    def db_revision(self) -> int:
        return int(query(str(self.db), "SELECT value FROM meta WHERE key='revision'")[0][0])

    def unpublished(self) -> int:
        sql = "SELECT count(*) FROM outbox WHERE published_at IS NULL"
        return int(query(str(self.db), sql)[0][0])

    def retained_rows(self) -> dict[str, dict[str, Any]]:
        rows = query(str(self.db), "SELECT topic, payload FROM retained")
        return {
            str(t).removeprefix(f"addins/v1/{TENANT}/"): json.loads(bytes(p))  # type: ignore[arg-type]
            for t, p in rows
        }


# -- the admin, mirrored into the oracle -------------------------------------------------------


@dataclass
class Admin:
    """Admin operations over the real HTTP API; each accepted one is applied to `truth`."""

    server: Server
    truth: GroundTruth = field(default_factory=GroundTruth)
    revisions: list[int] = field(default_factory=list)

    async def call(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        before = self.server.db_revision()
        try:
            async with httpx.AsyncClient(
                base_url=self.server.url,
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                timeout=30,
            ) as http:
                r = await http.request(method, path, **kw)
        except httpx.TransportError:
            # The server died before answering (the crash tests). The database tells
            # whether the change was committed: then it counts, and must be published.
            after = self.server.db_revision()
            if after == before:
                raise
            self.revisions.append(after)
            return {"revision": after}
        assert r.status_code == 200, f"{method} {path}: {r.status_code} {r.text}"
        data: dict[str, Any] = r.json()
        self.revisions.append(int(data["revision"]))
        return data

    async def apply(self, action: AdminAction) -> None:
        """Send `action` to the server and, once it answered 200, to the ground truth."""
        a = action.args
        match action.op:
            case "add_user":
                await self.call("POST", "/v1/users", json={"id": a["user"]})
            case "add_group":
                await self.call("POST", "/v1/groups", json={"id": a["group"]})
            case "add_member":
                await self.call("PUT", f"/v1/groups/{a['group']}/members/{a['user']}")
            case "upload":
                n, version, hosts = a["n"], a["version"], tuple(Host(h) for h in a["hosts"])
                await self.call(
                    "POST",
                    "/v1/addins",
                    content=manifest_xml(n, version, hosts),
                    headers={"Content-Type": "application/xml"},
                )
                action = AdminAction(
                    "upload",
                    {
                        "addin_id": addin_guid(n),
                        "version": version,
                        "hosts": hosts,
                        "permissions": "ReadDocument",
                    },
                )
            case "assign":
                await self.call(
                    "POST",
                    f"/v1/addins/{a['addin_id']}/assign",
                    json={
                        "target": a["target"],
                        "target_id": a.get("target_id"),
                        "mode": a["mode"],
                    },
                )
            case _:
                raise AssertionError(f"the fault suite does not send {action.op}")
        self.truth.apply(action)


USERS = tuple(f"u{i:02d}" for i in range(1, 11))
GROUPS = {"pilot": USERS[:2], "dept": USERS[:6], "ops": USERS[5:]}


def org_actions() -> list[AdminAction]:
    out = [AdminAction("add_user", {"user": u}) for u in USERS]
    for g, members in GROUPS.items():
        out.append(AdminAction("add_group", {"group": g}))
        out += [AdminAction("add_member", {"user": u, "group": g}) for u in members]
    return out


class Rollout:
    """A seeded, endless, MONOTONE rollout: new add-ins, strictly newer versions with the same
    hosts and permissions, and assignments that never weaken what a user already has. So a
    removal or a downgrade anywhere on the way is a bug, whatever fault happened."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed + SEED_OFFSET)
        self.addins: dict[int, tuple[str, tuple[Host, ...]]] = {}
        self.assigned: dict[tuple[str, str, str | None], Mode] = {}
        self.next_n = 1

    def step(self) -> AdminAction:
        r = self.rng
        choice = r.random()
        if not self.addins or (choice < 0.25 and len(self.addins) < 8):
            n = self.next_n
            self.next_n += 1
            hosts = tuple(sorted(r.sample(list(DOCUMENT_HOSTS), r.randint(1, 2))))
            self.addins[n] = ("1.0.0.0", hosts)
            return AdminAction("upload", {"n": n, "version": "1.0.0.0", "hosts": hosts})
        n = r.choice(sorted(self.addins))
        version, hosts = self.addins[n]
        if choice < 0.45:
            parts = [int(p) for p in version.split(".")]
            parts[r.randint(1, 3)] += 1
            new = ".".join(map(str, parts))
            self.addins[n] = (new, hosts)
            return AdminAction("upload", {"n": n, "version": new, "hosts": hosts})
        target = r.choice(["everyone", "user", "group", "group"])
        tid = {"everyone": None, "user": r.choice(USERS), "group": r.choice(sorted(GROUPS))}[target]
        key = (addin_guid(n), target, tid)
        held = self.assigned.get(key)
        stronger = [m for m in Mode if held is None or m.strength > held.strength]
        if not stronger:
            return self.step()
        mode = r.choice(stronger)
        self.assigned[key] = mode
        return AdminAction(
            "assign",
            {"addin_id": addin_guid(n), "target": target, "target_id": tid, "mode": mode.value},
        )


# -- agents -----------------------------------------------------------------------------------


def agent_config(workdir: Path, broker: MosquittoBroker, server: Server, user: str) -> AgentConfig:
    return AgentConfig(
        tenant=TENANT,
        user_id=user,
        client_id=f"{user}-pc",
        insecure=True,
        broker_url=broker.url,
        server_url=server.url,
        server_token=AGENT_TOKEN,
        cache_path=str(workdir / f"{user}-pc.sqlite"),
        applier="folder",
        applier_dir=str(workdir / f"{user}-wef"),
        hosts=(Host.WORD, Host.EXCEL, Host.POWERPOINT),
        keepalive=5,
    )


def spawn_agent(cfg: AgentConfig, log: Path) -> subprocess.Popen[bytes]:
    """One agent in its own process (killed with SIGKILL by the tests)."""
    with open(log, "ab") as f:
        return subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), cfg.model_dump_json()],
            stdout=f, stderr=f, cwd=REPO,
        )  # fmt: skip


async def _agent_main(cfg: AgentConfig) -> None:
    agent = Agent(cfg)
    await agent.start()
    # Bounded only by the test, which kills this process; the cap is a safety net.
    for _ in range(20_000):
        for host in cfg.hosts:
            await agent.launch(host)
        await asyncio.sleep(0.03)


async def converge(
    agents: dict[str, Agent], truth: GroundTruth, timeout: float = 30.0
) -> dict[str, list[str]]:
    """Wait (bounded) until every agent's entitlements and, after a launch of every host, its
    installed set equal the oracle's. Returns the remaining differences per user."""
    hosts = next(iter(agents.values())).config.hosts
    expected = truth.entitlements_for_all(hosts)
    deadline = time.monotonic() + timeout
    diffs: dict[str, list[str]] = {}
    while True:
        diffs = {}
        for user, agent in agents.items():
            ents = {a: e.mode for a, e in agent.entitlements().items()}
            d = diff_entitlements(expected.get(user, {}), ents)
            d += [
                f"{a}: version {e.version}, expected {truth.addins[a].version}"
                for a, e in agent.entitlements().items()
                if a in truth.addins and e.version != truth.addins[a].version
            ]
            if not d:
                for h in hosts:
                    await agent.launch(h)
                want = truth.installed_for(expected.get(user, {}), hosts)
                have = agent.installed()
                d = diff_installed(
                    {h.value: v for h, v in want.items()},
                    {h.value: have.get(h, {}) for h in hosts},
                )
            if d:
                diffs[user] = d
        if not diffs or time.monotonic() > deadline:
            return diffs
        await asyncio.sleep(0.2)


# -- the setup of every fault test -------------------------------------------------------------


async def start_system(
    tmp: Path,
    broker: MosquittoBroker,
    users: tuple[str, ...] = (),
    *,
    org: int | None = None,
    busy_timeout: float | None = None,
    db: str | None = None,
) -> tuple[Server, Admin, dict[str, Agent]]:
    """The server started with the organisation loaded (the first `org` of `org_actions()`,
    all by default) and in-process agents of `users` started. A setup that fails part-way
    stops what it started: the caller's cleanup only covers a setup that succeeded."""
    server = Server(tmp, broker, busy_timeout=busy_timeout, db=db)
    server.start()
    agents: dict[str, Agent] = {}
    try:
        admin = Admin(server)
        for a in org_actions()[:org]:
            await admin.apply(a)
        agents = await start_agents(tmp, broker, server, users)
    except BaseException:
        server.kill()
        raise
    return server, admin, agents


async def start_agents(
    tmp: Path, broker: MosquittoBroker, server: Server, users: tuple[str, ...]
) -> dict[str, Agent]:
    """In-process agents of `users`, started; if one fails to start, all are stopped."""
    agents = {u: Agent(agent_config(tmp, broker, server, u)) for u in users}
    try:
        await asyncio.gather(*(a.start() for a in agents.values()))
    except BaseException:
        await stop_agents(agents)
        raise
    return agents


async def stop_agents(agents: dict[str, Agent]) -> None:
    await asyncio.gather(*(a.stop() for a in agents.values()), return_exceptions=True)


async def nothing_lost(server: Server, broker: MosquittoBroker) -> None:
    """The outbox drains and the broker's retained state equals the server's."""
    await eventually(lambda: server.unpublished() == 0, 20, "the outbox to drain")
    assert await retained_state(broker.port) == server.retained_rows()


def integrity(path: str | Path) -> str:
    with contextlib.closing(sqlite3.connect(path, timeout=10)) as c:
        return str(c.execute("PRAGMA integrity_check").fetchone()[0])


def regressions(path: str | Path) -> list[str]:
    """Every removal, downgrade or loss of entitlement the agent ever recorded (its
    append-only event log). In a monotone rollout each one is a bug."""
    out = []
    with contextlib.closing(sqlite3.connect(path, timeout=10)) as c:
        if not c.execute("SELECT 1 FROM sqlite_master WHERE name='events'").fetchone():
            return []  # killed before its very first start created the schema
        rows = c.execute(
            "SELECT kind, addin_id, host, detail FROM events "
            "WHERE kind IN ('applied', 'unentitled') ORDER BY id"
        ).fetchall()
    for kind, addin, host, detail in rows:
        if kind == "unentitled":
            out.append(f"{addin}: lost its entitlement")
            continue
        action, _, change = detail.partition(" ")
        versions = change.split(" at ")[0]
        old, _, new = versions.partition("→")
        if action == "remove":
            out.append(f"{host} {addin}: removed ({detail})")
        elif action == "update" and old and new and compare_versions(new, old) < 0:
            out.append(f"{host} {addin}: downgraded ({detail})")
    return out


def all_caches(paths: Iterable[str | Path]) -> dict[str, tuple[str, list[str]]]:
    return {str(p): (integrity(p), regressions(p)) for p in paths}


if __name__ == "__main__":
    asyncio.run(_agent_main(AgentConfig.model_validate_json(sys.argv[1])))

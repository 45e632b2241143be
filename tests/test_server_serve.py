"""`addin-server serve` and the CLI as real processes: HTTP on 127.0.0.1, a real broker, and
a server killed between commit and publish."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from harness import ServerProcess
from server_helpers import TASKPANE_ID, TASKPANE_V1, Collector, retained_state

from simulator.mosquitto import MosquittoBroker

ADMIN = {"Authorization": "Bearer admin-secret"}
AGENT = {"Authorization": "Bearer agent-secret"}


def cli(db: Path | str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server_stub", *args, "--db", str(db)],
        capture_output=True,
        text=True,
        timeout=60,
        check=check,
    )


class Server(ServerProcess):
    """A server process on `db` (an SQLite file or a PostgreSQL URL), started at once, each
    on its own port with its own log in `logs`; the test waits for it."""

    def __init__(
        self,
        db: str,
        broker: MosquittoBroker,
        logs: Path,
        env: dict[str, str] | None = None,
    ):
        super().__init__(db, broker.url, log=logs / "server.log", admin_user="ann", env=env)
        self.log = logs / f"server.{self.port}.log"
        self.start(wait=False)


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    made: list[Server] = []
    yield made
    for s in made:
        s.stop()


async def test_serve_http_api_publishes_and_serves_manifests(
    tmp_path: Path, broker: MosquittoBroker, servers: list[Server], db_target: str
) -> None:
    db = db_target
    srv = Server(db, broker, tmp_path)
    servers.append(srv)
    srv.wait_ready()
    async with (
        httpx.AsyncClient(base_url=srv.url, headers=ADMIN, timeout=10) as http,
        Collector(broker.port) as col,
    ):
        r = await http.post("/v1/users", json={"id": "ann", "name": "Ann"})
        assert r.status_code == 200 and r.json()["revision"] == 1
        r = await http.post(
            "/v1/addins",
            content=TASKPANE_V1.read_bytes(),
            headers={"Content-Type": "application/xml"},
        )
        assert r.status_code == 200, r.text
        assert r.json() == {
            "addin_id": TASKPANE_ID,
            "version": "1.0.0.0",
            "state": "current",
            "revision": 2,
        }
        r = await http.post(
            f"/v1/addins/{TASKPANE_ID}/assign", json={"target": "me", "mode": "optional"}
        )
        assert r.json()["target_id"] == "ann" and r.json()["revision"] == 3
        await col.wait_for(3, {f"assign/user/ann/{TASKPANE_ID}"})
        await col.wait_for(2, {f"catalog/{TASKPANE_ID}"})
        entry = col.by_revision(2)[f"catalog/{TASKPANE_ID}"]

        # Manifest serving: agent token, immutable caching, 404 and 401.
        m = await http.get(entry["manifest_url"], headers=AGENT)
        assert m.status_code == 200
        assert m.content == TASKPANE_V1.read_bytes()
        assert m.headers["content-type"] == "application/xml"
        assert m.headers["etag"] == f'"{entry["manifest_sha256"]}"'
        assert "immutable" in m.headers["cache-control"]
        # Later downloads come from the in-memory fast path (ManifestFastPath): same answer.
        again = await http.get(entry["manifest_url"], headers=AGENT)
        same = ("content-type", "etag", "cache-control", "content-length")
        assert again.status_code == 200 and again.content == m.content
        assert {h: again.headers[h] for h in same} == {h: m.headers[h] for h in same}
        unchanged = await http.get(
            entry["manifest_url"], headers={**AGENT, "If-None-Match": m.headers["etag"]}
        )
        assert unchanged.status_code == 304 and unchanged.content == b""
        assert unchanged.headers["etag"] == m.headers["etag"]
        wrong = await http.get(entry["manifest_url"], headers={"Authorization": "Bearer agent"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        assert (await http.get("/v1/manifests/" + "0" * 64, headers=AGENT)).status_code == 404
        assert (
            await http.get(entry["manifest_url"], headers={"Authorization": "Bearer x"})
        ).status_code == 401
        assert (await http.get("/v1/addins", headers=AGENT)).status_code == 401

        # Errors: clear message, nothing changed.
        r = await http.post(
            "/v1/addins", content=b"<OfficeApp/>", headers={"Content-Type": "application/xml"}
        )
        assert r.status_code == 422 and r.json()["detail"]
        r = await http.post(
            "/v1/addins",
            content=TASKPANE_V1.read_bytes(),
            headers={"Content-Type": "application/xml"},
        )
        assert r.status_code == 409 and "1.0.0.0" in r.json()["detail"]
        assert (await http.delete("/v1/users/nobody")).status_code == 404
        assert (await http.get("/healthz")).json() == {"ok": True, "revision": 3}

        # A CLI write made by another process is picked up by the running publisher.
        done = cli(db, "user", "add", "bob", "--json")
        assert json.loads(done.stdout)["revision"] == 4
        await col.wait_for(4, {"member/bob"})

        # Explain and status over HTTP.
        ex = (await http.get("/v1/explain", params={"user": "ann", "addin": TASKPANE_ID})).json()
        assert ex["entitled"] is True and ex["mode"] == "optional"
        st = (await http.get("/v1/status")).json()
        assert st["addins"][0]["to_install"] == 1


async def test_killed_between_commit_and_publish_publishes_exactly_once_after_restart(
    tmp_path: Path, broker: MosquittoBroker, servers: list[Server], db_target: str
) -> None:
    db = db_target
    cli(db, "user", "add", "ann", "--tenant", "contoso")
    first = Server(db, broker, tmp_path)
    servers.append(first)
    first.wait_ready()
    first.stop()  # the broker now holds our session and member/ann

    crashing = Server(db, broker, tmp_path, env={"ADDIN_SERVER_CRASH_AFTER_COMMIT": "1"})
    servers.append(crashing)
    crashing.wait_ready()
    async with Collector(broker.port) as col:
        # Committed by another process; the server's publisher finds it and dies before
        # publishing (os._exit, like SIGKILL: no cleanup).
        out = json.loads(cli(db, "group", "add", "sales", "--json").stdout)
        assert crashing.proc.wait(timeout=20) == 70
        assert col.count("group/sales/parents") == 0

        restarted = Server(db, broker, tmp_path)
        servers.append(restarted)
        restarted.wait_ready()
        await col.wait_for(out["revision"], {"group/sales/parents"})
        marker = json.loads(cli(db, "user", "add", "marker", "--json").stdout)
        await col.wait_for(marker["revision"], {"member/marker"})
        assert col.count("group/sales/parents") == 1
        assert col.count("member/ann") == 1  # the retained copy, not a second publish
    state = await retained_state(broker.port)
    assert state["group/sales/parents"]["revision"] == out["revision"]


def test_cli_errors_are_clear_and_change_nothing(db_target: str) -> None:
    db = db_target
    assert cli(db, "user", "add", "ann", check=False).returncode != 0  # new db needs --tenant
    cli(db, "user", "add", "ann", "--tenant", "contoso")
    cli(db, "group", "add", "a")
    cli(db, "group", "add", "b")
    cli(db, "group", "nest", "a", "b")
    r = cli(db, "group", "nest", "b", "a", check=False)
    assert r.returncode == 1
    assert "cycle: b -> a -> b" in r.stderr
    r = cli(db, "addin", "assign", "nope", "--everyone", check=False)
    assert r.returncode == 2 and "unknown add-in 'nope'" in r.stderr
    r = cli(db, "user", "add", "bad/id", check=False)
    assert r.returncode == 1 and "invalid user id" in r.stderr
    status = json.loads(cli(db, "status", "--json").stdout)
    assert status["revision"] == 4


def test_load_explain_and_status_from_the_cli(tmp_path: Path, db_target: str) -> None:
    (tmp_path / "m.xml").write_bytes(TASKPANE_V1.read_bytes())
    (tmp_path / "org.yaml").write_text(
        "tenant: contoso\n"
        "users: [{id: ann}, {id: bob}]\n"
        "groups:\n"
        "  - {id: all-staff}\n"
        "  - {id: sales, members: [ann], parents: [all-staff]}\n"
        "addins: [{manifest: m.xml}, {store: WA104379501}]\n"
        f"assignments: [{{addin: {TASKPANE_ID}, target: 'group:all-staff', mode: fixed}}]\n"
    )
    db = db_target
    out = cli(db, "load", str(tmp_path / "org.yaml")).stdout
    assert out.startswith("revision 1: loaded 2 users, 2 groups, 1 memberships, 1 nestings")
    text = cli(db, "explain", "--user", "ann", "--addin", TASKPANE_ID).stdout
    assert "NOT ENTITLED: only nested-group assignments reach this user" in text
    assert "through nesting ann in sales -> all-staff; ignored because nested_groups is off" in text
    cli(db, "policy", "set", "--nested-groups")
    text = cli(db, "explain", "--user", "ann", "--addin", TASKPANE_ID).stdout
    assert "Verdict: ENTITLED, mode fixed" in text
    status = json.loads(cli(db, "status", TASKPANE_ID, "--json").stdout)
    assert status["addins"][0]["to_install"] == 1  # ann via nesting; bob is in no group
    assert status["addins"][0]["reported_current"] == 0
    assert "0/1" in cli(db, "status").stdout

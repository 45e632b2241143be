"""Admin roles and the audit log against a real `addin-server serve` (and its CLI): which
token may write what, who the audit log names, and the console's sign-in, CSRF and frame
rules over real HTTP (the browser tests are in test_console_browser.py)."""

from __future__ import annotations

import getpass
import json
import re
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from agent_helpers import ServerProcess, manifest
from harness import ADMIN_TOKEN, REPO

from server_stub.roles import Principal, Principals, Role, TokenSpecError, parse_token_spec, refusal
from simulator.mosquitto import MosquittoBroker

HELPDESK = "helpdesk-token-1"
OPERATOR = "operator-token-1"


def tokens_file(tmp: Path) -> Path:
    f = tmp / "tokens.txt"
    f.write_text(f"# who may use the API\nhelpdesk:dana:{HELPDESK}\n\noperator:oscar:{OPERATOR}\n")
    return f


@pytest.fixture
async def server(
    tmp_path: Path, broker: MosquittoBroker, db_target: str
) -> AsyncIterator[ServerProcess]:
    srv = ServerProcess(
        tmp_path, broker, env={"ADDIN_SERVER_TOKENS_FILE": str(tokens_file(tmp_path))},
        db=db_target,
    )
    yield srv
    await srv.aclose()


def client(server: ServerProcess, token: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=20
    )


def cli(db: Path | str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server_stub", "--db", str(db), *args],
        capture_output=True, text=True, cwd=REPO, timeout=60,
        env={"ADDIN_SERVER_PUBLISH_WAIT": "0", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip


async def test_helpdesk_reads_but_every_write_is_refused_with_its_reason(server: ServerProcess) -> None:
    await server.user("ann")
    async with client(server, HELPDESK) as helpdesk:
        assert (await helpdesk.get("/v1/users/ann")).status_code == 200
        assert (await helpdesk.get("/v1/audit")).status_code == 200
        writes = [
            ("POST", "/v1/users", {"id": "eve", "name": "Eve"}),
            ("DELETE", "/v1/users/ann", None),
            ("PUT", "/v1/policy", {"nested_groups": True}),
            ("POST", "/v1/addins/x/assign", {"target": "everyone", "mode": "fixed"}),
        ]
        for method, path, body in writes:
            r = await helpdesk.request(method, path, json=body)
            assert r.status_code == 403, (method, path, r.text)
            assert r.json()["detail"] == (
                f"helpdesk 'dana' may not {method} {path}: helpdesk tokens are read-only "
                "(reads and explain)"
            )
    # Nothing changed: the only user is the one the admin made.
    users = [r["detail"]["id"] for r in (await server.call("GET", "/v1/audit"))]  # type: ignore[index]
    assert users == ["ann"]


async def test_operator_may_not_change_the_directory_or_catalog(server: ServerProcess) -> None:
    async with client(server, OPERATOR) as operator:
        r = await operator.post("/v1/groups", json={"id": "g", "name": "G"})
        assert r.status_code == 403
        assert "operator tokens may change rollouts only" in r.json()["detail"]
        assert (await operator.get("/v1/status")).status_code == 200


async def test_an_operator_gains_no_write_from_an_id_that_starts_with_rollout(
    server: ServerProcess,
) -> None:
    """The operator's right is the /v1/rollouts routes, not any path with a segment named
    "rollout…": ids are the admins' choice, and a user, group or add-in named so stays out of
    an operator's reach, over the API and from the console."""
    await server.user("rollout-bot")
    await server.group("rollouts")
    before = await server.revision()
    async with client(server, OPERATOR) as operator:
        for method, path in [
            ("DELETE", "/v1/users/rollout-bot"),
            ("PUT", "/v1/groups/rollouts/members/rollout-bot"),
            ("DELETE", "/v1/groups/rollouts"),
            ("POST", "/v1/addins/rollouts/disable"),
        ]:
            r = await operator.request(method, path)
            assert r.status_code == 403, (method, path, r.text)
            assert "operator tokens may change rollouts only" in r.json()["detail"]
        # Its own routes still pass the role check (and reach the service: no such rollout).
        assert (await operator.post("/v1/rollouts/999/pause")).status_code == 404
    async with httpx.AsyncClient(base_url=server.url, timeout=20) as web:
        form = await web.get("/console/login")
        nonce = re.search(r'name="nonce" value="([^"]+)"', form.text)
        assert nonce is not None
        ok = await web.post("/console/login", data={"token": OPERATOR, "nonce": nonce[1]})
        assert ok.status_code == 303, ok.text
        csrf = re.search(r'"X-CSRF-Token": "([^"]+)"', (await web.get("/console/users")).text)
        assert csrf is not None
        r = await web.post(
            "/console/addins/rollouts/disable", data={}, headers={"X-CSRF-Token": csrf[1]}
        )
        assert r.status_code == 403 and "operator tokens may change rollouts only" in r.text
    assert await server.revision() == before
    assert (await server.http.get("/v1/users/rollout-bot")).status_code == 200


async def test_every_write_names_its_actor_role_and_way_in(server: ServerProcess) -> None:
    await server.user("ann")
    r = await server.upload(manifest("notes"))
    out = cli(server.db, "group", "add", "sales", "--name", "Sales")
    assert out.returncode == 0, out.stderr
    rows = await server.http.get("/v1/audit")
    got = [(a["operation"], a["actor"], a["role"], a["via"]) for a in rows.json()]
    login = getpass.getuser()
    assert got == [
        ("create_group", login, "admin", "cli"),
        ("add_lob", "admin", "admin", "api"),
        ("create_user", "admin", "admin", "api"),
    ]
    assert rows.json()[1]["revision"] == r["revision"]
    # Filters: by actor, by operation, and none before a time after everything.
    by_cli = (await server.http.get("/v1/audit", params={"actor": login})).json()
    assert [a["operation"] for a in by_cli] == ["create_group"]
    later = rows.json()[0]["at"] + 1
    assert (await server.http.get("/v1/audit", params={"since": later})).json() == []


async def test_audit_command_table_json_and_filters(server: ServerProcess) -> None:
    await server.user("ann")
    await server.user("bob")
    table = cli(server.db, "audit")
    assert table.returncode == 0, table.stderr
    assert "2 audit line(s), newest first" in table.stdout
    assert re.search(r"│ 2 +│ .* │ admin +│ admin +│ api +│ create_user +│ id=bob name=bob", table.stdout)
    as_json = json.loads(cli(server.db, "audit", "--json", "--since", "1h", "--actor", "admin").stdout)
    assert [a["detail"]["id"] for a in as_json] == ["bob", "ann"]
    assert json.loads(cli(server.db, "audit", "--json", "--actor", "nobody").stdout) == []
    bad = cli(server.db, "audit", "--since", "yesterday")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: Invalid value for --since")
    assert "Traceback" not in bad.stderr


def test_a_bad_token_spec_is_one_error_line(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "server_stub", "serve", "--db", str(tmp_path / "s.db"),
         "--tenant", "t", "--broker", "mqtt://127.0.0.1:1", "--insecure",
         "--token", "superuser:eve:abcdefghij"],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: --token ([auth] tokens): unknown role 'superuser': one of admin, operator, "
            "helpdesk"
    ]
    assert not (tmp_path / "s.db").exists()


def test_token_specs_and_role_rules() -> None:
    p, token = parse_token_spec("Helpdesk:dana:abc:defgh")
    assert (p, token) == (Principal("dana", Role.HELPDESK), "abc:defgh")
    for bad, why in [
        ("admin:eve", "expected ROLE:NAME:TOKEN"),
        ("admin:e ve:abcdefghij", "invalid token name"),
        ("admin:eve:short", "shorter than 8"),
    ]:
        with pytest.raises(TokenSpecError, match=why):
            parse_token_spec(bad)
    with pytest.raises(TokenSpecError, match="named 'admin'"):
        Principals.from_specs(["helpdesk:admin:abcdefghij"], "zzzzzzzzzz")
    with pytest.raises(TokenSpecError, match="share one token"):
        Principals.from_specs(["helpdesk:dana:abcdefghij", "admin:eve:abcdefghij"])
    ps = Principals.from_specs(["operator:oscar:abcdefghij"], "zzzzzzzzzz")
    assert ps.match(b"zzzzzzzzzz") == Principal("admin", Role.ADMIN)
    assert ps.match(b"abcdefghij") == Principal("oscar", Role.OPERATOR)
    assert ps.match(b"nope") is None
    oscar = Principal("oscar", Role.OPERATOR)
    assert refusal(oscar, "POST", "/v1/rollouts/notes/advance") is None
    assert refusal(oscar, "GET", "/v1/users/ann") is None
    assert refusal(oscar, "POST", "/v1/addins/notes/rollback") is not None
    assert refusal(oscar, "DELETE", "/v1/users/rollout-bot") is not None
    assert refusal(oscar, "POST", "/v1/rolloutsx") is not None
    assert refusal(oscar, "POST", "/v1/rollouts") is None


def test_an_old_database_gains_the_audit_columns(tmp_path: Path) -> None:
    """A database made before roles: its audit rows read back as the admin's."""
    db = tmp_path / "old.db"
    with sqlite3.connect(db) as c:
        c.execute(
            "CREATE TABLE audit (id INTEGER PRIMARY KEY AUTOINCREMENT, revision INTEGER NOT NULL, "
            "at REAL NOT NULL, actor TEXT NOT NULL, operation TEXT NOT NULL, detail TEXT NOT NULL)"
        )
        c.execute(
            "CREATE TABLE reports (client_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, revision "
            "INTEGER NOT NULL, reported_at REAL NOT NULL, received_at REAL NOT NULL, applied TEXT "
            "NOT NULL, errors TEXT NOT NULL)"
        )
        c.execute("INSERT INTO audit(revision, at, actor, operation, detail) VALUES (1, 1.0, 'cli', 'create_user', '{}')")
    c.close()
    out = cli(db, "audit", "--json", "--tenant", "t")
    assert out.returncode == 0, out.stderr
    assert [(a["actor"], a["role"], a["via"]) for a in json.loads(out.stdout)] == [("cli", "admin", "")]
    with sqlite3.connect(db) as c:
        assert "cached" in {r[1] for r in c.execute("PRAGMA table_info(reports)")}
    c.close()


async def test_console_sign_in_csrf_and_frame_headers(server: ServerProcess) -> None:
    """The console over plain HTTP: no page without a session; a wrong token refused; a
    write without the session's CSRF token refused and nothing written; frames denied."""
    await server.user("ann")
    async with httpx.AsyncClient(base_url=server.url, timeout=20) as web:
        r = await web.get("/console/addins")
        assert r.status_code == 303 and r.headers["location"].startswith("/console/login")
        form = await web.get("/console/login")
        assert form.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in form.headers["content-security-policy"]
        nonce = re.search(r'name="nonce" value="([^"]+)"', form.text)
        assert nonce is not None
        wrong = await web.post("/console/login", data={"token": "nope", "nonce": nonce[1]})
        assert wrong.status_code == 401 and "not one this server accepts" in wrong.text
        # The nonce without its cookie (a form posted from another site) is refused too.
        fresh = re.search(r'name="nonce" value="([^"]+)"', wrong.text)
        assert fresh is not None
        async with httpx.AsyncClient(base_url=server.url, timeout=20) as elsewhere:
            r = await elsewhere.post("/console/login", data={"token": ADMIN_TOKEN, "nonce": fresh[1]})
            assert r.status_code == 401 and "came from another site" in r.text
        nonce = fresh
        ok = await web.post("/console/login", data={"token": ADMIN_TOKEN, "nonce": nonce[1]})
        assert ok.status_code == 303, ok.text
        set_cookie = ok.headers.get_list("set-cookie")[0]
        assert "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie
        users = await web.get("/console/users")
        assert users.status_code == 200 and ">ann<" in users.text
        assert users.headers["x-frame-options"] == "DENY"
        csrf = re.search(r'"X-CSRF-Token": "([^"]+)"', users.text)
        assert csrf is not None
        body = {"child": "a", "parent": "b"}
        refused = await web.post("/console/directory/nest", data=body)
        assert refused.status_code == 403 and "CSRF token" in refused.text
        forged = await web.post("/console/directory/nest", data=body, headers={"X-CSRF-Token": "x" * 43})
        assert forged.status_code == 403
        cross = await web.post(
            "/console/directory/nest", data=body,
            headers={"X-CSRF-Token": csrf[1], "Origin": "http://evil.example"},
        )  # fmt: skip
        assert cross.status_code == 403
        assert await server.revision() == 1  # nothing was written
        # With the token the write goes through to the service (and is refused there: no
        # such groups), one line naming the group.
        real = await web.post("/console/directory/nest", data=body, headers={"X-CSRF-Token": csrf[1]})
        assert real.status_code == 404 and "unknown group &#x27;a&#x27;" in real.text

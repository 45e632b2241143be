"""`addin-server directory sync` against a real OpenLDAP (a private slapd on a free loopback
port, tests/ldap_helpers.py): users, groups and nested groups read, the diff printed and
applied in one revision, a user who left a group losing what the group carried, the
removal guard and --force, and the periodic sync of `serve --config`. The mapping of
Active Directory's entries (sAMAccountName, memberOf) is checked on entries built here."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import ldap3
import pytest
from harness import ADMIN_TOKEN, REPO, stop_process
from ldap_helpers import ROOT_DN, ROOT_PW, SUFFIX, Slapd, base_tree, group, user
from server_helpers import query

from server_stub.ldap_directory import build, safe_id
from simulator.mosquitto import MosquittoBroker, free_port

TASKPANE = "0e3b2c1a-5d4f-4a6b-8c7d-9e0f1a2b3c4d"


@pytest.fixture
def slapd(tmp_path: Path) -> Iterator[Slapd]:
    server = Slapd(tmp_path / "ldap")
    server.dir.mkdir()
    server.start()
    conn = server.connection()
    base_tree(conn)
    ann = user(conn, "ann", "Ann Lee")
    bob = user(conn, "bob", "Bob Ray")
    carol = user(conn, "carol", "Carol Diaz")
    sales = group(conn, "sales", [ann, bob])
    group(conn, "All Staff", [sales, carol])  # a nested group and a direct member
    conn.unbind()
    yield server
    server.stop()


def cli(tmp: Path, *args: str, db: str | None = None) -> subprocess.CompletedProcess[str]:
    """`addin-server ARGS` in `tmp` on the database `db` (default: tmp/server.db)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADDIN_SERVER_")}
    env.update(ADDIN_SERVER_DB=db or str(tmp / "server.db"), ADDIN_SERVER_PUBLISH_WAIT="0")
    return subprocess.run(
        [sys.executable, "-m", "server_stub", *args],
        capture_output=True, text=True, timeout=60, env=env, cwd=tmp,
    )  # fmt: skip


def ok(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def sync_args(tmp: Path, slapd: Slapd) -> list[str]:
    (tmp / "ldap-password").write_text(ROOT_PW + "\n")
    return ["directory", "sync", "--ldap", slapd.url, "--bind-dn", ROOT_DN,
            "--bind-password-file", str(tmp / "ldap-password"), "--base", SUFFIX,
            "--tenant", "contoso"]  # fmt: skip


def entitled(tmp: Path, db: str) -> int:
    status = json.loads(ok(cli(tmp, "status", "--json", db=db)))
    return int(next(a for a in status["addins"] if a["addin_id"] == TASKPANE)["entitled_users"])


def test_sync_reads_nested_groups_and_applies_the_diff_in_one_revision(
    tmp_path: Path, slapd: Slapd, db_target: str
) -> None:
    args = sync_args(tmp_path, slapd)
    # Dry run on a new database: the diff, and no database left behind.
    out = ok(cli(tmp_path, *args, "--dry-run", "--max-removal-share", "1", db=db_target))
    assert "LDAP: 3 users, 2 groups, 3 memberships, 1 nestings" in out
    assert "  + user ann: name 'Ann Lee'" in out
    assert "  + group All-Staff: name 'All Staff'" in out
    assert "  + nesting sales in All-Staff" in out
    assert "Dry run: nothing was changed." in out

    out = ok(cli(tmp_path, *args, db=db_target))
    assert "Plan: 9 to add, 0 to change, 0 to remove." in out
    assert "Synced at revision 1 (" in out
    assert query(db_target, "SELECT operation FROM audit") == [("directory_sync",)]
    assert sorted(query(db_target, "SELECT group_id, user_id FROM memberships")) == [
        ("All-Staff", "carol"), ("sales", "ann"), ("sales", "bob"),
    ]  # fmt: skip
    unchanged = ok(cli(tmp_path, *args, db=db_target))
    assert "No changes: the server's directory matches LDAP." in unchanged

    # An add-in assigned to the group: bob has it through sales, then leaves sales in LDAP.
    shutil.copy(REPO / "tests/fixtures/manifests/taskpane.xml", tmp_path / "taskpane.xml")
    ok(cli(tmp_path, "addin", "add", str(tmp_path / "taskpane.xml"), db=db_target))
    ok(cli(tmp_path, "addin", "assign", TASKPANE, "--group", "sales", db=db_target))
    assert entitled(tmp_path, db_target) == 2
    conn = slapd.connection()
    conn.modify(
        f"cn=sales,ou=groups,{SUFFIX}",
        {"member": [(ldap3.MODIFY_DELETE, [f"uid=bob,ou=people,{SUFFIX}"])]},
    )
    conn.modify(
        f"uid=ann,ou=people,{SUFFIX}", {"displayName": [(ldap3.MODIFY_REPLACE, ["Ann Lee-Smith"])]}
    )
    conn.unbind()
    out = ok(cli(tmp_path, *args, db=db_target))
    assert "  - member bob in sales\n" in out
    assert "  ~ user ann: name 'Ann Lee' -> 'Ann Lee-Smith'" in out
    # bob lost what sales carried, as a manual removal would
    assert entitled(tmp_path, db_target) == 1
    rev = query(db_target, "SELECT max(revision) FROM audit")[0][0]
    member_bob = query(
        db_target, f"SELECT payload FROM outbox WHERE revision={rev} AND topic LIKE '%/member/bob'"
    )
    assert json.loads(bytes(member_bob[0][0]))["groups"] == []  # type: ignore[arg-type]


def test_a_sync_removing_too_many_users_stops_unless_forced(
    tmp_path: Path, slapd: Slapd, db_target: str
) -> None:
    args = sync_args(tmp_path, slapd)
    ok(cli(tmp_path, *args, db=db_target))
    taskpane = str(REPO / "tests/fixtures/manifests/taskpane.xml")
    ok(cli(tmp_path, "addin", "add", taskpane, db=db_target))
    ok(cli(tmp_path, "addin", "assign", TASKPANE, "--user", "bob", db=db_target))
    conn = slapd.connection()
    conn.delete(f"uid=bob,ou=people,{SUFFIX}")
    conn.unbind()
    r = cli(tmp_path, *args, db=db_target)
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        "error: the sync would remove 1 of 3 users (33%), more than the 10% allowed: check the "
        "directory, --base and the filters, then run it again with --force"
    ]
    assert ("bob",) in query(db_target, "SELECT id FROM users")
    assert "Synced" in ok(cli(tmp_path, *args, "--max-removal-share", "0.5", db=db_target))
    assert ("bob",) not in query(db_target, "SELECT id FROM users")
    # The user's direct assignment went with it, with a tombstone for its agents.
    assert query(db_target, "SELECT * FROM assignments") == []
    rows = query(
        db_target, f"SELECT payload FROM outbox WHERE topic LIKE '%assign/user/bob/{TASKPANE}'"
    )
    assert json.loads(bytes(rows[-1][0]))["deleted"] is True  # type: ignore[arg-type]

    conn = slapd.connection()
    conn.delete(f"uid=carol,ou=people,{SUFFIX}")
    conn.unbind()
    assert cli(tmp_path, *args, db=db_target).returncode == 1
    assert "Synced" in ok(cli(tmp_path, *args, "--force", db=db_target))


def test_a_sync_removing_too_many_groups_stops_unless_forced(tmp_path: Path, slapd: Slapd) -> None:
    """A wrong group filter reads every user and no group: the guard counts groups too, or
    the sync would remove every group and every assignment to one (admin data LDAP does not
    hold, so no later sync brings it back)."""
    args = sync_args(tmp_path, slapd)
    ok(cli(tmp_path, *args))
    ok(cli(tmp_path, "addin", "add", str(REPO / "tests/fixtures/manifests/taskpane.xml")))
    ok(cli(tmp_path, "addin", "assign", TASKPANE, "--group", "sales"))
    wrong = [*args, "--group-filter", "(objectClass=posixGroup)"]
    r = cli(tmp_path, *wrong)
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        "error: the sync would remove 2 of 2 groups (100%), more than the 10% allowed: check "
        "the directory, --base and the filters, then run it again with --force"
    ]
    assert query(str(tmp_path / "server.db"), "SELECT target, target_id FROM assignments") == [("group", "sales")]
    assert len(query(str(tmp_path / "server.db"), "SELECT * FROM memberships")) == 3
    assert "Synced" in ok(cli(tmp_path, *wrong, "--force"))
    assert query(str(tmp_path / "server.db"), "SELECT * FROM groups") == []


def test_sync_errors_are_one_line(tmp_path: Path, slapd: Slapd) -> None:
    args = sync_args(tmp_path, slapd)
    (tmp_path / "wrong").write_text("nope\n")
    bad = [*args[:-4], "--bind-password-file", str(tmp_path / "wrong"), *args[-4:]]
    r = cli(tmp_path, *bad)
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
    assert r.stderr.startswith(f"error: cannot bind to {slapd.url} as {ROOT_DN}: ")
    closed = f"ldap://127.0.0.1:{free_port()}"
    r = cli(tmp_path, "directory", "sync", "--ldap", closed, "--base", SUFFIX, "--tenant", "c")
    assert r.returncode == 1 and r.stderr.startswith(f"error: cannot bind to {closed}")
    assert "Traceback" not in r.stderr and not (tmp_path / "server.db").exists()
    r = cli(tmp_path, "directory", "sync", "--base", SUFFIX)
    assert r.returncode == 2 and "needs --ldap" in r.stderr


def test_serve_syncs_periodically_from_its_config(
    tmp_path: Path, slapd: Slapd, broker: MosquittoBroker
) -> None:
    (tmp_path / "ldap-password").write_text(ROOT_PW)
    port = free_port()
    cfg = tmp_path / "server.toml"
    cfg.write_text(
        f"""
[server]
tenant = "contoso"
listen = "127.0.0.1:{port}"
database = "server.db"
insecure = true
[broker]
url = "{broker.url}"
[auth]
admin_token = "{ADMIN_TOKEN}"
[directory]
ldap_url = "{slapd.url}"
bind_dn = "{ROOT_DN}"
bind_password_file = "ldap-password"
base = "{SUFFIX}"
interval = 0.5
"""
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADDIN_SERVER_")}
    env["ADDIN_SERVER_BUSY_TIMEOUT"] = "0.3"  # a locked database fails a sync quickly
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server_stub", "serve", "--config", str(cfg)],
            stdout=out, stderr=out, env=env, cwd=tmp_path,
        )  # fmt: skip
    http = httpx.Client(
        base_url=f"http://127.0.0.1:{port}",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=5,
    )

    def status(path: str) -> int:
        try:
            return http.get(path).status_code
        except httpx.HTTPError:
            return 0

    def until(path: str, code: int) -> None:
        deadline = time.monotonic() + 20
        while status(path) != code and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.1)
        assert status(path) == code, log.read_text()

    try:
        until("/v1/users/ann", 200)
        conn = slapd.connection()
        user(conn, "dave", "Dave Park")
        conn.unbind()
        until("/v1/users/dave", 200)  # picked up by the next sync, no command run

        # The database locked by another writer: the syncs meanwhile fail, and the first one
        # after it is released brings the change (a failed round used to end every later one).
        conn = slapd.connection()
        user(conn, "erin", "Erin Moss")
        conn.unbind()
        locker = sqlite3.connect(tmp_path / "server.db", isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")
        try:
            deadline = time.monotonic() + 20
            while "not synced" not in log.read_text() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert "not synced" in log.read_text(), log.read_text()
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        until("/v1/users/erin", 200)
    finally:
        stop_process(proc)
    text = log.read_text()
    assert "directory sync: revision 1: 9 to add" in text
    assert "directory sync: revision 2: 1 to add" in text


def test_active_directory_entries_map_through_sam_account_name_and_member_of() -> None:
    base = "DC=corp,DC=example"
    users = [
        (f"CN=Ann Lee,OU=Staff,{base}", {"sAMAccountName": "ann", "displayName": "Ann Lee",
                                          "memberOf": [f"CN=Sales Team,OU=Groups,{base}"]}),
        (f"CN=Bob,OU=Staff,{base}", {"sAMAccountName": ["bob"], "cn": "Bob",
                                     "memberOf": [f"cn=sales team, ou=groups, {base.lower()}"]}),
        (f"CN=NoId,OU=Staff,{base}", {"cn": "NoId"}),
    ]  # fmt: skip
    groups = [
        # AD returns a large group's `member` in ranges: here it lists nobody, the users'
        # memberOf does; and a nested group by DN.
        (f"CN=Sales Team,OU=Groups,{base}", {"cn": "Sales Team", "member": []}),
        (f"CN=Everyone Corp,OU=Groups,{base}", {"cn": "Everyone Corp",
                                                "member": [f"CN=Sales Team,OU=Groups,{base}",
                                                           f"CN=Printer,OU=Devices,{base}"]}),
        # A nesting seen only from the child's side (its parent's `member` came in ranges).
        (f"CN=EMEA Sales,OU=Groups,{base}", {"cn": "EMEA Sales", "member": [],
                                             "memberOf": [f"CN=Sales Team,OU=Groups,{base}"]}),
    ]  # fmt: skip
    d = build(users, groups)
    assert d.users == {"ann": "Ann Lee", "bob": "Bob"}
    assert d.groups == {
        "Sales-Team": "Sales Team", "Everyone-Corp": "Everyone Corp", "EMEA-Sales": "EMEA Sales"
    }  # fmt: skip
    assert d.members == {("Sales-Team", "ann"), ("Sales-Team", "bob")}
    assert d.nesting == {("Sales-Team", "Everyone-Corp"), ("EMEA-Sales", "Sales-Team")}
    assert d.skipped == [f"user CN=NoId,OU=Staff,{base}: no uid or sAMAccountName"]
    assert safe_id("  J. O'Neil (IT) ") == "J.-O-Neil-IT"


@pytest.mark.parametrize("starttls", [False, True], ids=["ldaps", "starttls"])
def test_the_directory_certificate_is_verified(tmp_path: Path, starttls: bool) -> None:
    """ldap3 would accept any certificate unless told otherwise: the sync verifies it,
    against --ldap-ca or the system's CAs, on ldaps:// and with `--starttls` on ldap://
    (where the bind and its password then go over TLS)."""
    from server_stub.pki import init_pki

    init_pki(tmp_path / "pki", "contoso")  # a CA and a server certificate for 127.0.0.1
    p = tmp_path / "pki"
    server = Slapd(
        tmp_path / "ldap-tls", tls=(p / "ca.crt", p / "server.crt", p / "server.key"),
        starttls=starttls,
    )  # fmt: skip
    server.dir.mkdir()
    server.start()
    try:
        conn = server.connection()
        base_tree(conn)
        user(conn, "ann", "Ann Lee")
        conn.unbind()
        assert server.url.startswith("ldap://" if starttls else "ldaps://")
        args = [*sync_args(tmp_path, server), *(["--starttls"] if starttls else []), "--dry-run"]
        r = cli(tmp_path, *args)  # the system's CAs do not know the tenant CA
        assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
        assert r.stderr.startswith(f"error: cannot bind to {server.url} as {ROOT_DN}: ")
        assert "certificate" in r.stderr.lower()
        out = ok(cli(tmp_path, *args, "--ldap-ca", str(p / "ca.crt")))
        assert "  + user ann: name 'Ann Lee'" in out
    finally:
        server.stop()


def test_starttls_never_falls_back_to_plain_text(tmp_path: Path, slapd: Slapd) -> None:
    """A server that offers no TLS (the plain slapd) is an error, not a plain bind; and
    StartTLS on an ldaps:// URL is a mistake said in one line."""
    r = cli(tmp_path, *[*sync_args(tmp_path, slapd), "--starttls", "--dry-run"])
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
    assert r.stderr.startswith(f"error: cannot bind to {slapd.url} as {ROOT_DN}: ")
    ldaps = slapd.url.replace("ldap://", "ldaps://")
    r = cli(tmp_path, "directory", "sync", "--ldap", ldaps, "--base", SUFFIX,
            "--tenant", "contoso", "--starttls")  # fmt: skip
    assert r.stderr.strip() == f"error: StartTLS is for ldap:// URLs; {ldaps} is not one"

"""`addin-server apply` and `export` as real commands on a real SQLite file: the plan, one
revision per apply, --prune required to remove, --dry-run changing nothing, `export | apply`
a no-op; and against a real server and broker, a user pruned from a group loses its
membership in the retained state the agents read."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from harness import REPO, ServerProcess
from server_helpers import query, retained_state

from simulator.mosquitto import MosquittoBroker

FIXTURES = REPO / "tests" / "fixtures" / "manifests"
TASKPANE = "0e3b2c1a-5d4f-4a6b-8c7d-9e0f1a2b3c4d"
MAIL = "a1b2c3d4-e5f6-4789-abcd-ef0123456789"

ORG = f"""
tenant: contoso
users: [{{id: ann}}, {{id: bob}}]
groups:
  - {{id: all-staff}}
  - {{id: sales, members: [ann, bob], parents: [all-staff]}}
addins:
  - {{manifest: taskpane.xml}}
  - {{manifest: mail.xml}}
  - {{store: WA104379501}}
assignments:
  - {{addin: {TASKPANE}, target: "group:sales", mode: fixed}}
  - {{addin: {MAIL}, target: "group:all-staff", mode: optional}}
  - {{addin: {MAIL}, target: "user:bob", mode: available}}
"""

SMALLER = f"""
tenant: contoso
policy: {{nested_groups: true}}
users: [{{id: ann, name: Ann Lee}}, {{id: bob}}]
groups:
  - {{id: sales, members: [ann]}}
addins:
  - {{manifest: taskpane.xml}}
assignments:
  - {{addin: {TASKPANE}, target: "group:sales", mode: optional}}
"""


def cli(
    tmp: Path, *args: str, stdin: str | None = None, db: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`addin-server ARGS` on `db` (default: server.db in `tmp`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADDIN_SERVER_")}
    env["ADDIN_SERVER_DB"] = db or str(tmp / "server.db")
    env["ADDIN_SERVER_PUBLISH_WAIT"] = "0"
    return subprocess.run(
        [sys.executable, "-m", "server_stub", *args],
        input=stdin, capture_output=True, text=True, timeout=60, env=env, cwd=tmp,
    )  # fmt: skip


def ok(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def revision(tmp: Path, db: str | None = None) -> int:
    return int(query(db or str(tmp / "server.db"),
                     "SELECT value FROM meta WHERE key='revision'")[0][0])  # fmt: skip


def _org(tmp: Path, name: str, text: str) -> Path:
    for m in ("taskpane.xml", "mail.xml"):
        shutil.copy(FIXTURES / m, tmp / m)
    (tmp / name).write_text(text)
    return tmp / name


def test_apply_plans_then_makes_one_revision_and_prunes_only_when_told(
    tmp_path: Path, db_target: str
) -> None:
    db = db_target
    org = _org(tmp_path, "org.yaml", ORG)
    out = ok(cli(tmp_path, "apply", str(org), db=db))
    assert "  + user ann\n" in out and f"  + assignment {MAIL} -> user:bob: mode available" in out
    assert "Plan: 13 to add, 0 to change, 0 to remove." in out
    assert out.rstrip().endswith("messages queued).") and revision(tmp_path, db) == 1
    out = ok(cli(tmp_path, "apply", str(org), db=db))
    assert "No changes: the server already matches the file." in out and revision(tmp_path, db) == 1

    smaller = _org(tmp_path, "smaller.yaml", SMALLER)
    out = ok(cli(tmp_path, "apply", str(smaller), "--dry-run", db=db))
    assert "  ~ policy nested_groups: false -> true" in out
    assert "  ~ user ann: name 'ann' -> 'Ann Lee'" in out
    assert f"  ~ assignment {TASKPANE} -> group:sales: mode fixed -> optional" in out
    assert "  - member bob in sales  (kept: pass --prune to remove)" in out
    assert "Plan: 0 to add, 3 to change, 0 to remove (7 kept without --prune)." in out
    assert "Dry run: nothing was changed." in out and revision(tmp_path, db) == 1

    ok(cli(tmp_path, "apply", str(smaller), db=db))  # the changes only: nothing removed
    assert revision(tmp_path, db) == 2
    exported = ok(cli(tmp_path, "export", db=db))
    assert "bob" in exported and "all-staff" in exported and "WA104379501" in exported

    out = ok(cli(tmp_path, "apply", str(smaller), "--prune", db=db))
    assert "Plan: 0 to add, 0 to change, 7 to remove." in out and revision(tmp_path, db) == 3
    assert query(db, "SELECT count(*) FROM audit WHERE operation='apply'")[0][0] == 3
    assert query(db, "SELECT user_id, group_id FROM memberships") == [("ann", "sales")]
    assert [r[0] for r in query(db, "SELECT id FROM addins")] == [TASKPANE]
    rows = query(db, "SELECT topic, payload FROM outbox WHERE revision=3")
    tombstones = {t.split("/", 3)[3] for t, p in rows if b'"deleted":true' in bytes(p)}
    assert f"assign/user/bob/{MAIL}" in tombstones and f"catalog/{MAIL}" in tombstones
    assert "group/all-staff/parents" in tombstones


def test_export_then_apply_is_a_no_op(tmp_path: Path) -> None:
    ok(cli(tmp_path, "apply", str(_org(tmp_path, "org.yaml", ORG))))
    ok(cli(tmp_path, "policy", "set", "--nested-groups"))
    ok(cli(tmp_path, "user", "add", "dan", "--name", "Dan O'Neil \u00e9"))
    ok(cli(tmp_path, "addin", "assign", TASKPANE, "--user", "dan"))
    before = revision(tmp_path)
    exported = ok(cli(tmp_path, "export"))
    out = ok(cli(tmp_path, "apply", "-", "--prune", stdin=exported))
    assert out.splitlines() == [
        "Plan: 0 to add, 0 to change, 0 to remove.",
        "No changes: the server already matches the file.",
    ]
    assert revision(tmp_path) == before
    # The same document applied to an empty server rebuilds the same state.
    other = tmp_path / "other"
    other.mkdir()
    ok(cli(other, "apply", "-", stdin=exported))
    assert ok(cli(other, "export")) == exported


def _assign_payload(db: str, revision: int, topic_end: str) -> dict[str, Any]:
    rows = query(db, f"SELECT topic, payload FROM outbox WHERE revision={revision}")
    found = [json.loads(bytes(p)) for t, p in rows if t.endswith(topic_end)]
    assert len(found) == 1, rows
    return found[0]  # type: ignore[no-any-return]


def test_apply_writes_compares_and_exports_an_assignments_exclusions(tmp_path: Path) -> None:
    """``except:`` is part of an assignment: apply writes it and publishes it with the mode
    (an agent reading the message must not install for those excluded), a change of it alone
    is a change, export writes it, and `export | apply` stays a no-op."""
    db = str(tmp_path / "server.db")
    excluding = ORG.replace(
        'target: "group:sales", mode: fixed}',
        'target: "group:sales", mode: fixed, except: [user:bob]}',
    )
    assert excluding != ORG
    out = ok(cli(tmp_path, "apply", str(_org(tmp_path, "org.yaml", excluding))))
    assert f"  + assignment {TASKPANE} -> group:sales: mode fixed, except user:bob" in out
    assert query(db, "SELECT kind, id FROM assignment_exceptions") == [("user", "bob")]
    sales = f"assign/group/sales/{TASKPANE}"
    assert _assign_payload(db, 1, sales)["except_users"] == ["bob"]

    exported = ok(cli(tmp_path, "export"))
    assert "except:\n  - user:bob" in exported
    out = ok(cli(tmp_path, "apply", "-", "--prune", stdin=exported))
    assert "No changes: the server already matches the file." in out and revision(tmp_path) == 1

    # A mode change keeps the exclusion in the message; the exclusion alone changing is a
    # change too.
    optional = excluding.replace("mode: fixed, except", "mode: optional, except")
    ok(cli(tmp_path, "apply", str(_org(tmp_path, "optional.yaml", optional))))
    assert _assign_payload(db, 2, sales) | {"revision": 0, "committed_at": 0} == {
        "mode": "optional", "except_users": ["bob"], "revision": 0, "committed_at": 0,
    }  # fmt: skip
    out = ok(cli(tmp_path, "apply", str(_org(tmp_path, "org2.yaml", ORG))))
    assert (
        f"  ~ assignment {TASKPANE} -> group:sales: mode optional -> fixed, except user:bob -> none"
    ) in out
    assert query(db, "SELECT count(*) FROM assignment_exceptions") == [(0,)]
    assert "except_users" not in _assign_payload(db, 3, sales)
    # An exclusion naming nobody known is refused, and nothing is written.
    bad = excluding.replace("except: [user:bob]", "except: [user:nobody]")
    r = cli(tmp_path, "apply", str(_org(tmp_path, "bad.yaml", bad)))
    assert r.returncode != 0 and r.stderr.splitlines() == [
        "error: cannot exclude unknown user 'nobody'"
    ]
    assert revision(tmp_path) == 3


def test_apply_refuses_a_bad_document_and_changes_nothing(tmp_path: Path) -> None:
    ok(cli(tmp_path, "apply", str(_org(tmp_path, "org.yaml", ORG))))
    bad = _org(tmp_path, "bad.yaml", "tenant: contoso\ngroups: [{id: g, members: [nobody]}]\n")
    r = cli(tmp_path, "apply", str(bad), "--prune")
    assert r.returncode != 0
    assert r.stderr.splitlines() == ["error: group 'g' lists unknown member 'nobody'"]
    assert revision(tmp_path) == 1
    r = cli(tmp_path, "apply", str(tmp_path / "missing.yaml"))
    assert r.returncode == 1 and r.stderr.startswith("error: cannot read")


async def test_pruned_member_loses_the_group_in_the_retained_state(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    server = ServerProcess(tmp_path / "server.db", broker.url)
    server.start()
    try:
        ok(cli(tmp_path, "apply", str(_org(tmp_path, "org.yaml", ORG))))
        ok(cli(tmp_path, "apply", str(_org(tmp_path, "smaller.yaml", SMALLER)), "--prune"))
        state: dict[str, object] = {}
        for _ in range(40):  # bounded: the publisher polls the outbox every 150 ms
            state = await retained_state(broker.port)
            if state.get("member/bob", {}).get("revision") == 2:  # type: ignore[union-attr]
                break
            await asyncio.sleep(0.1)
    finally:
        server.stop()
    assert state["member/bob"]["groups"] == []  # type: ignore[index]
    assert state["member/ann"]["groups"] == ["sales"]  # type: ignore[index]
    assert state[f"assign/group/sales/{TASKPANE}"]["mode"] == "optional"  # type: ignore[index]
    assert state[f"catalog/{MAIL}"]["deleted"] is True  # type: ignore[index]
    assert state["policy"]["nested_groups"] is True  # type: ignore[index]


def test_a_manifest_file_that_never_ends_is_refused_not_read_to_the_end(tmp_path: Path) -> None:
    """A document (or `addin add`) naming /dev/zero: one error line, the database untouched.
    Run with an address-space limit so a CLI that reads it whole fails fast instead of
    taking the machine's memory."""
    import resource

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    env = {k: v for k, v in os.environ.items() if not k.startswith("ADDIN_SERVER_")}
    env["ADDIN_SERVER_DB"] = str(tmp_path / "server.db")
    (tmp_path / "org.yaml").write_text("tenant: contoso\naddins: [{manifest: /dev/zero}]\n")
    for args in (["apply", "org.yaml"], ["addin", "add", "/dev/zero", "--tenant", "contoso"]):
        r = subprocess.run(
            [sys.executable, "-m", "server_stub", *args], capture_output=True, text=True,
            timeout=60, env=env, cwd=tmp_path, preexec_fn=limited,
        )  # fmt: skip
        assert r.returncode == 1, r.stderr
        assert "Traceback" not in r.stderr
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and "larger than 524288 bytes (512 KB)" in lines[0], lines
    assert not (tmp_path / "server.db").exists() or revision(tmp_path) == 0

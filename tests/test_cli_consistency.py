"""Both command lines behave alike: options before or after the command, one error line,
names accepted and close matches suggested, nothing created by a mistyped path, and an
admin told when a committed change has not been published. Real processes, real SQLite
files, a real Mosquitto where a publisher runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_helpers import addin_id
from harness import ServerProcess
from server_helpers import TASKPANE_ID, TASKPANE_V1

from addin_core.protocol import Assignment, CatalogEntry, Host, Mode, Source, Topic
from agent.config import AgentConfig
from agent.daemon import Agent
from simulator.mosquitto import MosquittoBroker, free_port


def run(
    tool: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    # The installed commands, as an admin types them (error lines name the command).
    command = str(Path(sys.executable).parent / f"addin-{tool}")
    base = {
        k: v for k, v in os.environ.items() if not k.startswith(("ADDIN_AGENT", "ADDIN_SERVER"))
    }
    return subprocess.run(
        [command, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **(env or {})},
    )


def one_error_line(r: subprocess.CompletedProcess[str], code: int) -> str:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


# -- the agent --------------------------------------------------------------------------------


@pytest.fixture
def agent_config(tmp_path: Path) -> Path:
    """An agent.toml whose cache holds 'Contoso Tables', assigned to Everyone."""
    cache = tmp_path / "cache.sqlite"
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        'tenant = "contoso"\nuser_id = "ann"\nclient_id = "ann-pc"\ninsecure = true\n'
        f'cache_path = "{cache}"\nhosts = ["Word"]\n'
    )

    async def fill() -> None:
        agent = Agent(AgentConfig(tenant="contoso", user_id="ann", client_id="ann-pc",
                                  insecure=True, cache_path=str(cache), hosts=(Host.WORD,)))  # fmt: skip
        await agent.open()
        aid = addin_id("tables")
        await agent.accept(
            Topic.catalog("contoso", aid),
            CatalogEntry(
                revision=1, committed_at=1.0, addin_id=aid, name="Contoso Tables",
                source=Source.LOB, version="1.0.0.0", manifest_sha256="0" * 64,
                manifest_url="/v1/manifests/" + "0" * 64, hosts=[Host.WORD],
                permissions="ReadDocument", enabled=True,
            ),
        )  # fmt: skip
        await agent.accept(
            Topic.assign_everyone("contoso", aid), Assignment(revision=2, mode=Mode.AVAILABLE)
        )
        await agent.stop()

    import asyncio

    asyncio.run(fill())
    return cfg


def test_agent_takes_config_before_or_after_the_command(agent_config: Path, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.toml")
    after = run("agent", "status", "--json", "--config", str(agent_config))
    assert after.returncode == 0, after.stderr
    assert json.loads(after.stdout)["client"]["client_id"] == "ann-pc"
    before = run("agent", "--config", str(agent_config), "status", "--json")
    assert json.loads(before.stdout)["client"]["client_id"] == "ann-pc"
    # Both given: the one after the command wins, whichever way round.
    assert (
        run("agent", "--config", missing, "status", "--config", str(agent_config)).returncode == 0
    )
    line = one_error_line(
        run("agent", "--config", str(agent_config), "status", "--config", missing), 1
    )
    assert line == f"error: config file {missing} does not exist"
    # ... and over the environment.
    r = run("agent", "status", "--config", str(agent_config), env={"ADDIN_AGENT_CONFIG": missing})
    assert r.returncode == 0, r.stderr


def test_agent_finds_its_config_in_the_default_places(agent_config: Path, tmp_path: Path) -> None:
    machine = [
        p for p in ("/var/lib/addin-agent", "/etc/addin-agent") if Path(p, "agent.toml").exists()
    ]
    if machine:
        pytest.skip(f"this machine has an agent.toml in {machine[0]}")
    xdg = tmp_path / "xdg"
    env = {"XDG_CONFIG_HOME": str(xdg), "HOME": str(tmp_path)}
    line = one_error_line(run("agent", "status", env=env), 1)
    assert line == (
        "error: no agent config: pass --config FILE or set ADDIN_AGENT_CONFIG; looked for "
        f"{xdg}/addin-agent/agent.toml, /var/lib/addin-agent/agent.toml, "
        "/etc/addin-agent/agent.toml"
    )
    (xdg / "addin-agent").mkdir(parents=True)
    (xdg / "addin-agent" / "agent.toml").write_text(agent_config.read_text())
    r = run("agent", "status", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["client"]["client_id"] == "ann-pc"


def test_agent_config_that_is_a_directory_is_one_line(tmp_path: Path) -> None:
    line = one_error_line(run("agent", "status", "--config", str(tmp_path)), 1)
    assert line == f"error: config file {tmp_path} is a directory; give the agent.toml in it"


def test_agent_suggests_close_names(agent_config: Path) -> None:
    r = run("agent", "why", "contoso tabels", "--config", str(agent_config))
    assert r.returncode == 0, r.stderr
    assert "did you mean 'Contoso Tables'?" in r.stdout
    line = one_error_line(
        run("agent", "install", "Contoso Tabels", "--config", str(agent_config)), 1
    )
    assert line == (
        "error: no add-in called 'Contoso Tabels' is in this computer's catalog; "
        "did you mean 'Contoso Tables'?"
    )


def test_usage_errors_are_one_line_on_both_tools(tmp_path: Path) -> None:
    line = one_error_line(run("agent", "status", "--confg", "x"), 2)
    assert line.startswith("error: No such option '--confg'")
    assert "'--config'" in line and line.endswith("(see addin-agent status --help)")
    line = one_error_line(run("server", "addn", "list", "--db", str(tmp_path / "s.db")), 2)
    assert line == "error: No such command 'addn'. Did you mean 'addin'? (see addin-server --help)"
    line = one_error_line(run("server", "addin", "list"), 2)
    assert line == "error: no database given: pass --db FILE or set ADDIN_SERVER_DB"


# -- the server -------------------------------------------------------------------------------


def loaded_db(tmp_path: Path) -> Path:
    (tmp_path / "m.xml").write_bytes(TASKPANE_V1.read_bytes())
    (tmp_path / "org.yaml").write_text(
        "tenant: contoso\nusers: [{id: ann}]\naddins: [{manifest: m.xml}]\n"
        f"assignments: [{{addin: {TASKPANE_ID}, target: 'user:ann', mode: fixed}}]\n"
    )
    db = tmp_path / "server.db"
    r = run("server", "load", str(tmp_path / "org.yaml"), "--db", str(db))
    assert r.returncode == 0, r.stderr
    return db


def test_server_takes_db_before_or_after_the_command(tmp_path: Path) -> None:
    db = loaded_db(tmp_path)
    wrong = tmp_path / "wrong.db"
    for args in (
        ("--db", str(db), "addin", "list"),
        ("addin", "--db", str(db), "list"),
        ("addin", "list", "--db", str(db)),
        ("--db", str(wrong), "addin", "list", "--db", str(db)),
    ):
        r = run("server", *args)
        assert r.returncode == 0, (args, r.stderr)
        assert TASKPANE_ID in r.stdout
    r = run("server", "addin", "list", env={"ADDIN_SERVER_DB": str(wrong)})
    assert r.returncode == 2
    r = run("server", "addin", "list", "--db", str(db), env={"ADDIN_SERVER_DB": str(wrong)})
    assert r.returncode == 0, r.stderr
    assert not wrong.exists()


def test_mistyped_db_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "sever.db"
    line = one_error_line(run("server", "status", "--db", str(missing)), 2)
    assert line.startswith(f"error: no database at {missing} (check --db / ADDIN_SERVER_DB)")
    nodir = tmp_path / "nodir" / "server.db"
    line = one_error_line(
        run("server", "user", "add", "ann", "--tenant", "contoso", "--db", str(nodir)), 2
    )
    assert line == f"error: no folder {nodir.parent} for the database {nodir}"
    line = one_error_line(run("server", "user", "add", "ann", "--db", str(tmp_path)), 2)
    assert "is a directory" in line
    # A write on a new file without --tenant, or a refused write: the new file goes again.
    new = tmp_path / "new.db"
    one_error_line(run("server", "user", "add", "ann", "--db", str(new)), 2)
    one_error_line(
        run("server", "user", "add", "bad/id", "--tenant", "contoso", "--db", str(new)), 1
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_failed_load_leaves_no_database(tmp_path: Path) -> None:
    (tmp_path / "org.yaml").write_text(
        "tenant: contoso\nusers: [{id: ann}]\ngroups: [{id: sales, members: [anne]}]\n"
    )
    db = tmp_path / "server.db"
    line = one_error_line(run("server", "load", str(tmp_path / "org.yaml"), "--db", str(db)), 2)
    assert line == "error: group 'sales' lists unknown member 'anne'"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["org.yaml"]


def test_serve_on_another_tenants_database_is_one_line(tmp_path: Path) -> None:
    db = loaded_db(tmp_path)
    r = run(
        "server", "serve", "--db", str(db), "--tenant", "fabrikam",
        "--broker", f"mqtt://127.0.0.1:{free_port()}", "--listen", f"127.0.0.1:{free_port()}",
        "--admin-token", "adm", "--agent-token", "agt", "--insecure",
    )  # fmt: skip
    line = one_error_line(r, 1)
    assert (
        line == "error: database belongs to tenant 'contoso', not 'fabrikam'; one tenant per server"
    )


def test_explain_and_status_accept_names_and_suggest(tmp_path: Path) -> None:
    db = loaded_db(tmp_path)
    r = run(
        "server", "explain", "--user", "ann", "--addin", "contoso task pane add-in", "--db", str(db)
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(
        f"User ann and add-in Contoso Task Pane Add-in ({TASKPANE_ID}) version 1.0.0.0"
    )
    assert "Verdict: ENTITLED, mode fixed" in r.stdout
    r = run("server", "status", "Contoso Task Pane Add-in", "--json", "--db", str(db))
    assert json.loads(r.stdout)["addins"][0]["addin_id"] == TASKPANE_ID
    line = one_error_line(
        run("server", "explain", "--user", "ann", "--addin", "Contoso Task Pan", "--db", str(db)), 2
    )
    assert (
        line == "error: unknown add-in 'Contoso Task Pan'; did you mean 'Contoso Task Pane Add-in'?"
    )
    line = one_error_line(
        run("server", "explain", "--user", "an", "--addin", TASKPANE_ID, "--db", str(db)), 2
    )
    assert line == "error: unknown user 'an'; did you mean 'ann'?"
    line = one_error_line(run("server", "group", "add-member", "sales", "ann", "--db", str(db)), 2)
    assert line == "error: unknown group 'sales'"


# -- committed is not published ---------------------------------------------------------------


def test_write_without_a_server_says_it_is_not_published(tmp_path: Path) -> None:
    db = loaded_db(tmp_path)
    r = run("server", "user", "add", "bob", "--db", str(db))
    assert r.returncode == 0  # the change is committed
    assert r.stdout == "revision 2: id=bob, name=bob\n"
    assert r.stderr.startswith(
        "warning: revision 2 is committed but not published: no `addin-server serve` is "
        f"running on {db}; 4 messages wait in the outbox (oldest "
    )
    assert r.stderr.endswith("), published when it starts\n")
    r = run("server", "user", "add", "carl", "--json", "--db", str(db))
    assert json.loads(r.stdout)["published"] is False
    r = run("server", "status", "--db", str(db))
    last = r.stdout.splitlines()[-1]
    assert last.startswith(
        "Publisher: no addin-server serve is running on this database; 5 messages wait in "
        "the outbox (oldest "
    )
    status = json.loads(run("server", "status", "--json", "--db", str(db)).stdout)
    assert status["outbox"]["waiting"] == 5
    assert status["publisher"] == {"running": False, "pid": None}


class Serve(ServerProcess):
    """`addin-server serve` on `db`, started and answering."""

    def __init__(self, db: Path, broker: MosquittoBroker) -> None:
        super().__init__(db, broker.url, admin_token="adm", agent_token="agt")
        self.start()

    def stop(self, timeout: float = 20.0) -> None:
        super().stop(timeout)


@pytest.fixture
def serving() -> Iterator[list[Serve]]:
    made: list[Serve] = []
    yield made
    for s in made:
        s.stop()


def test_write_with_a_server_running_is_published_or_says_why_not(
    tmp_path: Path, broker: MosquittoBroker, serving: list[Serve]
) -> None:
    db = loaded_db(tmp_path)
    server = Serve(db, broker)
    serving.append(server)
    # A generous wait: a loaded machine must not turn "published" into "not yet".
    r = run("server", "user", "add", "bob", "--json", "--db", str(db),
            env={"ADDIN_SERVER_PUBLISH_WAIT": "60"})  # fmt: skip
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert json.loads(r.stdout)["published"] is True
    r = run("server", "status", "--db", str(db))
    assert r.stdout.splitlines()[-1] == (
        f"Publisher: addin-server serve (pid {server.proc.pid}) is running; the outbox is empty"
    )
    broker.kill()  # serve runs, but cannot publish
    r = run("server", "user", "add", "carl", "--db", str(db))
    assert r.returncode == 0
    assert r.stderr.startswith(
        "warning: revision 3 is committed but not published yet: `addin-server serve` "
        f"(pid {server.proc.pid}) has not sent it within 3 s (is the broker reachable? see its "
        "log); 1 message waits in the outbox (oldest "
    ), r.stderr

"""The server's own identities (broker account and MQTT client id ``addin-server-<tenant>``)
cannot be taken by a user or an agent: every write path refuses them with one error line,
and `broker-config` on a database that already holds one still configures the tenant."""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
from pydantic import ValidationError
from test_server_broker_cli import addin_server, one_error_line

from agent.config import AgentConfig
from server_stub import db
from server_stub.service import BadRequest, Service

RESERVED = "addin-server-contoso"


async def test_service_refuses_the_server_account_as_user_id(db_target: str) -> None:
    database = await db.Database.open(db_target)
    await database.bind_tenant("contoso")
    service = Service(database, "contoso")
    try:
        for uid in (RESERVED, "Addin-Server-other"):
            with pytest.raises(BadRequest, match="reserved"):
                await service.create_user(uid)
            with pytest.raises(BadRequest, match="reserved"):
                await service.load_org({"users": [{"id": "ann"}, {"id": uid}]})
        assert await service.user_ids() == []  # the refused load wrote nothing
    finally:
        await service.close()


def test_cli_user_add_and_load_refuse_it_with_one_line(tmp_path: Path) -> None:
    r = addin_server("user", "add", RESERVED, "--tenant", "contoso", "--db", "s.db", cwd=tmp_path)
    assert "is reserved" in one_error_line(r)
    (tmp_path / "org.yaml").write_text(
        f"tenant: contoso\nusers: [{{id: ann}}, {{id: {RESERVED}}}]\n"
    )
    r = addin_server("load", "org.yaml", "--db", "s.db", cwd=tmp_path)
    assert "is reserved" in one_error_line(r)


def test_broker_config_on_a_database_already_holding_it(tmp_path: Path) -> None:
    (tmp_path / "org.yaml").write_text("tenant: contoso\nusers: [{id: ann}, {id: bob}]\n")
    assert addin_server("load", "org.yaml", "--db", "s.db", cwd=tmp_path).returncode == 0
    # As an older server let it in.
    with closing(sqlite3.connect(tmp_path / "s.db")) as c, c:
        c.execute("INSERT INTO users(id, name) VALUES (?, ?)", (RESERVED, "x"))
    r = addin_server("broker-config", "broker", "--db", "s.db", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert f"no broker account for user ids {RESERVED!r}" in r.stdout
    creds = json.loads((tmp_path / "broker" / "credentials.json").read_text())
    assert sorted(creds["agents"]) == ["ann", "bob"]
    names = [line.split(":")[0] for line in (tmp_path / "broker" / "passwd").read_text().split()]
    assert names == [RESERVED, "ann", "bob"]  # the server's account, once

    (tmp_path / "broker" / "credentials.json").write_text("{not json")
    r = addin_server("broker-config", "broker", "--db", "s.db", cwd=tmp_path)
    assert "cannot be read" in one_error_line(r)


def test_agent_config_refuses_the_servers_client_id() -> None:
    with pytest.raises(ValidationError, match="reserved"):
        AgentConfig(tenant="contoso", user_id="ann", client_id=RESERVED)

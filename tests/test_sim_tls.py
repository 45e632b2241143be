"""`addin-sim run --tls`: a run's own PKI, the broker's TLS listener, `serve --pki`, and every
virtual client an enrolled device connecting with its own certificate and token.

Real Mosquitto, real server stub (subprocess, HTTPS), one real worker subprocess.
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from simulator.cli import main
from simulator.coordinator import Coordinator, RunOptions, RunResult
from simulator.report import write_reports
from simulator.scenario import load_scenario

CLIENTS = 20

CONNECTED = re.compile(r"New client connected from \S+ as (\S+) \(.*?u'([^']*)'\)")
"""Mosquitto's connect line; u'...' is the username, on the TLS listener the certificate's CN."""


async def _run(tmp_path: Path, **kw: Any) -> RunResult:
    options = RunOptions(
        clients=CLIENTS, workers=1, workdir=tmp_path, checkpoint_settle=0.2, tls=True, **kw
    )
    coordinator = Coordinator(load_scenario("phased-rollout"), options)
    return await asyncio.wait_for(coordinator.execute(), 240)


async def test_a_tls_run_has_no_mismatch_and_every_client_its_own_identity(
    tmp_path: Path,
) -> None:
    result = await _run(tmp_path / "run")
    assert result.mismatches == [] and result.server_disagreements == []
    assert result.state_signed
    assert all(s.unconverged == 0 for s in result.steps)
    workdir = tmp_path / "run"
    users = dict(
        sqlite3.connect(workdir / "server.sqlite")
        .execute("SELECT device_id, user_id FROM devices WHERE revoked_at IS NULL")
        .fetchall()
    )
    assert len(users) == CLIENTS and all(d.startswith("ws-") for d in users)

    # Every agent connected to the TLS listener with its own certificate: Mosquitto took
    # each one's username from its certificate's CN, and it is the agent's client id.
    log = (workdir / "broker" / "mosquitto.log").read_text()
    identities = {cid: user for cid, user in CONNECTED.findall(log) if cid.startswith("ws-")}
    assert identities == {device: device for device in users}

    # And the server accepted each device's reports (on report/<device>, which the ACL lets
    # only that certificate write) for the user it is enrolled to.
    reports = dict(
        sqlite3.connect(workdir / "server.sqlite")
        .execute("SELECT client_id, user_id FROM reports")
        .fetchall()
    )
    assert reports == users

    report = write_reports(result, tmp_path / "report")
    assert report["tls"] is True
    assert report["connect_storms"][0]["step"] == "connect"
    assert report["connect_storms"][0]["clients"] == CLIENTS
    assert report["connect_storms"][0]["connected"] == CLIENTS
    assert report["connect_storms"][0]["seconds"] > 0
    assert report["errors"]["reconnects"] == 0
    # The download floor fetched the manifest over https with a device's own token.
    download = report["baseline"]["download"]
    assert (download["received"], download["failed"]) == (CLIENTS, 0)
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    assert data["connect_storms"] == report["connect_storms"]
    page = (tmp_path / "report" / "report.html").read_text()
    assert "connect storm (connect)" in page and f"{CLIENTS} of {CLIENTS} clients" in page
    assert "MQTT over TLS and HTTPS" in page


def test_tls_with_an_outside_broker_server_or_remote_workers_is_refused(tmp_path: Path) -> None:
    runner = CliRunner()
    for extra, words in (
        (["--broker", "mqtt://127.0.0.1:1"], "--tls makes the run's own PKI, broker and server"),
        (
            ["--server", "http://127.0.0.1:1", "--admin-token", "t"],
            "cannot use --broker or --server",
        ),
        (["--remote-workers", "1"], "--tls with --remote-workers is not supported"),
    ):
        out = runner.invoke(
            main, ["run", "--tls", "--clients", "2", "--report", str(tmp_path), *extra]
        )
        assert out.exit_code == 2, out.output
        assert words in out.output
        assert "Traceback" not in out.output
    assert not (tmp_path / "report.json").exists()


async def test_the_fleet_is_enrolled_whole_or_not_at_all(tmp_path: Path) -> None:
    """`Devices.enroll_many`: one transaction; an unknown user or a device already enrolled
    refuses the whole batch, saying which."""
    from server_stub.cli.runner import open_service
    from server_stub.service import Conflict, NotFound
    from simulator.fleet_pki import FleetPki

    db = tmp_path / "server.sqlite"
    service = await open_service(db, "contoso")
    try:
        await service.create_user("u1")
    finally:
        await service.close()
    fleet = FleetPki(tmp_path, "contoso")
    fleet.make([("ws-u1", "u1"), ("ws-u2", "u2")])
    assert sorted(p.name for p in fleet.devices_dir.iterdir()) == [
        "ws-u1.crt", "ws-u1.key", "ws-u2.crt", "ws-u2.key"
    ]  # fmt: skip
    assert fleet.key_file("ws-u1").stat().st_mode & 0o777 == 0o600

    def devices() -> list[tuple[str, str]]:
        return sqlite3.connect(db).execute("SELECT device_id, user_id FROM devices").fetchall()

    with pytest.raises(NotFound, match="unknown user 'u2'"):
        await fleet.enroll(db)
    assert devices() == []

    service = await open_service(db, "contoso")
    try:
        await service.create_user("u2")
    finally:
        await service.close()
    assert await fleet.enroll(db) == 2
    assert sorted(devices()) == [("ws-u1", "u1"), ("ws-u2", "u2")]
    with pytest.raises(Conflict, match="'ws-u1' is already enrolled"):
        await fleet.enroll(db)
    assert len(devices()) == 2

"""`addin-server explain`, `status` and `broker-config`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from addin_core.protocol import server_identity
from addin_runtime.cli_support import error
from addin_runtime.instance_lock import held_by
from server_stub.broker_config import (
    BrokerConfigError,
    is_tls_dir,
    write_broker_config,
    write_tls_broker_config,
)
from server_stub.broker_targets import TARGETS
from server_stub.cli.broker_targets import other_target, wrote_target
from server_stub.cli.runner import common, db_path, run
from server_stub.explain import render_explain, render_status
from server_stub.pki import PkiError, open_pki
from server_stub.service import BadRequest, Service


@click.command()
@click.option("--user", "user_id", required=True)
@click.option("--addin", "addin_id", required=True, help="Add-in id or display name.")
@common
def explain(user_id: str, addin_id: str, **kw: Any) -> None:
    """Is USER entitled to ADDIN, through which assignment and group path, and what did
    the user's agents report?"""
    run(kw, lambda s: s.explain(user_id, addin_id), render_explain, writes=False)


@click.command()
@click.argument("addin", required=False)
@common
def status(addin: str | None, **kw: Any) -> None:
    """Per add-in (ADDIN: id or name): entitled users and how many agents reported the
    current version applied; whether a publisher runs, and the outbox backlog."""
    path = db_path(writes=False)

    async def op(s: Service) -> dict[str, Any]:
        result = await s.status(addin)
        if isinstance(path, Path):
            holder = held_by(path)
            result["publisher"] = {"running": holder is not None, "pid": holder and holder.pid}
        else:
            running = await s.database.publisher_running()
            result["publisher"] = {"running": bool(running), "pid": None}
        return result

    run(kw, op, render_status, writes=False)


@click.command("broker-config")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--pki",
    "pki_dir",
    envvar="ADDIN_SERVER_PKI",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="TLS mode: the tenant's PKI folder; without it, password accounts (lab) "
    "[env ADDIN_SERVER_PKI].",
)
@click.option(
    "--target",
    type=click.Choice(TARGETS),
    default="mosquitto",
    show_default=True,
    help="mosquitto: one broker; mosquitto-bridge: regional brokers bridged to a core; "
    "nats: a NATS cluster with its MQTT gateway and JetStream (password mode only).",
)
@click.option(
    "--node",
    "nodes",
    multiple=True,
    help="Repeatable. mosquitto-bridge: HOST:PORT of the core, then of each region [default: "
    "127.0.0.1:18883 and two regions on 18884, 18885]. nats: "
    "mqtt=HOST:PORT,client=HOST:PORT,cluster=HOST:PORT [default: three loopback nodes, "
    "MQTT 18883-18885, clients 14222-14224, routes 16222-16224].",
)
@click.option(
    "--store-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="nats: JetStream's folder, one node-N folder per node [default: DIRECTORY/jetstream].",
)
@click.option(
    "--light-consumers",
    is_flag=True,
    help="nats: each MQTT subscription's JetStream consumer on one node, in memory, instead "
    "of replicated like the streams: far cheaper for thousands of agents; a node lost "
    "leaves its consumers' clients without deliveries until they reconnect or "
    "anti-entropy repairs them.",
)
@common
def broker_config(
    directory: Path,
    pki_dir: Path | None,
    target: str,
    nodes: tuple[str, ...],
    store_dir: Path | None,
    light_consumers: bool,
    **kw: Any,
) -> None:
    """Write the broker's files into DIRECTORY. With --pki: the CA, the broker's certificate
    and key, the CRL, and an ACL with one block per enrolled device (clients authenticate
    with their certificates). Without: Mosquitto `passwd` and `acl` files and
    `credentials.json` (0600), one account per user (lab). --target mosquitto-bridge and
    nats write a bridge tree's or a NATS cluster's files, with the same accounts and rules."""
    if target != "mosquitto" or nodes or store_dir is not None or light_consumers:
        if pki_dir is not None:
            error("--target mosquitto-bridge and nats are password mode (lab): drop --pki", 2)
        run(kw, lambda s: other_target(s, directory, target, nodes, store_dir, light_consumers),
            wrote_target, writes=False)  # fmt: skip
        return
    if pki_dir is not None:
        run(kw, lambda s: _tls_config(s, directory, pki_dir), _wrote_tls, writes=False)
        return
    if is_tls_dir(directory):
        error(f"{directory} holds a TLS broker configuration: give --pki, or use another folder")

    async def op(s: Service) -> dict[str, Any]:
        users = await s.user_ids()
        try:
            creds = write_broker_config(directory, s.tenant, users)
        except (BrokerConfigError, OSError) as e:
            error(str(e))
        skipped = creds["skipped"]
        assert isinstance(skipped, list)
        return {
            "directory": str(directory),
            "server_username": creds["server"]["username"],  # type: ignore[index]
            "agents": len(users) - len(skipped),
            "skipped": skipped,
            "files": ["passwd", "acl", "credentials.json"],
        }

    run(kw, op, _wrote, writes=False)


def _wrote(r: dict[str, Any]) -> str:
    text = (
        f"wrote {r['directory']}/passwd ({r['agents']} agent accounts + server account "
        f"{r['server_username']}), {r['directory']}/acl, "
        f"{r['directory']}/credentials.json (mode 0600)"
    )
    if r["skipped"]:
        # A database from before user ids were checked can hold one that cannot be an
        # account; the rest of the tenant must still get its accounts.
        text += (
            f"\nwarning: no broker account for user ids {', '.join(map(repr, r['skipped']))}: "
            "reserved or unsafe as a broker account name; remove them with "
            "`addin-server user remove ID`"
        )
    return text


async def _tls_config(s: Service, directory: Path, pki_dir: Path) -> dict[str, Any]:
    try:
        p = open_pki(pki_dir)
    except PkiError as e:
        raise BadRequest(str(e)) from None
    if p.tenant != s.tenant:
        raise BadRequest(f"{pki_dir} is the PKI of tenant {p.tenant!r}, not {s.tenant!r}")
    devices = await s.devices.active()
    try:
        files = write_tls_broker_config(directory, pki_dir, s.tenant, devices)
    except OSError as e:
        raise BadRequest(f"cannot write {directory}: {e}") from None
    return {
        "directory": str(directory),
        "files": [str(f) for f in files],
        "devices": len(devices),
        "server_identity": server_identity(s.tenant),
    }


def _wrote_tls(r: dict[str, Any]) -> str:
    return (
        f"wrote {', '.join(r['files'])}: TLS with client certificates; the acl lets "
        f"{r['devices']} enrolled device{'' if r['devices'] == 1 else 's'} and the server ({r['server_identity']}) in\n"
        f"start it with `addin-server broker run {r['directory']} --listen HOST:PORT`"
    )

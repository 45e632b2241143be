"""`addin-server pki init`, `enroll`, `revoke` and `device list`: the tenant's certificates
and the devices holding them.

`enroll` and `revoke` also bring the broker up to date when given its folder (--broker-dir,
or ADDIN_SERVER_BROKER_DIR): they rewrite the ACL and the CRL there and send the broker
SIGHUP, so a new device can read at once and a revoked one is cut off within seconds.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import secrets
from pathlib import Path
from typing import Any

import click

from addin_core.protocol import InvalidTopic
from addin_runtime.cli_support import error
from server_stub.broker_config import is_tls_dir, write_tls_acl
from server_stub.broker_reload import reload_broker
from server_stub.cli.runner import common, run
from server_stub.pki import CRL, Pki, PkiError, init_pki, open_pki
from server_stub.service import BadRequest, Conflict, Service
from server_stub.service.devices import checked_device_id, token_hash

PKI_ENV = "ADDIN_SERVER_PKI"
BROKER_DIR_ENV = "ADDIN_SERVER_BROKER_DIR"

pki_option = click.option(
    "--pki",
    "pki_dir",
    envvar=PKI_ENV,
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help=f"The tenant's PKI folder (`addin-server pki init`) [env {PKI_ENV}].",
)
broker_dir_option = click.option(
    "--broker-dir",
    envvar=BROKER_DIR_ENV,
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="The broker's folder (`broker-config DIR --pki`): its acl and crl.pem are rewritten "
    f"and the broker reloaded [env {BROKER_DIR_ENV}].",
)


@click.group()
def pki() -> None:
    """The tenant's certificate authority and keys."""


@pki.command("init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--tenant", envvar="ADDIN_SERVER_TENANT", required=True, help="Tenant id.")
@click.option(
    "--host",
    "hosts",
    multiple=True,
    help="A name or IP address agents use for the broker and the server (repeat); "
    "default: localhost, 127.0.0.1, ::1.",
)
def pki_init(directory: Path, tenant: str, hosts: tuple[str, ...]) -> None:
    """Make the tenant's CA in DIRECTORY (0700), the broker's and the HTTPS server's TLS
    certificates, the server's MQTT client certificate, the Ed25519 key that signs state,
    and an empty CRL. Refuses a DIRECTORY that already holds a CA."""
    try:
        written = init_pki(directory, tenant, hosts)
    except (PkiError, ValueError, InvalidTopic) as e:
        error(str(e), 2 if isinstance(e, ValueError) else 1)
    except OSError as e:
        error(f"cannot write {directory}: {e.strerror or e}")
    info = json.loads((directory / "pki.json").read_text())
    click.echo(f"tenant {tenant}: CA 'addin-deploy {tenant} CA' in {directory} (mode 0700)")
    for path in written:
        mode = path.stat().st_mode & 0o777
        click.echo(f"  wrote {path} ({mode:04o})")
    click.echo(f"TLS names of the broker and the server: {', '.join(info['hosts'])}")
    click.echo(
        f"next: `addin-server broker-config BROKER_DIR --pki {directory}`, then "
        f"`addin-server enroll --user U --device D --pki {directory}` per device"
    )


def _open(pki_dir: Path, tenant: str) -> Pki:
    try:
        p = open_pki(pki_dir)
    except PkiError as e:
        raise BadRequest(str(e)) from None
    if p.tenant != tenant:
        raise BadRequest(f"{pki_dir} is the PKI of tenant {p.tenant!r}, not {tenant!r}")
    return p


async def refresh_broker(s: Service, p: Pki, broker_dir: Path | None) -> list[str]:
    """Rewrite the CRL from every revoked serial; with `broker_dir`, its acl and crl.pem
    too, and reload the broker. What was done, one line each (warnings start so)."""
    try:
        crl = p.write_crl(await s.devices.revoked_serials())
    except (PkiError, OSError) as e:
        raise BadRequest(f"cannot rewrite {p.path(CRL)}: {e}") from None
    done = [f"wrote {crl}"]
    if broker_dir is None:
        return [
            *done,
            "warning: no --broker-dir: the broker still has the old acl and crl.pem; run "
            f"`addin-server broker-config BROKER_DIR --pki {p.directory}` and reload it (SIGHUP)",
        ]
    if not is_tls_dir(broker_dir):
        return [
            *done,
            f"warning: {broker_dir} is not a TLS broker folder: run "
            f"`addin-server broker-config {broker_dir} --pki {p.directory}` and reload the broker",
        ]
    devices = await s.devices.active()
    try:
        acl = write_tls_acl(broker_dir, s.tenant, devices)
        tmp = broker_dir / ".crl.pem.tmp"
        tmp.write_bytes(crl.read_bytes())
        os.replace(tmp, broker_dir / CRL)
    except OSError as e:
        raise BadRequest(f"cannot write the broker's files in {broker_dir}: {e}") from None
    n = len(devices)
    done.append(f"wrote {acl} ({n} device{'s' if n != 1 else ''}) and {broker_dir / CRL}")
    reloaded, what = reload_broker(broker_dir)
    done.append(what if reloaded else f"warning: {what}")
    return done


def _bundle(p: Pki, user: str, device: str, cert: Any, token: str, broker: str, server: str) -> str:
    q = json.dumps  # a TOML basic string is a JSON string for these values
    ca = p.path("ca.crt").read_text()
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join(
        [
            f"# addin-agent configuration of device {device} (user {user}, tenant {p.tenant}),",
            f"# written by `addin-server enroll` on {when}. It holds the device's private key",
            "# and HTTP token: keep it mode 0600, readable by the agent's account only.",
            f"tenant = {q(p.tenant)}",
            f"user_id = {q(user)}",
            f"client_id = {q(device)}",
            f"broker_url = {q(broker)}",
            f"server_url = {q(server)}",
            f"server_token = {q(token)}",
            "insecure = false",
            f"signing_key = {q(p.signing_public())}",
            f"tls_ca = '''\n{ca}'''",
            f"tls_cert = '''\n{cert.cert_pem}'''",
            f"tls_key = '''\n{cert.key_pem}'''",
            '# cache_path = "addin-agent.sqlite"   # relative to this file\'s folder',
            '# applier = "memory"                  # or "folder", with applier_dir = "..."',
            "",
        ]
    )


def _default_url(scheme: str, host: str, port: int) -> str:
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"


@click.command()
@click.option("--user", "user_id", required=True, help="The user the device acts for.")
@click.option("--device", "device_id", required=True, help="Device id: its MQTT client id.")
@pki_option
@click.option(
    "--broker-url", default=None, help="mqtts://HOST:PORT [default: first PKI host, 8883]"
)
@click.option(
    "--server-url", default=None, help="https://HOST:PORT [default: first PKI host, 8443]"
)
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
    help="The agent.toml to write (mode 0600) [default: DEVICE.agent.toml].",
)  # fmt: skip
@click.option(
    "--replace", is_flag=True,
    help="Re-enroll an enrolled (or revoked) device: new certificate and token; the old "
    "certificate is revoked.",
)  # fmt: skip
@broker_dir_option
@common
def enroll(
    user_id: str,
    device_id: str,
    pki_dir: Path,
    broker_url: str | None,
    server_url: str | None,
    output: Path | None,
    replace: bool,
    broker_dir: Path | None,
    **kw: Any,
) -> None:
    """Enroll DEVICE for USER: issue its client certificate (CN = DEVICE) and HTTP token, and
    write its whole agent configuration (one file, certificates inline)."""
    try:
        checked_device_id(device_id)
    except BadRequest as e:
        error(e.message, 2)
    out = output or Path(f"{device_id}.agent.toml")
    if not out.parent.is_dir():
        error(f"no folder {out.parent} for {out}")
    for url, scheme, flag in ((broker_url, "mqtts", "--broker-url"), (server_url, "https", "--server-url")):  # fmt: skip
        if url is not None and not url.startswith(f"{scheme}://"):
            error(f"{flag} {url!r} must start with {scheme}://", 2)

    async def op(s: Service) -> dict[str, Any]:
        p = _open(pki_dir, s.tenant)
        if not replace:
            await s.devices.refuse_enrolled(device_id)
            if out.exists():
                raise Conflict(f"{out} exists; choose another -o FILE")
        cert = p.issue_device(device_id)
        token = secrets.token_urlsafe(32)
        host = p.hosts[0]
        text = _bundle(p, user_id, device_id, cert, token,
                       broker_url or _default_url("mqtts", host, 8883),
                       server_url or _default_url("https", host, 8443))  # fmt: skip
        # The bundle is written before the device is recorded and moved into place after:
        # a refused enrollment leaves no file, a recorded one always has its bundle.
        tmp = out.with_name(f".{out.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        try:
            now = s.clock()
            result = await s.devices.enroll(
                user_id, device_id, cert.serial, token_hash(token), now, replace=replace
            )
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        os.chmod(tmp, 0o600)
        os.replace(tmp, out)
        result["bundle"] = str(out)
        if broker_dir is None and not replace:
            # Nothing was revoked, so the CRL stands; the broker just does not know the
            # device yet. A note, not a warning: on a first setup the broker comes after.
            result["broker"] = [
                f"next: the broker lets {device_id} in once its acl lists it: run "
                f"`addin-server broker-config BROKER_DIR --pki {p.directory}` and reload the "
                "broker, or enroll with --broker-dir BROKER_DIR to do both"
            ]
        else:
            result["broker"] = await refresh_broker(s, p, broker_dir)
        return result

    run(kw, op, _enrolled)


def _enrolled(r: dict[str, Any]) -> str:
    lines = [
        f"enrolled device {r['device']} for user {r['user']}: certificate serial {r['serial']}"
    ]
    if r["replaced_serial"]:
        lines.append(f"revoked its previous certificate (serial {r['replaced_serial']}) and token")
    if r["was_revoked"]:
        # Mosquitto's ACL is per username (= device id) and it never closed the revoked
        # certificate's open connection: measured, that connection reads again.
        lines.append(
            f"warning: {r['device']} was revoked: a broker connection its old certificate may "
            "still hold reads again until the device connects with the new one or the broker "
            "restarts; for a stolen device use a new device id"
        )
    lines.append(
        f"wrote {r['bundle']} (mode 0600): the agent's configuration with its key, "
        "certificate and token; on the device: `addin-agent service install --config FILE`"
    )
    return "\n".join(lines + r["broker"])


@click.command()
@click.argument("device_id")
@pki_option
@broker_dir_option
@common
def revoke(device_id: str, pki_dir: Path, broker_dir: Path | None, **kw: Any) -> None:
    """Revoke DEVICE: its HTTP token is refused from now on, its certificate goes into the
    CRL, its ACL block is removed and the broker reloaded."""

    async def op(s: Service) -> dict[str, Any]:
        p = _open(pki_dir, s.tenant)
        result = await s.devices.revoke(device_id, s.clock())
        result["broker"] = await refresh_broker(s, p, broker_dir)
        return result

    run(kw, op, _revoked)


def _revoked(r: dict[str, Any]) -> str:
    what = "was already revoked" if r["already_revoked"] else "revoked"
    lines = [
        f"device {r['device']} (user {r['user']}) {what}: its token is refused from now on; "
        f"certificate serial {r['serial']} is in the CRL"
    ]
    return "\n".join(lines + r["broker"])


@click.group()
def device() -> None:
    """Enrolled devices."""


@device.command("list")
@common
def device_list(**kw: Any) -> None:
    """Every enrolled device: its user, when it was enrolled, whether it is revoked."""

    async def op(s: Service) -> list[dict[str, Any]]:
        return await s.devices.listing()

    run(kw, op, _table, writes=False)


def _when(at: float | None) -> str:
    if at is None:
        return "-"
    return datetime.datetime.fromtimestamp(at, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no devices enrolled (`addin-server enroll --user U --device D`)"
    table = [("DEVICE", "USER", "ENROLLED (UTC)", "REVOKED (UTC)")]
    table += [
        (r["device"], r["user"], _when(r["enrolled_at"]), _when(r["revoked_at"])) for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True)) + "  " + row[3]
        for row in table
    )

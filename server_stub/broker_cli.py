"""`addin-server broker ...`: run a private Mosquitto with the files `broker-config` writes.

For a workstation walk-through, a pilot, or a developer's machine: one listener (loopback
by default, never the system broker's 1883), the generated accounts and ACL, retained
messages and sessions kept on disk. A production broker is configured by whoever runs it;
`broker-config` writes the two files it needs either way.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import sys
from pathlib import Path
from typing import NoReturn

import click

from server_stub.broker_config import TLS_FILES, is_tls_dir
from server_stub.broker_reload import PID_FILE

DEFAULT_LISTEN = "127.0.0.1:18883"
"""Outside Linux's ephemeral range (32768-60999), so no test's free port collides with it."""
DEFAULT_TLS_LISTEN = "127.0.0.1:8883"
"""MQTT over TLS's registered port; the system broker of a Debian install listens on 1883 only."""


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def find_mosquitto() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)),
        None,
    )


def parse_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"--listen {listen!r} must look like HOST:PORT, e.g. {DEFAULT_LISTEN}")
    return host, int(port)


def mosquitto_conf(directory: Path, host: str, port: int, *, tls: bool = False) -> str:
    """The broker's whole configuration; paths absolute, so it runs from any directory.
    With `tls`, clients authenticate with a certificate of the tenant's CA, and their
    username and client id are its CN; otherwise with the passwords of `passwd`."""
    d = directory.absolute()
    lines = [
        f"# Written by `addin-server broker run {directory}` at every start; edits are lost.",
        f"listener {port} {host}",
        "allow_anonymous false",
    ]
    if tls:
        lines += tls_listener_lines(d)
    else:
        lines.append(f"password_file {d / 'passwd'}")
    lines += [
        f"acl_file {d / 'acl'}",
        f"pid_file {d / PID_FILE}",
        "persistence true",
        f"persistence_location {d / 'data'}",
        "log_dest stderr",
        "log_timestamp_format %Y-%m-%d %H:%M:%S",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
    ]
    if os.geteuid() == 0:
        # Started as root, Mosquitto drops to another user: the owner of the generated
        # files, who can read the 0600 password file.
        lines.append(f"user {pwd.getpwuid(d.stat().st_uid).pw_name}")
    return "\n".join(lines) + "\n"


def tls_listener_lines(directory: Path) -> list[str]:
    """The TLS options of a listener, with the files `broker-config --pki` copied into
    `directory`: a client certificate of the tenant's CA is required, and its CN is both
    the username the ACL matches and the client id (also used by `addin-sim run --tls`)."""
    d = directory.absolute()
    return [
        f"cafile {d / 'ca.crt'}",
        f"certfile {d / 'broker.crt'}",
        f"keyfile {d / 'broker.key'}",
        f"crlfile {d / 'crl.pem'}",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
    ]


def _port_in_use(host: str, port: int) -> str | None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            return e.strerror or str(e)
    return None


@click.group()
def broker() -> None:
    """A private Mosquitto broker with the files `broker-config` writes."""


@broker.command("run")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--listen",
    default=None,
    help=f"HOST:PORT of the broker's listener [default: {DEFAULT_TLS_LISTEN} with TLS, the "
    f"port `enroll` writes into bundles; {DEFAULT_LISTEN} in password mode, which has no "
    "TLS: keep it on loopback or a trusted network].",
)
def run(directory: Path, listen: str | None) -> None:
    """Run Mosquitto in the foreground until SIGTERM or Ctrl-C, with the files
    `addin-server broker-config DIRECTORY` wrote: TLS with client certificates when it was
    given --pki, else the lab's password accounts. Writes DIRECTORY/mosquitto.conf, its pid
    in DIRECTORY/mosquitto.pid (`enroll` and `revoke` reload it), and keeps retained
    messages and sessions in DIRECTORY/data."""
    tls = is_tls_dir(directory)
    if listen is None:
        listen = DEFAULT_TLS_LISTEN if tls else DEFAULT_LISTEN
    try:
        host, port = parse_listen(listen)
    except ValueError as e:
        _fail(str(e), 2)
    needed = ("acl", *TLS_FILES) if tls else ("passwd", "acl")
    missing = [name for name in needed if not (directory / name).is_file()]
    if missing:
        _fail(
            f"{directory} has no {' or '.join(missing)}: "
            f"run `addin-server broker-config {directory}{' --pki PKI' if tls else ''}` first"
        )
    binary = find_mosquitto()
    if binary is None:
        _fail(
            "mosquitto is not installed: run `sudo apt-get install -y mosquitto` "
            "(scripts/bootstrap.sh does this when run as root)"
        )
    busy = _port_in_use(host, port)
    if busy is not None:
        _fail(f"cannot listen on {host}:{port}: {busy} (another broker? choose --listen)")
    (directory / "data").mkdir(exist_ok=True)
    conf = directory / "mosquitto.conf"
    conf.write_text(mosquitto_conf(directory, host, port, tls=tls))
    accounts = (
        f"client certificates of {directory / 'ca.crt'}"
        if tls
        else f"the accounts of {directory / 'passwd'}"
    )
    click.echo(
        f"addin-server: broker mqtt{'s' if tls else ''}://{listen} with {accounts} "
        f"and {directory / 'acl'} (config {conf}); Ctrl-C stops it",
        err=True,
    )
    sys.stderr.flush()
    # Mosquitto takes this process's place, so SIGTERM reaches it directly and it saves
    # its data before it exits.
    os.execv(binary, [binary, "-c", str(conf.absolute())])


@broker.command("password")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.argument("account")
def password(directory: Path, account: str) -> None:
    """Print the broker password of ACCOUNT (a user id, or the server account
    addin-server-TENANT) from DIRECTORY/credentials.json, for provisioning scripts."""
    path = directory / "credentials.json"
    try:
        creds = json.loads(path.read_text())
    except FileNotFoundError:
        _fail(f"{path} does not exist: run `addin-server broker-config {directory}` first")
    except (OSError, ValueError) as e:
        _fail(f"{path} cannot be read: {e}")
    server = creds.get("server") or {}
    agents = creds.get("agents") or {}
    if account == server.get("username"):
        click.echo(server["password"])
    elif account in agents:
        click.echo(agents[account])
    else:
        _fail(
            f"no account {account!r} in {path}: the server account is "
            f"{server.get('username')!r}; agent accounts are user ids "
            f"(re-run broker-config after adding users)"
        )

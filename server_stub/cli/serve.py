"""`addin-server serve`: the HTTP API and the publisher, one per database.

Secure by default: it starts with --pki DIR (HTTPS, MQTT over TLS with the server's client
certificate, reports only from enrolled devices) or, for a lab, with an explicit --insecure
(plain HTTP and MQTT, and the shared --agent-token), which it warns about at start."""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

import click

from addin_runtime.cli_support import error
from addin_runtime.instance_lock import AlreadyLocked, InstanceLock
from addin_runtime.mqtt_version import MQTT_VERSIONS, MqttVersion, parse_mqtt_version
from server_stub import db
from server_stub.cli.runner import db_option, db_path, max_addins_option, open_service, store_option
from server_stub.signer import SigningKeyError, StateSigner, load_signer, signing_key_path


@dataclass(frozen=True)
class _Tls:
    """serve --pki: the HTTPS certificate and the publisher's TLS client context."""

    certfile: Path
    keyfile: Path
    mqtt: ssl.SSLContext


@dataclass(frozen=True)
class _Settings:
    tenant: str
    broker: str
    broker_username: str | None
    broker_password: str | None
    host: str
    port: int
    admin_token: str
    agent_token: str | None
    admin_user: str | None
    store_catalog: Path
    max_addins: int
    signer: StateSigner | None
    tls: _Tls | None
    mqtt_version: MqttVersion = "auto"


INSECURE_WARNING = (
    "warning: --insecure: plain HTTP and MQTT without TLS, broker passwords, and the shared "
    "--agent-token accepted for every user; for a lab only (use --pki DIR otherwise)"
)


@click.command()
@db_option
@click.option("--tenant", envvar="ADDIN_SERVER_TENANT", required=True, help="Tenant id.")
@click.option(
    "--broker",
    envvar="ADDIN_SERVER_BROKER",
    required=True,
    help="mqtts://HOST:PORT with --pki; mqtt://HOST:PORT with --insecure",
)
@click.option(
    "--pki",
    "pki_dir",
    envvar="ADDIN_SERVER_PKI",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="The tenant's PKI folder (`addin-server pki init`): HTTPS, and MQTT over TLS with "
    "the server's client certificate [env ADDIN_SERVER_PKI].",
)
@click.option(
    "--insecure",
    envvar="ADDIN_SERVER_INSECURE",
    is_flag=True,
    help="Lab only, instead of --pki: plain HTTP and MQTT, broker password, shared agent "
    "token [env ADDIN_SERVER_INSECURE=1].",
)
@click.option("--broker-username", envvar="ADDIN_SERVER_BROKER_USERNAME", default=None)
@click.option("--broker-password", envvar="ADDIN_SERVER_BROKER_PASSWORD", default=None)
@click.option(
    "--listen",
    envvar="ADDIN_SERVER_LISTEN",
    default=None,
    help="HOST:PORT [default: 127.0.0.1:8443 with --pki, the port `enroll` writes into "
    "bundles; 127.0.0.1:8080 with --insecure]",
)
@click.option("--admin-token", envvar="ADDIN_SERVER_ADMIN_TOKEN", required=True)
@click.option(
    "--agent-token",
    envvar="ADDIN_SERVER_AGENT_TOKEN",
    default=None,
    help="A token every agent may use for every user (--insecure only; agents otherwise "
    "use their device's token from `addin-server enroll`).",
)
@click.option(
    "--admin-user",
    envvar="ADDIN_SERVER_ADMIN_USER",
    default=None,
    help="The admin's own user id, for assignments to 'me'.",
)
@click.option(
    "--signing-key",
    envvar="ADDIN_SERVER_SIGNING_KEY",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Ed25519 private key (PKCS8 PEM, mode 0600) that signs every state payload; "
    "agents configured with its public key refuse anything else.",
)
@click.option(
    "--mqtt-version",
    envvar="ADDIN_SERVER_MQTT_VERSION",
    type=click.Choice(MQTT_VERSIONS),
    default="auto",
    show_default=True,
    help="MQTT 5, falling back to 3.1.1 when the broker refuses 5 (auto), or pinned "
    "[env ADDIN_SERVER_MQTT_VERSION].",
)
@store_option
@max_addins_option
def serve(
    tenant: str,
    broker: str,
    pki_dir: Path | None,
    insecure: bool,
    broker_username: str | None,
    broker_password: str | None,
    listen: str | None,
    admin_token: str,
    agent_token: str | None,
    admin_user: str | None,
    store_catalog: Path,
    max_addins: int,
    signing_key: Path | None,
    mqtt_version: str,
) -> None:
    """Run the HTTP API and the publisher (outbox -> MQTT, reports <- MQTT): with --pki over
    HTTPS and MQTT/TLS; with --insecure (a lab) in plain text."""
    if listen is None:
        listen = "127.0.0.1:8443" if pki_dir is not None else "127.0.0.1:8080"
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise click.BadParameter("expected HOST:PORT", param_hint="--listen")
    _check_mode(pki_dir, insecure, agent_token, broker_username or broker_password)
    from server_stub.publisher import parse_broker_url

    try:
        parse_broker_url(broker, tls=pki_dir is not None)
    except ValueError as e:
        # Refused here, before any database is made, not retried for ever by the publisher.
        error(f"--broker {e}", 2)
    tls = _tls(pki_dir, tenant) if pki_dir is not None else None
    _check_listen(host, int(port))
    key_path = signing_key_path(signing_key, pki_dir)
    try:
        signer = load_signer(key_path) if key_path is not None else None
    except SigningKeyError as e:
        error(str(e), 2)
    settings = _Settings(tenant, broker, broker_username, broker_password, host, int(port),
                         admin_token, agent_token, admin_user, store_catalog, max_addins,
                         signer, tls, parse_mqtt_version(mqtt_version))  # fmt: skip
    _serve_alone(db_path(writes=True), settings)


def _check_mode(
    pki_dir: Path | None, insecure: bool, agent_token: str | None, password: str | None
) -> None:
    """Secure unless told otherwise: --pki, or --insecure for a lab; never both, never none."""
    if pki_dir is not None and insecure:
        error("--pki and --insecure exclude each other: give one", 2)
    if pki_dir is None and not insecure:
        error(
            "serve needs --pki DIR (HTTPS and MQTT over TLS with the tenant's certificates; "
            "see `addin-server pki init`) or, for a lab, --insecure (plain HTTP and MQTT)",
            2,
        )
    if agent_token is not None and not insecure:
        error(
            "--agent-token is accepted only with --insecure: agents use their device's token "
            "(`addin-server enroll`)",
            2,
        )
    if password is not None and not insecure:
        error(
            "--broker-username/--broker-password are for --insecure: with --pki the server "
            "logs in to the broker with its certificate (server-client.crt)",
            2,
        )


def _tls(pki_dir: Path, tenant: str) -> _Tls:
    """The PKI's HTTPS certificate and the publisher's TLS context, checked before start."""
    from server_stub import pki

    try:
        p = pki.open_pki(pki_dir)
    except pki.PkiError as e:
        error(str(e), 2)
    if p.tenant != tenant:
        error(f"--pki {pki_dir} is the PKI of tenant {p.tenant!r}, not {tenant!r}", 2)
    certfile, keyfile = p.path(pki.SERVER_CERT), p.path(pki.SERVER_KEY)
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile)
        mqtt = ssl.create_default_context(cafile=str(p.path(pki.CA_CERT)))
        mqtt.load_cert_chain(p.path(pki.CLIENT_CERT), p.path(pki.CLIENT_KEY))
    except (OSError, ssl.SSLError) as e:
        error(f"--pki {pki_dir}: cannot load its certificates: {e}", 2)
    return _Tls(certfile, keyfile, mqtt)


def _serve_alone(path: Path, settings: _Settings) -> None:
    """Serve while holding the database's instance lock."""
    # One publisher per database: a second one would publish under the same MQTT client id
    # and the two would knock each other off the broker for as long as both run.
    lock = InstanceLock(path)
    try:
        lock.acquire()
    except AlreadyLocked as e:
        error(
            f"another addin-server serve ({e.holder.describe()}) is running on {path}: "
            "one server per database; stop it first"
        )
    except OSError as e:
        error(f"cannot lock {lock.path}: {e.strerror or e}")
    try:
        _serve(path, settings)
    except db.DatabaseError as e:
        error(str(e))
    finally:
        lock.release()


def _serve(path: Path, s: _Settings) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # uvloop when installed (the `fast` extra): the manifest endpoint serves a whole fleet.
    try:
        import uvloop
    except ImportError:
        asyncio.run(_run_server(path, s))
    else:
        uvloop.run(_run_server(path, s))


async def _run_server(path: Path, s: _Settings) -> None:
    import uvicorn

    from addin_runtime.tasks import cancel_and_wait
    from server_stub.api import create_app
    from server_stub.publisher import Publisher

    service = await open_service(path, s.tenant, s.store_catalog, s.max_addins, s.admin_user)
    service.actor = "api"
    publisher = Publisher(
        path,
        s.tenant,
        s.broker,
        username=s.broker_username,
        password=s.broker_password,
        report_sink=service.record_reports,
        signer=s.signer,
        tls_context=s.tls.mqtt if s.tls is not None else None,
        mqtt_version=s.mqtt_version,
    )
    service.on_commit = publisher.wake
    service.signer = s.signer
    # With certificates, the broker binds each report topic to a device: refuse reports
    # from devices not enrolled to the user they claim, or revoked.
    service.enrolled_reports_only = s.tls is not None
    app = create_app(service, admin_token=s.admin_token, agent_token=s.agent_token)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=s.host,
            port=s.port,
            log_level="warning",
            lifespan="off",
            ssl_certfile=str(s.tls.certfile) if s.tls is not None else None,
            ssl_keyfile=str(s.tls.keyfile) if s.tls is not None else None,
        )
    )
    pub = asyncio.create_task(publisher.run())
    scheme = "https" if s.tls is not None else "http"
    if s.tls is None:
        click.echo(INSECURE_WARNING, err=True)
    signing = (
        f"state signed (public key {s.signer.public_text})"
        if s.signer is not None
        else "state UNSIGNED (no --signing-key)"
    )
    click.echo(
        f"addin-server: tenant {s.tenant}, {scheme}://{s.host}:{s.port}, broker {s.broker}, {signing}",
        err=True,
    )
    try:
        await server.serve()
    finally:
        await cancel_and_wait(pub, 10, "the publisher")
        await service.close()


def _check_listen(host: str, port: int) -> None:
    """Refuse an address we cannot listen on before any database is made: uvicorn would
    otherwise log its own error and exit 3 after the database was opened."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(infos[0][4])
    except OSError as e:
        error(f"cannot listen on {host}:{port}: {e.strerror or e}")

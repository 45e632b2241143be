"""`addin-server serve`: the HTTP API and the publisher, one per database.

Secure by default: it starts with --pki DIR (HTTPS, MQTT over TLS with the server's client
certificate, reports only from enrolled devices) or, for a lab, with an explicit --insecure
(plain HTTP and MQTT, and the shared --agent-token), which it warns about at start."""

from __future__ import annotations

import asyncio
import gc
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from click.core import ParameterSource

from addin_runtime.cli_support import error
from addin_runtime.instance_lock import AlreadyLocked, InstanceLock
from addin_runtime.logs import log_format_option, setup_logging
from addin_runtime.mqtt_version import MQTT_VERSIONS, MqttVersion, parse_mqtt_version
from server_stub import config, db
from server_stub.cli.runner import db_option, db_path, max_addins_option, open_service, store_option
from server_stub.health import DEFAULT_MAX_OUTBOX_LAG
from server_stub.ldap_directory import (
    DEFAULT_GROUP_FILTER,
    DEFAULT_USER_FILTER,
    LdapError,
    LdapSettings,
    read_password,
)
from server_stub.roles import Principals, TokenSpecError, read_tokens_file
from server_stub.signer import SigningKeyError, StateSigner, load_signer, signing_key_path
from server_stub.store import DEFAULT_CATALOG

if TYPE_CHECKING:
    from server_stub.service import Service


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
    principals: Principals
    agent_token: str | None
    admin_user: str | None
    store_catalog: Path
    max_addins: int
    signer: StateSigner | None
    tls: _Tls | None
    max_outbox_lag: float
    log_format: str
    metrics: bool
    metrics_token: str | None
    directory: LdapSettings | None
    sync_interval: float
    max_removal_share: float
    gate_interval: float = 5.0
    mqtt_version: MqttVersion = "auto"


INSECURE_WARNING = (
    "warning: --insecure: plain HTTP and MQTT without TLS, broker passwords, and the shared "
    "--agent-token accepted for every user; for a lab only (use --pki DIR otherwise)"
)


@click.command()
@db_option
@click.option(
    "--config",
    "config_file",
    envvar="ADDIN_SERVER_CONFIG",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="server.toml (packaging/server.example.toml); environment variables and flags "
    "override it [env ADDIN_SERVER_CONFIG].",
)
@click.option("--tenant", envvar="ADDIN_SERVER_TENANT", default=None, help="Tenant id.")
@click.option(
    "--broker",
    envvar="ADDIN_SERVER_BROKER",
    default=None,
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
@click.option(
    "--admin-token",
    envvar="ADDIN_SERVER_ADMIN_TOKEN",
    default=None,
    help="The token of an admin named \"admin\" (the same as --token admin:admin:TOKEN).",
)
@click.option(
    "--token",
    "token_specs",
    multiple=True,
    metavar="ROLE:NAME:TOKEN",
    help="A token for the API and the console, repeatable; ROLE is admin (everything), "
    "operator (rollouts, and reads) or helpdesk (reads and explain only). NAME is what the "
    "audit log records.",
)
@click.option(
    "--tokens-file",
    envvar="ADDIN_SERVER_TOKENS_FILE",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="A file of ROLE:NAME:TOKEN lines (# comments), instead of or beside --token "
    "[env ADDIN_SERVER_TOKENS_FILE].",
)
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
@click.option(
    "--ready-max-outbox-lag",
    "max_outbox_lag",
    envvar="ADDIN_SERVER_READY_MAX_OUTBOX_LAG",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_MAX_OUTBOX_LAG,
    show_default=True,
    help="Seconds the oldest unpublished message may wait before /readyz answers 503.",
)
@click.option(
    "--metrics-token",
    envvar="ADDIN_SERVER_METRICS_TOKEN",
    default=None,
    help="A bearer token GET /metrics then requires (none: open, like /healthz and /readyz).",
)
@click.option(
    "--metrics/--no-metrics",
    envvar="ADDIN_SERVER_METRICS",
    default=True,
    show_default=True,
    help="Serve GET /metrics (Prometheus text format).",
)
@click.option(
    "--gate-interval",
    envvar="ADDIN_SERVER_GATE_INTERVAL",
    type=click.FloatRange(0.1, 3600),
    default=5.0,
    show_default=True,
    help="Seconds between checks of running rollouts' gates (advance when one holds).",
)
@log_format_option
@store_option
@max_addins_option
def serve(config_file: Path | None, **kw: Any) -> None:
    """Run the HTTP API and the publisher (outbox -> MQTT, reports <- MQTT): with --pki over
    HTTPS and MQTT/TLS; with --insecure (a lab) in plain text. Settings come from --config
    FILE, then environment variables, then flags, each overriding the one before."""
    cfg = _settings_from(config_file, kw)
    found = config.problems(cfg, need_database=False)
    if found:
        error("\n".join(found), 2)
    secret, _ = config.secrets(cfg)
    sv = cfg.server
    assert sv.tenant is not None and cfg.broker.url is not None
    pki_dir = sv.pki
    listen = sv.listen or ("127.0.0.1:8443" if pki_dir is not None else "127.0.0.1:8080")
    host, _, port = listen.rpartition(":")
    principals = _principals(secret["admin_token"], cfg.auth.tokens, cfg.auth.tokens_file)
    tls = _tls(pki_dir, sv.tenant) if pki_dir is not None else None
    _check_listen(host, int(port))
    key_path = signing_key_path(sv.signing_key, pki_dir)
    try:
        signer = load_signer(key_path) if key_path is not None else None
    except SigningKeyError as e:
        error(str(e), 2)
    settings = _Settings(sv.tenant, cfg.broker.url, cfg.broker.username,
                         secret["broker_password"], host, int(port), principals,
                         secret["agent_token"], sv.admin_user,
                         sv.store_catalog or DEFAULT_CATALOG, sv.max_addins, signer, tls,
                         cfg.health.max_outbox_lag, cfg.logging.format,
                         cfg.metrics.enabled, secret["metrics_token"],
                         _directory(cfg.directory),
                         cfg.directory.interval or 0.0,
                         cfg.directory.max_removal_share,
                         cfg.rollouts.gate_interval,
                         parse_mqtt_version(cfg.broker.mqtt_version))  # fmt: skip
    _serve_alone(db_path(writes=True, fallback=sv.database), settings)


def _directory(d: config.DirectorySection) -> LdapSettings | None:
    """The periodic sync's LDAP settings ([directory] with an interval), or None."""
    if d.interval is None or d.ldap_url is None or d.base is None:
        return None
    try:
        password = read_password(d.bind_password_file) if d.bind_password_file else None
    except LdapError as e:
        error(f"[directory] {e}", 2)
    return LdapSettings(
        url=d.ldap_url,
        base=d.base,
        bind_dn=d.bind_dn,
        password=password,
        user_filter=d.user_filter or DEFAULT_USER_FILTER,
        group_filter=d.group_filter or DEFAULT_GROUP_FILTER,
        user_id_attribute=d.user_id_attribute,
        ca_file=d.ca_file,
        start_tls=d.start_tls,
    )


_OPTION_FIELDS: dict[str, tuple[str, str]] = {
    "tenant": ("server", "tenant"),
    "listen": ("server", "listen"),
    "pki_dir": ("server", "pki"),
    "insecure": ("server", "insecure"),
    "signing_key": ("server", "signing_key"),
    "admin_user": ("server", "admin_user"),
    "store_catalog": ("server", "store_catalog"),
    "max_addins": ("server", "max_addins"),
    "broker": ("broker", "url"),
    "broker_username": ("broker", "username"),
    "broker_password": ("broker", "password"),
    "admin_token": ("auth", "admin_token"),
    "agent_token": ("auth", "agent_token"),
    "token_specs": ("auth", "tokens"),
    "tokens_file": ("auth", "tokens_file"),
    "max_outbox_lag": ("health", "max_outbox_lag"),
    "log_format": ("logging", "format"),
    "metrics": ("metrics", "enabled"),
    "gate_interval": ("rollouts", "gate_interval"),
    "mqtt_version": ("broker", "mqtt_version"),
    "metrics_token": ("metrics", "token"),
}
"""Each option of `serve` and the key of the configuration file it overrides."""


def _settings_from(config_file: Path | None, kw: dict[str, Any]) -> config.ServerConfig:
    """The file's settings, overridden by what the environment or a flag gave (click says
    which gave a value; an option's default never overrides the file)."""
    ctx = click.get_current_context()
    try:
        cfg = config.load(config_file) if config_file is not None else config.ServerConfig()
        given = {
            field: kw[name]
            for name, field in _OPTION_FIELDS.items()
            if ctx.get_parameter_source(name)
            in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
        }
        # A secret from a flag replaces the file's secret file too, not only its inline value.
        for (section, key), value in list(given.items()):
            if key in ("admin_token", "agent_token", "password", "token") and value is not None:
                given[(section, f"{key}_file")] = None
        return config.with_overrides(cfg, given)
    except config.ConfigError as e:
        error(str(e), 2)


def _principals(
    admin_token: str | None, specs: list[str], tokens_file: Path | None
) -> Principals:
    """Who may use the API and the console: --admin-token, --token and --tokens-file."""
    lines = list(specs)
    if tokens_file is not None:
        try:
            lines += read_tokens_file(tokens_file)
        except (OSError, UnicodeDecodeError) as e:
            error(f"--tokens-file {tokens_file}: cannot read it: {e}", 2)
    try:
        return Principals.from_specs(lines, admin_token)
    except TokenSpecError as e:
        error(f"--token: {e}", 2)


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


def _serve_alone(path: Path | str, settings: _Settings) -> None:
    """Serve while holding the database's instance lock (SQLite). On PostgreSQL several
    replicas serve one database: exactly one of them publishes (`server_stub/replicas.py`)."""
    if isinstance(path, str):
        try:
            _serve(path, settings)
        except db.DatabaseError as e:
            error(str(e))
        return
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


def _serve(path: Path | str, s: _Settings) -> None:
    setup_logging("addin-server", s.log_format)
    # uvloop when installed (the `fast` extra): the manifest endpoint serves a whole fleet.
    try:
        import uvloop
    except ImportError:
        asyncio.run(_run_server(path, s))
    else:
        uvloop.run(_run_server(path, s))


async def _run_server(path: Path | str, s: _Settings) -> None:
    import uvicorn

    from addin_runtime.tasks import cancel_and_wait
    from server_stub.api import create_app
    from server_stub.db_target import describe
    from server_stub.loop_thread import LoopThread, WritesFirst, on_loop
    from server_stub.metrics import ServerMetrics
    from server_stub.publisher import Publisher

    service = await open_service(path, s.tenant, s.store_catalog, s.max_addins, s.admin_user)
    service.act_as_server()
    metrics = ServerMetrics(service.database) if s.metrics else None
    record = (
        metrics.count_reports(service.record_reports)
        if metrics is not None
        else service.record_reports
    )
    # The MQTT work (the publisher, the broker restore after a restart, the fleet's reports)
    # runs on a loop of its own, and steps aside while admin writes are served: on this
    # loop it held them for whole batches of publishes and messages
    # (server_stub/loop_thread.py). The reports are stored from this loop, whose database
    # connection and lock order them with the admin writes.
    mqtt = LoopThread("mqtt")
    writes_first = WritesFirst()
    sink = on_loop(asyncio.get_running_loop(), record)
    # Replicas share the reports through a shared subscription, each on a client id of its
    # own; with --pki the broker forces one client id per certificate, so there the
    # leader's session takes them all (server_stub/replicas.py).
    shared = service.database.is_postgresql and s.tls is None
    publisher = Publisher(
        path,
        s.tenant,
        s.broker,
        username=s.broker_username,
        password=s.broker_password,
        report_sink=None if shared else sink,
        signer=s.signer,
        tls_context=s.tls.mqtt if s.tls is not None else None,
        reports_in_session=not shared,
        mqtt_version=s.mqtt_version,
    )
    service.on_commit = publisher.wake
    service.signer = s.signer
    # With certificates, the broker binds each report topic to a device: refuse reports
    # from devices not enrolled to the user they claim, or revoked.
    service.enrolled_reports_only = s.tls is not None
    if metrics is not None:
        metrics.publisher = publisher
    app = create_app(
        service,
        principals=s.principals,
        agent_token=s.agent_token,
        https=s.tls is not None,
        broker=publisher,
        metrics=metrics,
        metrics_token=s.metrics_token,
        max_outbox_lag=s.max_outbox_lag,
    )
    publisher.writes_first = writes_first
    server = uvicorn.Server(
        uvicorn.Config(
            writes_first.asgi(app),
            host=s.host,
            port=s.port,
            log_level="warning",
            # uvicorn's own handlers would print its lines in its own format; without them
            # they reach ours, text or JSON like every other line.
            log_config=None,
            lifespan="off",
            ssl_certfile=str(s.tls.certfile) if s.tls is not None else None,
            ssl_keyfile=str(s.tls.keyfile) if s.tls is not None else None,
        )
    )
    mqtt.start()
    mqtt.submit(publisher.run())
    if shared:
        from server_stub.replicas import SharedReports

        listener = SharedReports(s.tenant, publisher.host, publisher.port, sink,
                                 username=s.broker_username, password=s.broker_password,
                                 writes_first=writes_first)  # fmt: skip
        mqtt.submit(listener.run())
    # Timers that write decide once per database: on PostgreSQL only the replica that holds
    # the outbox runs them (two replicas would both advance a rollout whose gate holds).
    gates = asyncio.create_task(_watch_gates(service, s.gate_interval, publisher.is_leader))
    syncing = None
    if s.directory is not None:
        from server_stub.periodic_sync import sync_forever

        syncing = asyncio.create_task(sync_forever(
            service, s.directory, s.sync_interval, s.max_removal_share, publisher.is_leader
        ))  # fmt: skip
    scheme = "https" if s.tls is not None else "http"
    # Text mode keeps these two lines as they were (plain stderr lines people and scripts
    # read); JSON mode makes them log events like every other line.
    if s.tls is None:
        _say(s, logging.WARNING, INSECURE_WARNING.removeprefix("warning: "), INSECURE_WARNING)
    signing = (
        f"state signed (public key {s.signer.public_text})"
        if s.signer is not None
        else "state UNSIGNED (no --signing-key)"
    )
    where = f", database {describe(path)} (replica)" if isinstance(path, str) else ""
    started = (
        f"tenant {s.tenant}, {scheme}://{s.host}:{s.port}, broker {s.broker}, {signing}{where}"
    )
    _say(s, logging.INFO, started, f"addin-server: {started}")
    console = f"console at {scheme}://{s.host}:{s.port}/console"
    _say(s, logging.INFO, console, f"addin-server: {console}")
    # Everything alive now (modules, the app and its routes, the loaded state) lives as long
    # as the process: out of the collector's sight, a full collection walks only what was
    # made since. With ~100,000 tracked objects one took 60-105 ms (200 ms during a report
    # burst) and landed inside whichever request was running (docs/benchmarks.md).
    gc.collect()
    gc.freeze()
    try:
        await server.serve()
    finally:
        await cancel_and_wait(gates, 10, "the rollout gates")
        if syncing is not None:
            await cancel_and_wait(syncing, 10, "the directory sync")
        await mqtt.stop(10)
        await service.close()


async def _watch_gates(
    service: Service, interval: float, leader: Callable[[], bool] = lambda: True
) -> None:
    """Advance every running rollout whose gate holds, every `interval` seconds, while
    `leader()`. A failed check (the database busy) is logged and tried again at the next one."""
    log = logging.getLogger("addin_server.rollouts")
    while True:
        await asyncio.sleep(interval)
        if not leader():
            continue
        try:
            for r in await service.rollouts.tick():
                log.info(
                    "rollout %s of %s %s: gate held, advanced to ring %s (revision %s)",
                    r["rollout_id"], r["addin_id"], r["version"], r["current_ring"],
                    r["revision"],
                )  # fmt: skip
        except db.TRANSIENT_ERRORS as e:
            log.warning("rollout gates not checked: %s", e)
        except Exception:
            # Any other failure of one round is logged and the next round runs: an
            # exception here ended the task, and no gate advanced any rollout after it.
            log.exception("rollout gates not checked; tried again in %g s", interval)


def _say(s: _Settings, level: int, event: str, line: str) -> None:
    if s.log_format == "json":
        logging.getLogger("addin_server").log(level, event)
    else:
        click.echo(line, err=True)


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

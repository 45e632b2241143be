"""The server's configuration file (``addin-server serve --config server.toml``), its
validation, and how flags and environment variables override it.

Precedence, lowest first: the model's defaults, the TOML file, environment variables
(``ADDIN_SERVER_*``), command-line flags; `serve` reads click's parameter source to know
which of the last two gave a value. Every problem is one line naming the section and field
(``[auth] admin_token: ...``), and all of them are reported at once.

One section per concern, each a pydantic model others extend: ``[server]`` (tenant,
listen address, database, PKI, signing key...), ``[broker]``, ``[auth]`` (the tokens),
``[metrics]``, ``[health]``, ``[logging]``, ``[directory]`` (LDAP sync). Relative paths are
taken from the file's folder. A secret may come from a file (``admin_token_file``) so the
TOML itself can be world-readable.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from server_stub.health import DEFAULT_MAX_OUTBOX_LAG
from server_stub.service.catalog import DEFAULT_MAX_ADDINS


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerSection(_Section):
    tenant: str | None = None
    listen: str | None = None
    """HOST:PORT; default 127.0.0.1:8443 with a PKI, 127.0.0.1:8080 insecure."""
    database: str | None = None
    """An SQLite file (relative to the config file's folder) or a postgresql:// URL."""
    pki: Path | None = None
    insecure: bool = False
    signing_key: Path | None = None
    admin_user: str | None = None
    store_catalog: Path | None = None
    max_addins: Annotated[int, Field(ge=1)] = DEFAULT_MAX_ADDINS


class BrokerSection(_Section):
    url: str | None = None
    username: str | None = None
    password: str | None = None
    password_file: Path | None = None
    mqtt_version: Literal["auto", "5", "3.1.1"] = "auto"
    """MQTT 5, falling back to 3.1.1 when the broker refuses 5 (auto), or pinned."""


class AuthSection(_Section):
    """The bearer tokens: an admin named "admin" (`admin_token`), tokens with roles
    (`tokens`, `tokens_file`: ``ROLE:NAME:TOKEN`` lines, `server_stub/roles.py`) and, for
    --insecure labs, a shared agent token."""

    admin_token: str | None = None
    admin_token_file: Path | None = None
    tokens: list[str] = []
    tokens_file: Path | None = None
    agent_token: str | None = None
    agent_token_file: Path | None = None


class MetricsSection(_Section):
    enabled: bool = True
    """Serve ``GET /metrics`` (Prometheus text format)."""
    token: str | None = None
    token_file: Path | None = None
    """A bearer token /metrics then requires (Prometheus: ``authorization.credentials``);
    none: /metrics is open like the health probes."""


class HealthSection(_Section):
    max_outbox_lag: Annotated[float, Field(gt=0)] = DEFAULT_MAX_OUTBOX_LAG
    """Seconds the oldest unpublished message may wait before /readyz answers 503."""


class RolloutsSection(_Section):
    gate_interval: Annotated[float, Field(ge=0.1, le=3600)] = 5.0
    """Seconds between checks of running rollouts' gates (a rollout advances when one holds)."""


class LoggingSection(_Section):
    format: Literal["text", "json"] = "text"


class DirectorySection(_Section):
    """Directory sync from LDAP / Active Directory (`server_stub/directory_sync.py`)."""

    ldap_url: str | None = None
    bind_dn: str | None = None
    bind_password_file: Path | None = None
    base: str | None = None
    user_filter: str | None = None
    group_filter: str | None = None
    user_id_attribute: str | None = None
    ca_file: Path | None = None
    """The CA of an ldaps:// server's certificate (default: the system's CAs)."""
    start_tls: bool = False
    """On ldap://: StartTLS before the bind (the certificate verified against ca_file)."""
    interval: Annotated[float, Field(gt=0)] | None = None
    """Seconds between syncs while `serve` runs; none: no periodic sync."""
    max_removal_share: Annotated[float, Field(ge=0, le=1)] = 0.1
    """A sync removing more than this share of the users (or of the groups) stops unless
    forced."""

    @model_validator(mode="after")
    def _complete(self) -> DirectorySection:
        if self.interval is not None:
            missing = [n for n in ("ldap_url", "base") if getattr(self, n) is None]
            if missing:
                raise ValueError(f"a periodic sync (interval) needs {' and '.join(missing)}")
        return self


class ServerConfig(_Section):
    server: ServerSection = ServerSection()
    broker: BrokerSection = BrokerSection()
    auth: AuthSection = AuthSection()
    metrics: MetricsSection = MetricsSection()
    health: HealthSection = HealthSection()
    logging: LoggingSection = LoggingSection()
    directory: DirectorySection = DirectorySection()
    rollouts: RolloutsSection = RolloutsSection()


class ConfigError(ValueError):
    """One line per problem, each naming its section and field."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


_PATHS = {
    "server": ("database", "pki", "signing_key", "store_catalog"),
    "broker": ("password_file",),
    "auth": ("admin_token_file", "agent_token_file", "tokens_file"),
    "metrics": ("token_file",),
    "directory": ("bind_password_file", "ca_file"),
}


def _where(loc: tuple[Any, ...]) -> str:
    if not loc:
        return "(file)"
    if len(loc) == 1:
        return f"[{loc[0]}]"
    return f"[{loc[0]}] " + ".".join(str(p) for p in loc[1:])


def parse(data: Mapping[str, Any], name: str, base: Path | None = None) -> ServerConfig:
    """A validated config from TOML data; `base` is the folder relative paths start from."""
    data = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
    if base is not None:
        for section, fields in _PATHS.items():
            values = data.get(section)
            if isinstance(values, dict):
                for f in fields:
                    if isinstance(values.get(f), str) and values[f] and "://" not in values[f]:
                        values[f] = str(base / Path(values[f]).expanduser())
    try:
        return ServerConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(
            [f"{name}: {_where(tuple(x['loc']))}: {x['msg']}" for x in e.errors(include_url=False)]
        ) from None


def load(path: Path) -> ServerConfig:
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror or e}"]) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError([f"{path}: not valid TOML: {e}"]) from None
    return parse(data, str(path), path.parent)


def with_overrides(cfg: ServerConfig, overrides: Mapping[tuple[str, str], Any]) -> ServerConfig:
    """`cfg` with (section, field) values replaced (from the environment or flags), validated
    again so a bad override is refused like a bad file value."""
    data = cfg.model_dump(exclude_unset=True)
    for (section, field), value in overrides.items():
        data.setdefault(section, {})[field] = value
    return parse(data, "settings")


def _secret(inline: str | None, file: Path | None, where: str, problems: list[str]) -> str | None:
    if inline is not None and file is not None:
        problems.append(f"{where}: give the value or the file, not both")
        return None
    if file is None:
        return inline
    try:
        value = file.read_text().strip()
    except OSError as e:
        problems.append(f"{where}_file: cannot read {file}: {e.strerror or e}")
        return None
    if not value:
        problems.append(f"{where}_file: {file} is empty")
        return None
    return value


def secrets(cfg: ServerConfig) -> tuple[dict[str, str | None], list[str]]:
    """The tokens and the broker password, read from their files where given, and the
    problems met doing so."""
    problems: list[str] = []
    a, b = cfg.auth, cfg.broker
    values = {
        "admin_token": _secret(a.admin_token, a.admin_token_file, "[auth] admin_token", problems),
        "agent_token": _secret(a.agent_token, a.agent_token_file, "[auth] agent_token", problems),
        "broker_password": _secret(b.password, b.password_file, "[broker] password", problems),
        "metrics_token": _secret(
            cfg.metrics.token, cfg.metrics.token_file, "[metrics] token", problems
        ),
    }
    return values, problems


def _token_problems(a: AuthSection) -> list[str]:
    """What is wrong with the role tokens, checked like `serve` reads them."""
    from server_stub.roles import Principals, TokenSpecError, read_tokens_file

    lines = list(a.tokens)
    if a.tokens_file is not None:
        try:
            lines += read_tokens_file(a.tokens_file)
        except (OSError, UnicodeDecodeError) as e:
            return [f"--tokens-file ([auth] tokens_file) {a.tokens_file}: cannot read it: {e}"]
    if not lines:
        return []
    try:
        Principals.from_specs(lines, None)
    except TokenSpecError as e:
        return [f"--token ([auth] tokens): {e}"]
    return []


def problems(cfg: ServerConfig, *, need_database: bool = True) -> list[str]:
    """What `serve` would refuse to start with, one line each (after files and overrides).
    Each names the flag and the file's key, whichever the admin used."""
    from server_stub.publisher import parse_broker_url

    s = cfg.server
    values, out = secrets(cfg)
    if s.tenant is None:
        out.append("--tenant ([server] tenant, ADDIN_SERVER_TENANT) is required")
    if need_database and s.database is None:
        out.append("--db ([server] database, ADDIN_SERVER_DB) is required")
    a = cfg.auth
    if values["admin_token"] is None and a.admin_token_file is None and not a.tokens and (
        a.tokens_file is None
    ):
        out.append(
            "--admin-token ([auth] admin_token, ADDIN_SERVER_ADMIN_TOKEN) or --token / "
            "--tokens-file ([auth] tokens, tokens_file) is required"
        )
    out.extend(_token_problems(a))
    if s.pki is not None and s.insecure:
        out.append("--pki and --insecure exclude each other ([server] pki, insecure): give one")
    elif s.pki is None and not s.insecure:
        out.append(
            "serve needs --pki DIR ([server] pki: HTTPS and MQTT over TLS with the tenant's "
            "certificates; see `addin-server pki init`) or, for a lab, --insecure "
            "([server] insecure = true: plain HTTP and MQTT)"
        )
    else:
        if values["agent_token"] is not None and not s.insecure:
            out.append(
                "--agent-token is accepted only with --insecure ([auth] agent_token needs "
                "insecure = true): agents use their device's token (`addin-server enroll`)"
            )
        if (cfg.broker.username or values["broker_password"]) and not s.insecure:
            out.append(
                "--broker-username/--broker-password ([broker] username, password) are for "
                "--insecure: with --pki the server logs in to the broker with its certificate "
                "(server-client.crt)"
            )
        if cfg.broker.url is None:
            out.append("--broker ([broker] url, ADDIN_SERVER_BROKER) is required")
        else:
            try:
                parse_broker_url(cfg.broker.url, tls=s.pki is not None)
            except ValueError as e:
                out.append(f"--broker {e}")
    if s.listen is not None:
        host, _, port = s.listen.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            out.append(f"--listen ([server] listen) {s.listen!r}: expected HOST:PORT")
    d = cfg.directory
    if d.bind_password_file is not None and not d.bind_password_file.is_file():
        out.append(f"[directory] bind_password_file: no file {d.bind_password_file}")
    return out

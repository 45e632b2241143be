"""Agent configuration: a TOML file, each field overridable by `ADDIN_AGENT_<FIELD>`.

Example ``agent.toml`` (what `addin-server enroll` writes, plus local choices)::

    tenant = "contoso"
    user_id = "ann"
    client_id = "ann-laptop"
    broker_url = "mqtts://broker.contoso.local"        # TLS; port 8883 by default
    server_url = "https://addins.contoso.local"
    server_token = "device-token"
    signing_key = "base64 Ed25519 public key"         # state messages must carry its signature
    tls_ca = "ca.crt"                                 # a path, or the PEM text inline
    tls_cert = "device.crt"
    tls_key = "device.key"
    cache_path = "/var/lib/addin-agent/cache.sqlite"
    hosts = ["Word", "Excel", "PowerPoint", "Outlook"]
    applier = "folder"                        # or "mac", "windows", "memory"
    applier_dir = "/var/lib/addin-agent/wef"
    control = "/run/addin-agent/agent.sock"   # a unix socket path, or "" to disable

Without ``insecure = true`` the broker must be ``mqtts://``, the server ``https://``, and
``signing_key`` and the three ``tls_*`` fields are required; ``insecure = true`` (a lab) allows
plain MQTT and HTTP and unsigned state.

Relative paths in the file (``cache_path``, ``applier_dir``, ``applier_root``, a ``control``
socket, the ``tls_*`` files) are taken from the file's folder; a leading ``~`` in any of them is
the user's home, wherever the value comes from, so the daemon and the helpdesk commands
find the same files whatever directory they start in; relative paths from the environment are
taken from the current one.
Every value is checked here, at load: a bad one is refused before anything starts, with the
field, where it came from and what to write instead.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import SplitResult, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from addin_core.protocol import Host, check_id, check_unreserved
from agent import pem
from agent.config_file import ENV_PREFIX as ENV_PREFIX  # re-exported: agent/config_file.py
from agent.config_file import MAX_SOCKET_PATH as MAX_SOCKET_PATH
from agent.config_file import PATH_FIELDS as PATH_FIELDS
from agent.config_file import TLS_FIELDS as TLS_FIELDS
from agent.config_file import ConfigError as ConfigError
from agent.config_file import parse_control as parse_control
from agent.config_file import read_file
from agent.hostwatch import default_processes

MQTT_PORT, MQTTS_PORT = 1883, 8883

SECURE_HOW = "use the agent.toml from `addin-server enroll`, or set insecure = true for a lab"
"""The end of every refusal of an insecure setting: the two ways out."""


def _split_url(value: str, schemes: tuple[str, ...], example: str) -> SplitResult:
    u = urlsplit(value)
    if u.scheme not in schemes or not u.netloc:
        missing = "" if "://" in value else " (the scheme is missing)"
        raise ValueError(f"{value!r} must look like {example}{missing}")
    if not u.hostname:
        raise ValueError(f"{value!r} names no host: write {example}")
    try:
        port = u.port
    except ValueError:
        port_text = u.netloc.rpartition(":")[2]
        raise ValueError(f"{value!r}: port {port_text!r} is not a number from 1 to 65535") from None
    if port == 0:
        raise ValueError(f"{value!r}: port 0 is not a number from 1 to 65535")
    if u.query or u.fragment:
        raise ValueError(f"{value!r} must not have a query or fragment: write {example}")
    if u.username is not None or u.password is not None:
        raise ValueError(f"{value!r}: put credentials in their own fields, not in the URL")
    return u


def default_applier(platform: str) -> Literal["memory", "mac", "windows"]:
    """The applier of an agent.toml that names none, on `platform` (`sys.platform`)."""
    if platform == "darwin":
        return "mac"
    if platform == "win32":
        return "windows"
    return "memory"


class AgentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant: str
    user_id: str
    client_id: str
    insecure: bool = False
    """Lab switch: allows mqtt:// and http:// and (without signing_key) unsigned state. The
    fields below are checked against it, so it comes before them."""
    broker_url: str = Field(default="mqtt://127.0.0.1:1883", validate_default=True)
    broker_username: str | None = None
    broker_password: str | None = Field(default=None, repr=False)
    server_url: str = Field(default="http://127.0.0.1:8080", validate_default=True)
    server_token: str | None = Field(default=None, repr=False)
    signing_key: str | None = Field(default=None, validate_default=True)
    """base64 of the server's raw Ed25519 public key: every state message must carry its
    signature. Required unless insecure."""
    tls_ca: str | None = Field(default=None, validate_default=True)
    """The CA that verifies the broker and the server: PEM text or a file path."""
    tls_cert: str | None = Field(default=None, validate_default=True)
    """This device's client certificate for the broker (CN = client_id)."""
    tls_key: str | None = Field(default=None, repr=False, validate_default=True)
    """Its private key (unencrypted PEM)."""
    cache_path: str = "addin-agent.sqlite"
    hosts: tuple[Host, ...] = tuple(Host)
    applier: Literal["memory", "folder", "mac", "windows"] = Field(
        default_factory=lambda: default_applier(sys.platform)
    )
    """Where add-ins are placed; by default where this platform's Office loads them (a
    bundle from `enroll` names none): `mac` on macOS, `windows` on Windows, and `memory`
    elsewhere (no Office on Linux: the `folder` applier is the lab's choice)."""
    """Where launches put add-ins (agent/appliers.py): ``folder`` ``<applier_dir>/<Host>/``;
    ``mac`` each host's ``wef`` folder under ``applier_root``; ``windows`` the per-user
    developer registry values, naming manifests kept in ``applier_dir`` (default: an
    ``addin-manifests`` folder next to the cache); ``memory`` nowhere (simulator)."""
    applier_dir: str | None = None
    applier_root: str | None = None
    """For ``mac``: the home folder holding ``Library/Containers`` (default ``~``)."""
    control: str | None = None
    """Local control endpoint: a unix socket path (a TCP endpoint is refused). None or empty
    disables it (the simulator runs thousands of agents)."""
    fetch_concurrency: int = Field(default=4, ge=1, le=64)
    manifest_mirrors: tuple[str, ...] = Field(default=(), max_length=8)
    """Base URLs of manifest mirrors (folders written by `addin-server manifests export`,
    served by any web server or CDN), tried in order before the server; each manifest is at
    ``<base>/<sha256>`` and is accepted only if it hashes to the catalog's sha256. https
    mirrors are verified with the system's CAs and the tenant's; http only when insecure."""
    session_expiry: int = Field(default=8 * 86400, ge=7 * 86400)
    """MQTT 5 session expiry in seconds; at least 7 days so a week offline loses nothing."""
    keepalive: int = Field(default=60, ge=5, le=3600)
    mqtt_version: Literal["auto", "5", "3.1.1"] = "auto"
    """MQTT 5, falling back to 3.1.1 when the broker refuses 5 (``auto``), or pinned; see
    addin_runtime/mqtt_version.py for what 3.1.1 loses."""
    mqtt_source_address: str | None = None
    """The local address the MQTT connection leaves from (an address of this machine);
    None: the system's choice. The simulator spreads its thousands of agents over several
    loopback addresses with it (simulator/sources.py)."""
    events_keep_days: float = Field(default=30.0, gt=0)
    """The cache's event log keeps this many days of history ..."""
    events_keep_rows: int = Field(default=10_000, ge=100)
    """... and at most this many rows (pruned at start and every 1,000 transitions or hour)."""
    metrics_file: str | None = None
    """A Prometheus text file for node_exporter's textfile collector (agent/metrics_file.py),
    e.g. /var/lib/node_exporter/textfile/addin-agent.prom; None: none written."""
    metrics_interval: float = Field(default=15.0, ge=1)
    """Seconds between rewrites of `metrics_file`."""
    anti_entropy_interval: float = Field(default=600.0, ge=0)
    """Seconds between anti-entropy checks against the server (jittered ±20 %); 0 disables
    them. See agent/antientropy.py."""
    watch_hosts: bool = True
    """Watch the host apps' processes (agent/hostwatch.py): ready changes are written to the
    add-in location while a host is not running and count as applied at its next start.
    On by default; the simulator turns it off (thousands of agents in one process, no Office)."""
    host_processes: dict[Host, tuple[str, ...]] = Field(default_factory=dict)
    """Process names per host app, e.g. {Word = ["WINWORD.EXE"]}; a host not given keeps the
    platform's default names (`agent.hostwatch.default_processes`)."""
    host_poll_interval: float = Field(default=1.0, ge=0.05, le=60)
    """Seconds between two looks at the process table."""

    @field_validator("mqtt_version", mode="before")
    @classmethod
    def _version_text(cls, v: object) -> object:
        # `mqtt_version = 5` in TOML is an integer; say the same thing as "5".
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("tenant")
    @classmethod
    def _safe_id(cls, v: str) -> str:
        return check_id(v)

    @field_validator("user_id", "client_id")
    @classmethod
    def _unreserved_id(cls, v: str) -> str:
        # A client id of the server's takes over its broker session: it would stop
        # publication for the whole tenant.
        return check_unreserved(v)

    @field_validator("mqtt_source_address")
    @classmethod
    def _source_address(cls, v: str | None) -> str | None:
        # A name here would only surface as "Name or service not known" about the broker.
        if v is not None:
            try:
                ipaddress.ip_address(v)
            except ValueError:
                raise ValueError(
                    f"{v!r} is not an IP address: give one of this machine's addresses, "
                    "e.g. 10.0.0.5, or leave mqtt_source_address out"
                ) from None
        return v

    @field_validator("broker_url")
    @classmethod
    def _broker(cls, v: str, info: ValidationInfo) -> str:
        u = _split_url(v, ("mqtts", "mqtt", "tcp"), "mqtts://HOST[:PORT] or mqtt://HOST:PORT")
        if u.path not in ("", "/"):
            raise ValueError(f"{v!r} must not have a path: write mqtts://HOST[:PORT]")
        if u.scheme != "mqtts" and _secure(info):
            raise ValueError(
                f"{v!r} is plain MQTT; without insecure = true the broker must be "
                f"mqtts://HOST[:PORT] (TLS, port {MQTTS_PORT} by default): {SECURE_HOW}"
            )
        return v

    @field_validator("server_url")
    @classmethod
    def _server(cls, v: str, info: ValidationInfo) -> str:
        u = _split_url(v, ("http", "https"), "https://HOST[:PORT] or http://HOST:PORT")
        if u.scheme != "https" and _secure(info):
            raise ValueError(
                f"{v!r} is plain HTTP; without insecure = true the server must be "
                f"https://HOST[:PORT]: {SECURE_HOW}"
            )
        return v

    @field_validator("manifest_mirrors")
    @classmethod
    def _mirrors(cls, v: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        for url in v:
            u = _split_url(url, ("http", "https"), "https://HOST[:PORT]/PATH")
            if u.scheme != "https" and _secure(info):
                raise ValueError(
                    f"{url!r} is plain HTTP; without insecure = true a mirror must be https"
                )
        return v

    @field_validator("signing_key")
    @classmethod
    def _signing_key(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None or not v.strip():
            if _secure(info):
                raise ValueError(
                    "missing; without insecure = true every state message must be signed, "
                    f"and this is the server's public key that checks it: {SECURE_HOW}"
                )
            return None
        pem.signing_key_bytes(v)
        return v.strip()

    @field_validator("tls_ca")
    @classmethod
    def _tls_ca(cls, v: str | None, info: ValidationInfo) -> str | None:
        if _tls_missing(v, info, "the CA certificate that verifies the broker and the server"):
            return None
        assert v is not None
        pem.certificates(v)
        return v

    @field_validator("tls_cert")
    @classmethod
    def _tls_cert(cls, v: str | None, info: ValidationInfo) -> str | None:
        if _tls_missing(v, info, "this device's certificate for the broker"):
            return None
        assert v is not None
        pem.certificates(v)
        return v

    @field_validator("tls_key")
    @classmethod
    def _tls_key(cls, v: str | None, info: ValidationInfo) -> str | None:
        if _tls_missing(v, info, "the private key of this device's certificate"):
            return None
        assert v is not None
        pem.private_key(v)
        return v

    @field_validator("cache_path")
    @classmethod
    def _cache_path(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("is empty: give a file path (or :memory:)")
        return v

    @field_validator("applier_dir", "applier_root")
    @classmethod
    def _home(cls, v: str | None) -> str | None:
        # A config written as "~/..." (or an ADDIN_AGENT_* variable) means the user's home,
        # not a folder named "~" in the current one.
        return os.path.expanduser(v) if v else v

    @field_validator("host_processes")
    @classmethod
    def _host_processes(cls, v: dict[Host, tuple[str, ...]]) -> dict[Host, tuple[str, ...]]:
        for host, names in v.items():
            if not names or any(not n.strip() for n in names):
                raise ValueError(
                    f"{host}: give at least one non-empty process name, "
                    f'e.g. {host} = ["{default_processes()[host][0]}"]'
                )
        return v

    @field_validator("control")
    @classmethod
    def _control(cls, v: str | None) -> str | None:
        if not v:
            return None
        parse_control(v)
        return v

    @model_validator(mode="after")
    def _consistent(self) -> AgentConfig:
        if self.applier == "folder" and not self.applier_dir:
            raise ValueError("applier = 'folder' needs applier_dir")
        if self.applier == "windows" and sys.platform != "win32":
            raise ValueError(
                "applier = 'windows' writes the Windows registry and works on Windows only: "
                "use 'mac' on a Mac, 'folder' elsewhere"
            )
        if self.applier == "windows" and not self.applier_dir and self.cache_path == ":memory:":
            raise ValueError(
                "applier = 'windows' with an in-memory cache needs applier_dir (where the "
                "manifests the registry names are kept)"
            )
        if self.broker_password is not None and not self.broker_username:
            raise ValueError("broker_password is set but broker_username is not")
        if (self.tls_cert is None) != (self.tls_key is None):
            given, other = ("tls_cert", "tls_key") if self.tls_cert else ("tls_key", "tls_cert")
            raise ValueError(f"{given} is set but {other} is not: a certificate needs its key")
        if self.tls_cert is not None and self.tls_key is not None:
            cert = pem.certificates(self.tls_cert)[0]
            if not pem.same_key(cert, pem.private_key(self.tls_key)):
                raise ValueError(
                    "tls_key is not the key of tls_cert: give the key that was issued with "
                    "this certificate"
                )
            cn = pem.common_name(cert)
            if cn != self.client_id:
                raise ValueError(
                    f"tls_cert is for device {cn!r} (its CN) but client_id is "
                    f"{self.client_id!r}: the broker takes the certificate's name as the "
                    "client id; set client_id to it, or use this device's own certificate"
                )
        return self

    def lab_gaps(self) -> list[str]:
        """What `insecure` leaves unprotected here, in words (for the start warning and
        `doctor`)."""
        return [
            *([f"broker {self.broker_url} without TLS"] if not self.broker_tls else []),
            *([f"server {self.server_url} without TLS"] if not self.server_tls else []),
            *(
                ["state messages accepted unsigned (no signing_key)"]
                if not self.signing_key
                else []
            ),
        ]

    def processes(self) -> dict[Host, tuple[str, ...]]:
        """The process names to watch, per configured host."""
        names = {**default_processes(), **self.host_processes}
        return {h: names[h] for h in self.hosts}

    @property
    def broker_tls(self) -> bool:
        """Whether the broker is reached over TLS (``mqtts://``)."""
        return urlsplit(self.broker_url).scheme == "mqtts"

    @property
    def server_tls(self) -> bool:
        return urlsplit(self.server_url).scheme == "https"

    @property
    def broker_host(self) -> str:
        return urlsplit(self.broker_url).hostname or "127.0.0.1"

    @property
    def broker_port(self) -> int:
        return urlsplit(self.broker_url).port or (MQTTS_PORT if self.broker_tls else MQTT_PORT)


def _secure(info: ValidationInfo) -> bool:
    """Whether the fields are checked for secure mode: `insecure` was read and is false.
    When `insecure` itself is invalid its own error is the one to read, so not."""
    return "insecure" in info.data and not info.data["insecure"]


def _tls_missing(v: str | None, info: ValidationInfo, what: str) -> bool:
    """True when the tls_* value is absent (allowed in insecure mode); raise in secure mode."""
    if v is not None and v.strip():
        return False
    if _secure(info):
        raise ValueError(f"missing; without insecure = true {what} is required: {SECURE_HOW}")
    return True


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in AgentConfig.model_fields:
        key = ENV_PREFIX + name.upper()
        if key in env:
            value: Any = env[key]
            if name == "hosts":
                value = [h.strip() for h in value.split(",") if h.strip()]
            elif name == "host_processes":
                value = _json_or_text(value)  # {"Word": ["WINWORD.EXE"]}
            out[name] = value
    return out


def _json_or_text(value: str) -> Any:
    """JSON when it parses (validation then says what is wrong with it), else the text."""
    try:
        return json.loads(value)
    except ValueError:
        return value


def _describe(err: Mapping[str, Any], sources: Mapping[str, str]) -> str:
    loc = [str(p) for p in err["loc"]]
    field = loc[0] if loc else ""
    where = field + "".join(f"[{p}]" for p in loc[1:])
    if field in sources:
        where += f" (from {sources[field]})"
    kind = err["type"]
    msg = str(err["msg"])
    if kind == "missing":
        msg = "missing; it is required"
    elif kind == "extra_forbidden":
        msg = "unknown field (packaging/agent.example.toml lists every field)"
    elif kind == "value_error":
        msg = msg.removeprefix("Value error, ")
    else:
        got = err.get("input")
        if isinstance(got, str | int | float | bool) and len(repr(got)) <= 60:
            msg += f" (got {got!r})"
    return f"{where}: {msg}" if where else msg


def load_config(
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> AgentConfig:
    """Read `path` (TOML, optional), then apply environment overrides, then `overrides`."""
    data: dict[str, Any] = {}
    where = "agent configuration"
    if path is not None:
        data = read_file(path)
        where = f"agent configuration in {Path(path)}"
    from_env = _from_env(os.environ if env is None else env)
    sources = {name: ENV_PREFIX + name.upper() for name in from_env}
    data.update(from_env)
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(
            [f"invalid {where}: {_describe(err, sources)}" for err in e.errors(include_url=False)]
        ) from None

"""Agent configuration: a TOML file, each field overridable by `ADDIN_AGENT_<FIELD>`.

Example ``agent.toml``::

    tenant = "contoso"
    user_id = "ann"
    client_id = "ann-laptop"
    broker_url = "mqtt://127.0.0.1:1883"
    server_url = "http://127.0.0.1:8080"
    server_token = "agent-secret"
    cache_path = "/var/lib/addin-agent/cache.sqlite"
    hosts = ["Word", "Excel", "PowerPoint", "Outlook"]
    applier = "folder"
    applier_dir = "/var/lib/addin-agent/wef"
    control = "127.0.0.1:8765"     # or a unix socket path, or "" to disable
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from addin_core.protocol import Host, check_id

ENV_PREFIX = "ADDIN_AGENT_"


class ConfigError(ValueError):
    """The configuration file or environment is unusable; the message says what to fix."""


class AgentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant: str
    user_id: str
    client_id: str
    broker_url: str = "mqtt://127.0.0.1:1883"
    broker_username: str | None = None
    broker_password: str | None = Field(default=None, repr=False)
    server_url: str = "http://127.0.0.1:8080"
    server_token: str | None = Field(default=None, repr=False)
    cache_path: str = "addin-agent.sqlite"
    hosts: tuple[Host, ...] = tuple(Host)
    applier: Literal["memory", "folder"] = "memory"
    applier_dir: str | None = None
    control: str | None = None
    """Local control endpoint: ``HOST:PORT`` (loopback only), a bare port, or a unix socket
    path. None or empty disables it (the simulator runs thousands of agents)."""
    fetch_concurrency: int = Field(default=4, ge=1, le=64)
    session_expiry: int = Field(default=8 * 86400, ge=7 * 86400)
    """MQTT 5 session expiry in seconds; at least 7 days so a week offline loses nothing."""
    keepalive: int = Field(default=60, ge=5, le=3600)
    events_keep_days: float = Field(default=30.0, gt=0)
    """The cache's event log keeps this many days of history ..."""
    events_keep_rows: int = Field(default=10_000, ge=100)
    """... and at most this many rows (pruned at start and every 1,000 transitions or hour)."""
    anti_entropy_interval: float = Field(default=600.0, ge=0)
    """Seconds between anti-entropy checks against the server (jittered ±20 %); 0 disables
    them. See agent/antientropy.py."""

    @field_validator("tenant", "user_id", "client_id")
    @classmethod
    def _safe_id(cls, v: str) -> str:
        return check_id(v)

    @field_validator("broker_url")
    @classmethod
    def _broker(cls, v: str) -> str:
        u = urlsplit(v)
        if u.scheme not in ("mqtt", "tcp") or not u.hostname:
            raise ValueError(f"broker_url {v!r} must look like mqtt://HOST:PORT")
        return v

    @field_validator("control")
    @classmethod
    def _control(cls, v: str | None) -> str | None:
        return v or None

    @property
    def broker_host(self) -> str:
        return urlsplit(self.broker_url).hostname or "127.0.0.1"

    @property
    def broker_port(self) -> int:
        return urlsplit(self.broker_url).port or 1883

    def model_post_init(self, __context: Any) -> None:
        if self.applier == "folder" and not self.applier_dir:
            raise ValueError("applier = 'folder' needs applier_dir")


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in AgentConfig.model_fields:
        key = ENV_PREFIX + name.upper()
        if key in env:
            value: Any = env[key]
            if name == "hosts":
                value = [h.strip() for h in value.split(",") if h.strip()]
            out[name] = value
    return out


def load_config(
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> AgentConfig:
    """Read `path` (TOML, optional), then apply environment overrides, then `overrides`."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"config file {p} does not exist") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {p} is not valid TOML: {e}") from e
        except IsADirectoryError as e:
            raise ConfigError(f"config file {p} is a directory; give the agent.toml in it") from e
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read config file {p}: {getattr(e, 'strerror', e)}") from e
    data.update(_from_env(os.environ if env is None else env))
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}"
            for err in e.errors(include_url=False)
        )
        raise ConfigError(f"invalid agent configuration: {problems}") from e

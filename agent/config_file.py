"""Reading an agent.toml before validation: the file and environment layers of
`agent.config.load_config`, the errors it raises, and the checks that need no model. The
read-only commands (`status`, `list`, `why`) and `launch` take the one or two fields they need
from here (`read_fields`): validating the whole config costs pydantic and cryptography, several
times what those commands do. `agent.config` re-exports every name here."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ENV_PREFIX = "ADDIN_AGENT_"

MAX_SOCKET_PATH = 107
"""Bytes of a unix socket path (``sun_path`` is 108 on Linux, including the NUL); a longer
one cannot be bound, and the kernel's error does not say why."""

PATH_FIELDS = ("cache_path", "applier_dir", "applier_root", "metrics_file")
"""Fields holding a file or folder; ``control`` too when it names a socket, and the
`TLS_FIELDS` when they are not inline PEM."""

TLS_FIELDS = ("tls_ca", "tls_cert", "tls_key")


class ConfigError(ValueError):
    """The configuration file or environment is unusable. `problems` holds one line per
    bad field, each naming the field and what to write instead."""

    def __init__(self, problems: str | list[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


PEM_BEGIN = "-----BEGIN"


def is_inline(value: str) -> bool:
    """Whether a tls_* value is PEM text rather than a file path."""
    return value.lstrip().startswith(PEM_BEGIN)


def parse_control(spec: str) -> str:
    """The unix socket path of the control endpoint (``"agent.sock"``,
    ``"/run/addin-agent/agent.sock"``). A TCP endpoint (``"8765"``, ``"127.0.0.1:8765"``) is
    refused: any local user, or a process that took the port first, could talk to it as the
    daemon; a socket is owned by the user and checks its peer. Raises ValueError with what to
    write instead."""
    # A Windows path (C:\...\agent.sock, where the control file holds a port and a token:
    # agent/control_windows.py) has a colon too, but never without a separator.
    if spec.isdigit() or ("/" not in spec and "\\" not in spec and ":" in spec):
        raise ValueError(
            f"{spec!r} is a TCP endpoint; the control endpoint is a unix socket only: "
            'give a socket path, e.g. control = "/run/addin-agent/agent.sock"'
        )
    if len(os.fsencode(spec)) > MAX_SOCKET_PATH:
        raise ValueError(
            f"socket path {spec!r} is {len(os.fsencode(spec))} bytes; a unix socket path "
            f"holds at most {MAX_SOCKET_PATH}: use a shorter path"
        )
    return spec


def _relative_to(base: Path, data: dict[str, Any]) -> None:
    """Make the file's relative paths relative to its folder (in place)."""
    for name in (*PATH_FIELDS, "control", *TLS_FIELDS):
        value = data.get(name)
        if not isinstance(value, str) or not value or value in (":memory:", ":none:"):
            continue
        if name in TLS_FIELDS and is_inline(value):
            continue
        if name == "control":
            try:
                parse_control(value)
            except ValueError:
                continue  # validation names the problem
        path = Path(value).expanduser()
        # A "~/..." path is kept expanded: before, it was left as written ("absolute" once
        # expanded) and the daemon made a folder literally named "~".
        data[name] = str(path if path.is_absolute() else base / path)


def read_file(path: str | Path) -> dict[str, Any]:
    """The TOML of the agent.toml at `path`, relative paths taken from its folder;
    ConfigError (one line) when it cannot be read or is not TOML."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {p} is a directory; give the agent.toml in it") from None
    except OSError as e:
        raise ConfigError(f"config file {p} cannot be read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p} is not UTF-8 text: {e.reason}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {p} is not valid TOML: {e}") from None
    _relative_to(p.absolute().parent, data)
    return data


def read_fields(
    path: str | Path | None, names: tuple[str, ...], env: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """`names` as `agent.config.load_config` would take them (file, then environment),
    without validating the rest: what the read-only commands need to find the cache and the
    control socket without importing pydantic and cryptography. Values are unchecked: a
    caller falls back to `load_config` (and its error) for one it cannot use."""
    data = read_file(path) if path is not None else {}
    env = os.environ if env is None else env
    for name in names:
        key = ENV_PREFIX + name.upper()
        if key in env:
            data[name] = env[key]
    return {n: data[n] for n in names if n in data}

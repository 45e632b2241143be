"""What every `addin-agent` command shares: the config and cache options (accepted before
or after the subcommand), the context that loads them, and the output conventions (rich
tables of plain text, ``--json``, one error line).

rich is imported at its first use, not with this module: importing it costs ~30 ms, a third of
what `why` may take as a whole process, and `why` prints its lines with click alone."""

from __future__ import annotations

import functools
import json
import os
import time
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, cast

import click

from addin_core.display import printable
from addin_core.topics import Host
from addin_runtime.cli_support import error, shared_option, shared_value
from agent.config_file import ConfigError, parse_control, read_fields

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from agent.config import AgentConfig
    from agent.readmodel import ReadModel


class _ConsoleAtFirstUse:
    """rich's Console, made (and rich imported) when something is first printed with it."""

    _console: Console | None = None

    def __getattr__(self, name: str) -> Any:
        if _ConsoleAtFirstUse._console is None:
            from rich.console import Console

            # No automatic highlighting of numbers and quotes: the text is ours or escaped,
            # and the highlighter's regexes cost every command ~5 ms to compile.
            _ConsoleAtFirstUse._console = Console(highlight=False)
        return getattr(_ConsoleAtFirstUse._console, name)


console = cast("Console", _ConsoleAtFirstUse())


def shown(text: object) -> str:
    """`text` (a name, reason or message from a manifest or the network) ready for a console
    markup string: control and bidi characters made visible, markup characters escaped."""
    from rich.markup import escape

    return escape(printable(str(text)))


def plain_table(**kw: Any) -> Table:
    """A rich Table whose string cells are plain text, never console markup: names, reasons
    and query results come from manifests and the network ("[/bold]" in a DisplayName used
    to crash `list`, and "[link=...]" could dress up a link in a helpdesk terminal). Control
    and bidi characters are shown as escapes, never sent raw to the terminal."""
    return _plain_table_class()(**kw)


@functools.cache
def _plain_table_class() -> type[Table]:
    from rich.table import Table
    from rich.text import Text

    class PlainTable(Table):
        def add_row(self, *renderables: Any, **kw: Any) -> None:
            super().add_row(
                *(Text(printable(r)) if isinstance(r, str) else r for r in renderables), **kw
            )

    return PlainTable


def text_table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A table of plain-text rows drawn with click alone: a bold header, a rule, columns
    aligned by display width (wide characters count two), every cell through `printable`.

    The read commands run as whole processes within ~100 ms (docs/benchmarks.md "Helpdesk
    commands"): importing rich costs ~30 ms of that and laying out 200 rows with it ~40 ms
    more, so `list`, `status` and `launch` draw their tables here. Rows longer than the
    terminal wrap as the terminal wraps them."""
    cells = [[printable(str(v)) for v in row] for row in rows]
    widths = [
        max([display_width(c)] + [display_width(r[i]) for r in cells])
        for i, c in enumerate(columns)
    ]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v + " " * (w - display_width(v)) for v, w in zip(values, widths, strict=True)
        ).rstrip()

    out = [click.style(title, bold=True)] if title else []
    out.append(click.style(line(columns), bold=True))
    out.append("  ".join("─" * w for w in widths))
    out.extend(line(r) for r in cells)
    return "\n".join(out)


def display_width(text: str) -> int:
    if text.isascii():
        return len(text)
    return sum(
        0
        if unicodedata.combining(ch)
        else 2
        if unicodedata.east_asian_width(ch) in ("W", "F")
        else 1
        for ch in text
    )


HOST_CHOICE = click.Choice([h.value for h in Host], case_sensitive=False)


def parse_host(value: str | None) -> Host | None:
    if value is None:
        return None
    for h in Host:
        if h.value.lower() == value.lower():
            return h
    raise click.BadParameter(f"unknown host {value!r}")


def fail(message: str, code: int = 1) -> NoReturn:
    error(message, code)


def emit_json(data: Any) -> None:
    # ensure_ascii (the default) writes every control and bidi character as a \\u escape.
    click.echo(json.dumps(data, indent=2, default=str))


def when(t: float | None) -> str:
    if not t:
        return "—"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(t)))


CONFIG_ENV = "ADDIN_AGENT_CONFIG"


def default_config_paths() -> list[Path]:
    """Where the agent looks for its config when neither --config nor ADDIN_AGENT_CONFIG
    names one, in order: the user's own (``~/.config/addin-agent`` on Linux, ``~/Library/
    Application Support/addin-agent`` on macOS, ``%LOCALAPPDATA%\\addin-agent`` on Windows:
    where `addin-agent service install` puts it), then the machine's (a system unit's
    /var/lib/addin-agent, then /etc/addin-agent). The user's comes first: on a shared machine
    each user's commands read their own agent, never a machine-wide one by accident."""
    from agent.service import SYSTEM_STATE, user_state_dir

    return [
        user_state_dir() / "agent.toml",
        SYSTEM_STATE / "agent.toml",
        Path("/etc/addin-agent/agent.toml"),
    ]


class Ctx:
    def __init__(self) -> None:
        self._config: AgentConfig | None = None

    @property
    def config_path(self) -> str | None:
        given = shared_value("config") or os.environ.get(CONFIG_ENV)
        if given:
            return str(given)
        for p in default_config_paths():
            if p.is_file():
                return str(p)
        return None

    @property
    def cache_override(self) -> str | None:
        value = shared_value("cache")
        return str(value) if value else None

    def config(self) -> AgentConfig:
        if self._config is None:
            path = self.config_path
            if path is None and not os.environ.get("ADDIN_AGENT_TENANT"):
                fail(
                    "no agent config: pass --config FILE or set ADDIN_AGENT_CONFIG; "
                    "looked for " + ", ".join(str(p) for p in default_config_paths())
                )
            from agent.config import load_config  # pydantic and cryptography: ~100 ms

            try:
                self._config = load_config(path)
            except ConfigError as e:
                fail(str(e))
        return self._config

    def _field(self, name: str) -> str | None:
        """One field of the config as `load_config` would read it, without validating the
        rest (see agent/config_file.py); None when it is not a usable string here, and the
        caller then loads the whole config (whose error, if any, ends the command)."""
        if self._config is not None:
            return None
        path = self.config_path
        if path is None and not os.environ.get("ADDIN_AGENT_TENANT"):
            return None
        try:
            value = read_fields(path, (name,)).get(name)
        except ConfigError:
            return None
        return value if isinstance(value, str) and value.strip() else None

    def cache_path(self) -> str:
        if self.cache_override:
            return self.cache_override
        return self._field("cache_path") or self.config().cache_path

    def control_endpoint(self) -> str | None:
        """The daemon's control endpoint, read without validating the whole config (a launch
        hook's one call); None when the config names none or names it badly."""
        control = self._field("control")
        if control is None:
            return self._config.control if self._config is not None else None
        try:
            return parse_control(control)
        except ValueError:
            return None

    def read(self) -> ReadModel:
        """The cache, read-only; a missing or foreign file ends the command with one line."""
        # Here, not at the top: `launch` through the daemon never reads the cache.
        from agent.cache_read import CacheError, open_readonly
        from agent.readmodel import ReadModel

        try:
            return ReadModel(open_readonly(self.cache_path()))
        except CacheError as e:
            fail(str(e))


def config_options(f: Any) -> Any:
    """--config and --cache: accepted before the subcommand (``addin-agent --config X status``)
    and after it (``addin-agent status --config X``); the one after wins."""
    f = shared_option(
        "--config",
        key="config",
        type=click.Path(),
        help=f"Agent TOML config [env {CONFIG_ENV}; default agent.toml in the user's agent "
        "folder, then /var/lib/addin-agent, then /etc/addin-agent].",
    )(f)
    return shared_option(
        "--cache", key="cache", help="Cache file to read (overrides the config's cache_path)."
    )(f)


def pass_ctx(f: Any) -> Any:
    return config_options(click.make_pass_decorator(Ctx, ensure=True)(f))

"""What `addin-agent` and `addin-server` share on the command line: one style for errors
and options accepted both before and after the subcommand name.

Errors: one line, ``error: <what>``, on stderr; exit status 1 for a refusal or failure and 2
for a usage mistake (unknown option or command, missing argument), click's own suggestions
("Did you mean '--db'?") included. Click's default prints the usage block and ``Error:``.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NoReturn, TypeVar

import click
from click.core import ParameterSource

from addin_core.display import printable

F = TypeVar("F", bound=Callable[..., Any])


def error(message: str, code: int = 1) -> NoReturn:
    """Print ``error: line`` on stderr for each line of `message` (a bad config names each bad
    field on its own line), unwrapped whatever the terminal's width, and exit."""
    for line in message.splitlines() or [message]:
        # The message may quote a name from a manifest: no raw control or bidi characters.
        click.echo(click.style("error:", fg="red") + " " + printable(line), err=True)
    sys.exit(code)


class Group(click.Group):
    """The top-level group of a tool: click's errors in the one-line style.

    `lazy` names subcommands by ``"module:attribute"``, imported only when that subcommand
    runs (or `--help` lists them all): the helpdesk commands answer in ~100 ms, and importing
    every command module costs a tenth of that (docs/benchmarks.md "Helpdesk commands")."""

    def __init__(self, *args: Any, lazy: Mapping[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        try:
            return super().resolve_command(ctx, args)
        except click.exceptions.NoSuchCommand as e:
            # click suggests from the commands loaded so far: the lazy ones count too.
            raise click.exceptions.NoSuchCommand(
                e.command_name, possibilities=self.list_commands(ctx), ctx=ctx
            ) from None

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy and cmd_name not in self.commands:
            module, _, attribute = self.lazy[cmd_name].partition(":")
            self.add_command(getattr(importlib.import_module(module), attribute), cmd_name)
        return super().get_command(ctx, cmd_name)

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except click.UsageError as e:
            where = f" (see {e.ctx.command_path} --help)" if e.ctx is not None else ""
            error(e.format_message() + where, e.exit_code)
        except click.ClickException as e:
            error(e.format_message(), e.exit_code)
        except (click.Abort, KeyboardInterrupt):
            error("interrupted", 130)
        sys.exit(rv if isinstance(rv, int) else 0)


def shared_option(*decls: str, key: str, **attrs: Any) -> Callable[[F], F]:
    """An option a tool accepts on its group and on its subcommands (``tool --db X cmd`` and
    ``tool cmd --db X``); the value given nearest the subcommand wins. Read it with
    `shared_value`. Defaults and environment variables are the caller's business, so that
    an environment value never beats one typed on the command line."""

    def remember(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is not None and ctx.get_parameter_source(param.name or "") in (
            ParameterSource.COMMANDLINE,
            ParameterSource.PROMPT,
        ):
            # Groups are parsed before their subcommands, so the innermost value is last.
            ctx.meta[key] = value
        return value

    return click.option(*decls, callback=remember, expose_value=False, default=None, **attrs)


def shared_value(key: str) -> Any:
    """The value of a `shared_option` given anywhere on this command line, or None."""
    ctx = click.get_current_context(silent=True)
    return None if ctx is None else ctx.meta.get(key)


def close_matches(word: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """What a typo of `word` may have meant (case-insensitive): the closest candidate, and
    others only if about as close."""
    by_lower: dict[str, str] = {}
    for c in candidates:
        by_lower.setdefault(c.lower(), c)
    low = word.lower()
    found = difflib.get_close_matches(low, list(by_lower), n=n, cutoff=0.6)
    if not found:
        return []
    best = difflib.SequenceMatcher(None, low, found[0]).ratio()
    return [
        by_lower[f] for f in found if difflib.SequenceMatcher(None, low, f).ratio() >= best - 0.05
    ]


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """``"; did you mean 'x' or 'y'?"`` or ``""``."""
    found = close_matches(word, candidates)
    if not found:
        return ""
    return "; did you mean " + " or ".join(repr(f) for f in found) + "?"

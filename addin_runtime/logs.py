"""Logging setup of the three programs: ``--log-format text|json`` (env ``ADDIN_LOG_FORMAT``).

- ``json``: one JSON object per line and per event, for a log shipper: ``ts`` (UTC, ISO 8601),
  ``level``, ``logger``, ``program``, ``message``, and the context the event carries among
  ``revision``, ``addin``, ``user``, ``device``, ``host``, ``operation``, ``topic``
  (passed as ``log.info(..., extra=context(revision=R, addin=A))``); ``error`` holds a
  traceback when there is one.
- ``text``: a line for a person. Under systemd (``JOURNAL_STREAM`` is set) the line goes to
  stdout without a timestamp (the journal stamps it) and starts with the ``<N>`` syslog
  level prefix journald reads, so ``journalctl -p warning`` filters it.

The format chosen is put in the environment, so the processes a program starts (the
simulator's server and workers) log alike.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO, TypeVar

import click

FORMAT_ENV = "ADDIN_LOG_FORMAT"
FORMATS = ("text", "json")
CONTEXT_FIELDS = ("revision", "addin", "user", "device", "host", "operation", "topic")

F = TypeVar("F", bound=Callable[..., Any])

_SYSLOG_LEVEL = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


def context(**fields: Any) -> dict[str, Any]:
    """The ``extra`` of a log call: the known context fields that are not None."""
    unknown = set(fields) - set(CONTEXT_FIELDS)
    if unknown:
        raise ValueError(f"unknown log context field(s): {', '.join(sorted(unknown))}")
    return {k: v for k, v in fields.items() if v is not None}


class JsonFormatter(logging.Formatter):
    def __init__(self, program: str) -> None:
        super().__init__()
        self.program = program

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "program": self.program,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                out[name] = value if isinstance(value, int | float | bool) else str(value)
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        # One line whatever the message holds: json.dumps escapes newlines.
        return json.dumps(out, ensure_ascii=False)


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_SYSLOG_LEVEL.get(record.levelno, 6)}>"
        return prefix + super().format(record).replace("\n", "\n" + prefix)


def under_journald() -> bool:
    return bool(os.environ.get("JOURNAL_STREAM"))


def setup_logging(program: str, log_format: str, level: int = logging.INFO) -> None:
    """Configure the root logger once for `program` (addin-server, addin-agent, addin-sim)."""
    if log_format not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}")
    os.environ[FORMAT_ENV] = log_format
    stream: TextIO = sys.stdout if under_journald() else sys.stderr
    handler = logging.StreamHandler(stream)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(program))
    elif under_journald():
        handler.setFormatter(_JournalFormatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def log_format_option(f: F) -> F:
    """``--log-format text|json`` [env ADDIN_LOG_FORMAT], default text."""
    return click.option(
        "--log-format",
        envvar=FORMAT_ENV,
        type=click.Choice(FORMATS),
        default="text",
        show_default=True,
        help=f"Log lines for a person (text) or one JSON object per line (json) [env {FORMAT_ENV}].",
    )(f)

"""Refused operations and the input checks every service module shares.

An `OperationError` carries the HTTP status the API answers with and a message that says
what to do; the CLI prints the message as its one ``error:`` line. A refused operation
changes nothing: it is raised inside the unit of work, which then rolls back.
"""

from __future__ import annotations

from typing import Any

from addin_core.protocol import InvalidTopic, Mode, check_id, check_unreserved


class OperationError(Exception):
    """A refused operation. `status` is the HTTP status the API answers with."""

    status = 400

    def __init__(self, message: str, findings: list[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.findings = findings or []


class BadRequest(OperationError):
    status = 400


class NotFound(OperationError):
    status = 404


class Conflict(OperationError):
    status = 409


class InvalidManifest(OperationError):
    status = 422


def checked_id(value: Any, what: str) -> str:
    """`value` as a topic-safe id, or BadRequest saying why not."""
    try:
        return check_id(value, what)
    except InvalidTopic as e:
        raise BadRequest(str(e)) from None


def checked_user_id(value: Any) -> str:
    """`value` as a user id: topic-safe and not one of the server's own identities."""
    try:
        return check_unreserved(value, "user id")
    except InvalidTopic as e:
        raise BadRequest(str(e)) from None


def parse_mode(value: Any) -> Mode:
    try:
        return Mode(value)
    except ValueError:
        raise BadRequest(
            f"invalid mode {value!r}: use one of {', '.join(m.value for m in Mode)}"
        ) from None

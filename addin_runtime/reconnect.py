"""Reconnect policy shared by the agent's transport and the server's publisher.

`Backoff`: exponential delays with jitter, where only a connection that stayed up for
`stable_after` seconds counts as recovery. Resetting on every successful CONNECT let two
clients with one client id knock each other off the broker about once a second for as long
as they ran (the broker accepts each CONNECT, then hands the session to the other one).

`reason_code`: the MQTT 5 reason code behind a lost connection, read from the exception
chain the MQTT client raised (duck-typed: any ``rc`` attribute, as aiomqtt's
``MqttCodeError`` carries paho's ``ReasonCode``).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Literal

from addin_runtime.mqtt import disconnected_future

SESSION_TAKEN_OVER = 0x8E
"""MQTT 5 DISCONNECT reason: another client connected with the same client id."""
UNSPECIFIED = 0x80
"""The reason paho reports for a connection closed without a DISCONNECT packet."""
FLAPPING_AFTER = 3
"""Connections in a row, each accepted and then closed by the broker before it was stable,
without a reason, before a loss is called a probable client id clash."""

LossKind = Literal["disconnected", "session_taken_over", "connection_flapping"]


class Backoff:
    def __init__(
        self,
        initial: float,
        maximum: float,
        *,
        stable_after: float = 30.0,
        uniform: Callable[[float, float], float] = random.uniform,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.initial, self.maximum, self.stable_after = initial, maximum, stable_after
        self._uniform, self._clock = uniform, clock
        self.failures = 0
        """Failures since the last connection that lasted `stable_after` seconds."""
        self._up_since: float | None = None
        self.last_uptime: float | None = None
        """How long the connection that just ended had lasted; None if the attempt failed."""

    def connected(self) -> None:
        self._up_since = self._clock()

    def failed(self) -> float:
        """A connection attempt failed or a connection ended: the delay before the next."""
        up = None if self._up_since is None else self._clock() - self._up_since
        self.last_uptime, self._up_since = up, None
        if up is not None and up >= self.stable_after:
            self.failures = 0
        self.failures += 1
        cap = min(self.maximum, self.initial * 2 ** min(self.failures, 30))
        return self._uniform(min(self.initial / 2, cap), cap)


class LossClassifier:
    """What a lost connection most likely was. ``session_taken_over``: the broker said
    another client connected with our id (reason 0x8E). ``connection_flapping``: it keeps
    closing our connection right after accepting it without saying why — what two clients
    with one id look like on a broker that does not send 0x8E (Mosquitto before 2.0.15).
    Else ``disconnected``."""

    def __init__(self, stable_after: float, flapping_after: int = FLAPPING_AFTER) -> None:
        self.stable_after, self.flapping_after = stable_after, flapping_after
        self.short_drops = 0
        """Connections in a row the broker accepted and then closed without a reason."""

    def classify(self, code: int | None, uptime: float | None) -> LossKind:
        """`uptime`: how long the lost connection had lasted, None if it never came up."""
        dropped = uptime is not None and uptime < self.stable_after and code in (None, UNSPECIFIED)
        self.short_drops = self.short_drops + 1 if dropped else 0
        if code == SESSION_TAKEN_OVER:
            return "session_taken_over"
        if self.short_drops >= self.flapping_after:
            return "connection_flapping"
        return "disconnected"


def flapping_text(client_id: str, uptime: float, times: int) -> str:
    return (
        f"the broker closed our connection {uptime:.1f}s after accepting it, {times} times in "
        f"a row, without a reason: probably another client uses our client id {client_id!r}"
    )


def reason_code(exc: BaseException | None) -> int | None:
    """The MQTT reason code in `exc` or its causes, if any carries one."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        rc = getattr(exc, "rc", None)
        if rc is not None:
            value = getattr(rc, "value", rc)
            if isinstance(value, int):
                return value
        exc = exc.__cause__ or exc.__context__
    return None


def disconnect_code(exc: BaseException | None, client: object | None = None) -> int | None:
    """The reason code of a lost connection: what aiomqtt recorded on `client` when the
    broker disconnected it (its message iterator, or a publish cut short, raises a fresh
    error that does not carry it), else whatever `exc` carries."""
    gone = disconnected_future(client)
    if gone is not None and gone.done() and not gone.cancelled():
        code = reason_code(gone.exception())
        if code is not None:
            return code
    return reason_code(exc)


def taken_over_text(client_id: str) -> str:
    """The log line's words for reason 0x8E, for a helpdesk reader."""
    return (
        f"another client connected with our client id {client_id!r} and the broker "
        "disconnected us (MQTT reason 0x8E, session taken over): two processes share this "
        "client id"
    )

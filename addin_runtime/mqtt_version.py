"""Which MQTT protocol version to speak: 5 where the broker has it, 3.1.1 where it has not.

The agent and the server prefer MQTT 5; a broker that speaks only 3.1.1 (NATS's MQTT
gateway, older Mosquitto or appliances) refuses an MQTT 5 CONNECT with CONNACK
"unacceptable protocol version" (3.1.1 return code 1, MQTT 5 reason 0x84). With
``mqtt_version = "auto"`` (the default) that refusal switches the client to 3.1.1 for the
rest of the process; ``"5"`` and ``"3.1.1"`` pin the version.

What each MQTT 5 feature the programs use becomes under 3.1.1:

- Session expiry (7+ days): a persistent session through ``clean_session = false``; it
  lasts as long as the broker keeps it (Mosquitto's ``persistent_client_expiration``,
  NATS: until a clean connect), not a period the client chooses.
- Clean start on an agent's first connect: ``clean_session = true`` on that connect; 3.1.1
  also deletes that first session when the connection ends, so what is published between
  the first and the second connection reaches the agent as retained state on its
  re-subscription (every state topic is retained) rather than from the session's queue.
- Retain handling 0 on subscribe: 3.1.1 always sends retained messages on subscribe.
- The "session taken over" reason (0x8E) on a DISCONNECT: 3.1.1 has no reason codes; the
  loss classifier still spots a client id clash from a connection closed right after it
  was accepted (``connection_flapping``), only later.
- No user properties, subscription identifiers or message expiry are used, so none is lost.
"""

from __future__ import annotations

from typing import Literal

import aiomqtt
from aiomqtt.exceptions import MqttConnectError

MqttVersion = Literal["auto", "5", "3.1.1"]
MQTT_VERSIONS: tuple[MqttVersion, ...] = ("auto", "5", "3.1.1")

_UNSUPPORTED_VERSION = {1, 0x84}
"""CONNACK refusals meaning "unacceptable protocol version": 3.1.1's return code 1 and
MQTT 5's reason 0x84 (paho maps the first onto the second's words)."""


def parse_mqtt_version(value: str) -> MqttVersion:
    """`value` as an `MqttVersion`; ValueError saying what to write."""
    for v in MQTT_VERSIONS:
        if value == v:
            return v
    raise ValueError(f"mqtt_version {value!r} must be one of: auto, 5, 3.1.1")


def refused_version(error: BaseException) -> bool:
    """Whether `error` is a broker's CONNACK refusing the protocol version."""
    if not isinstance(error, MqttConnectError):
        return False
    rc = error.rc
    code = getattr(rc, "value", rc)
    if isinstance(code, int) and code in _UNSUPPORTED_VERSION:
        return True
    return "protocol version" in str(rc).lower()


class VersionChoice:
    """The version of the next connect attempt: MQTT 5 until a broker refuses it (in
    ``auto``), or the pinned one."""

    def __init__(self, setting: MqttVersion) -> None:
        self.setting = setting
        self.v311 = setting == "3.1.1"

    @property
    def protocol(self) -> aiomqtt.ProtocolVersion:
        return aiomqtt.ProtocolVersion.V311 if self.v311 else aiomqtt.ProtocolVersion.V5

    @property
    def name(self) -> str:
        return "3.1.1" if self.v311 else "5"

    def fall_back(self, error: BaseException) -> bool:
        """True, and 3.1.1 from now on, when `error` is a refusal of MQTT 5 in ``auto``."""
        if self.setting == "auto" and not self.v311 and refused_version(error):
            self.v311 = True
            return True
        return False

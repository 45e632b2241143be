"""Loopback source addresses for the simulator's many MQTT connections.

paho (and aiomqtt, which connects through it) binds every socket before connecting, to
``("", 0)`` unless told otherwise. Such a socket takes a port of the ephemeral range for
itself on every address, and a port that a closed connection left in TIME_WAIT is not free
again for a minute. One machine's 19,000 agents, the fan-outs' 19,000 subscribers and the
previous run's closed connections need more than the 28,232 ports of Linux's default range
(32768-60999): a connect failed with EADDRINUSE (bench/bench_growth.py at 19,000 clients).
Bound to one of several loopback addresses, each address has a port range of its own.
"""

from __future__ import annotations

import ipaddress
import zlib

SPREAD = 8
"""Loopback addresses the connections are spread over: 8 x 28,232 ports."""


def source_address(key: str | int, broker_host: str) -> str | None:
    """The local address connection `key` (a client id or an index) leaves from when the
    broker is on this machine's loopback (all of 127.0.0.0/8 is local on Linux); None
    otherwise (another host, or the namespaces of --netns): the system's choice."""
    try:
        if not ipaddress.ip_address(broker_host).is_loopback or ":" in broker_host:
            return None
    except ValueError:  # a host name
        return None
    n = key if isinstance(key, int) else zlib.crc32(key.encode())
    return f"127.0.{100 + n % SPREAD}.1"

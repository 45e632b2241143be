"""Network namespaces for the simulator's workers (`addin-sim run --netns N`), root only.

Each namespace gets one veth pair: ``10.X.i.2/30`` inside (its only route: the default, via
the host end), ``10.X.i.1/30`` on the host end. The broker and the server listen on the
first host end, ``10.X.0.1``, which every namespace reaches through its own pair (the host
answers for all its addresses on any interface). So a worker in a namespace has no loopback
path to them: nothing in the agents or the simulator may assume it runs on the broker's host.

`X` is picked so no address of this machine is in ``10.X.0.0/16``. Namespaces and host ends
are named after the run, made by `create` and removed by `remove` (which the simulator
calls on every exit, failed or not; removing a namespace removes its veth pair).
"""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Sequence
from urllib.parse import urlsplit


class NetnsError(RuntimeError):
    """Not root, `ip` missing, or a command failed; says which."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise NetnsError("`ip` (iproute2) is not installed") from None
    if check and done.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done


def on_loopback(url: str) -> bool:
    """Whether `url` names a loopback host, which no namespace reaches."""
    host = urlsplit(url).hostname or ""
    return host == "localhost" or host.startswith("127.") or host == "::1"


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    try:
        _ip("netns", "list")
    except NetnsError as e:
        return str(e)
    return None


def _free_second_octet() -> int:
    used = _ip("-o", "-4", "addr", "show").stdout
    candidates = [x for x in range(200, 250) if f" 10.{x}." not in used]
    if not candidates:
        raise NetnsError("no free 10.X.0.0/16 range for the namespaces' veth pairs")
    return random.SystemRandom().choice(candidates)


class Namespaces:
    """`count` namespaces for run `tag`."""

    def __init__(self, count: int, tag: str) -> None:
        if not 1 <= count <= 64:
            raise NetnsError("--netns takes 1 to 64 namespaces")
        self.count = count
        self.tag = "".join(c for c in tag if c.isalnum())[:6] or "run"
        self.octet = 0
        self.made: list[str] = []
        self.host_ends: list[str] = []

    def name(self, i: int) -> str:
        return f"addinsim-{self.tag}-{i}"

    @property
    def hub(self) -> str:
        """The address broker and server listen on, reachable from every namespace."""
        return f"10.{self.octet}.0.1"

    def create(self) -> None:
        """Make every namespace and its veth pair; on a failure, remove what was made."""
        why = unavailable()
        if why is not None:
            raise NetnsError(why)
        self.octet = _free_second_octet()
        try:
            for i in range(self.count):
                self._create_one(i)
        except BaseException:
            self.remove()
            raise

    def _create_one(self, i: int) -> None:
        ns = self.name(i)
        host_end, inner = f"as{self.tag}h{i}", f"as{self.tag}n{i}"  # at most 15 characters
        _ip("netns", "add", ns)
        self.made.append(ns)
        _ip("link", "add", host_end, "type", "veth", "peer", "name", inner)
        self.host_ends.append(host_end)
        _ip("link", "set", inner, "netns", ns)
        _ip("addr", "add", f"10.{self.octet}.{i}.1/30", "dev", host_end)
        _ip("link", "set", host_end, "up")
        _ip("-n", ns, "addr", "add", f"10.{self.octet}.{i}.2/30", "dev", inner)
        _ip("-n", ns, "link", "set", inner, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "route", "add", "default", "via", f"10.{self.octet}.{i}.1")

    def command(self, i: int, argv: Sequence[str]) -> list[str]:
        """`argv` run inside namespace ``i % count``."""
        return ["ip", "netns", "exec", self.name(i % self.count), *argv]

    def remove(self) -> None:
        """Remove every namespace and host end made; never raises (it runs on the way out)."""
        for ns in reversed(self.made):
            _ip("netns", "del", ns, check=False)
        for host_end in self.host_ends:
            # Normally gone with its peer's namespace; a half-made pair is removed here.
            _ip("link", "del", host_end, check=False)
        self.made.clear()
        self.host_ends.clear()

"""Wording and number formats the terminal summary and the HTML page share."""

from __future__ import annotations

from typing import Any


def deliveries_per_client_at_connect(report: dict[str, Any]) -> float | None:
    """Retained revisions each client received at its start, on average (the connect row's
    notified n over its clients)."""
    for s in report["steps"]:
        if s["name"] == "connect" and s["online_clients"]:
            n = (s["stages"].get("notified") or {}).get("count", 0)
            return round(n / s["online_clients"], 1)
    return None


def n_explained(report: dict[str, Any], short: bool = False) -> str:
    """What the n of a stage counts, in one paragraph (terminal and HTML say the same)."""
    per_client = deliveries_per_client_at_connect(report)
    if short:
        return (
            "n: deliveries, one per client and change; cached and applied only where the "
            "client had to download and install (clients that already held the manifest "
            "count nothing)"
            + (
                f"; connect: from each client's start, one per retained revision "
                f"({per_client:g} per client)"
                if per_client is not None
                else ""
            )
            + ". in sync: online clients matching the oracle when the step ended."
        )
    text = (
        "n counts deliveries, one per client and change: notified = the client accepted the "
        "change's message; cached = it downloaded and verified a manifest the change made it "
        "need (clients that already held it from an earlier step, or whose change needs "
        "none, count nothing); applied = a launch installed or removed it."
    )
    if per_client is not None:
        text += (
            " connect is measured from each client's start, once per retained revision it "
            f"received ({per_client:g} per client here)."
        )
    return text


def run_size(report: dict[str, Any]) -> str:
    workers = report["workers"]
    return f"{report['clients']} clients, {workers} worker{'' if workers == 1 else 's'}"


def machine(report: dict[str, Any]) -> str:
    m = report.get("machine") or {}
    return f"Python {m.get('python', '?')}, {m.get('cpus', '?')} CPUs, {m.get('platform', '?')}"


def ms(value: Any) -> str:
    """A latency as people read it: 2,152 / 57.3 / 4.21."""
    if value is None:
        return "–"
    v = float(value)
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


# -- axes and plots --------------------------------------------------------------------------


def transport(report: dict[str, Any]) -> str:
    if report.get("tls"):
        return "MQTT over TLS and HTTPS, a device certificate and token per client"
    return "plain MQTT and HTTP (lab mode)"


def connect_storms(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(step, how long its started clients took to connect): from the step's start (the
    start command) until the last of them had its first CONNACK."""
    out = []
    for st in report.get("connect_storms", []):
        took = "-" if st["seconds"] is None else f"{st['seconds']:.1f} s"
        out.append(
            (st["step"], f"{st['connected']:,} of {st['clients']:,} clients connected in {took}")
        )
    return out

"""`broker-config --target mosquitto-bridge | nats`: the operation and its output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from server_stub.broker_config import BrokerConfigError
from server_stub.broker_targets import (
    Listen,
    NatsNode,
    default_bridge_nodes,
    default_nats_nodes,
    write_bridge_config,
    write_nats_config,
)
from server_stub.service import BadRequest, Service


async def other_target(
    s: Service,
    directory: Path,
    target: str,
    nodes: tuple[str, ...],
    store_dir: Path | None,
    light_consumers: bool = False,
) -> dict[str, Any]:
    users = await s.user_ids()
    try:
        if target == "mosquitto-bridge":
            if store_dir is not None or light_consumers:
                raise BrokerConfigError("--store-dir and --light-consumers are for --target nats")
            listens = [Listen.parse(n, "--node") for n in nodes] or default_bridge_nodes(2)
            result = write_bridge_config(directory, s.tenant, users, listens)
            result["nodes"] = [str(n) for n in listens]
        elif target == "nats":
            parsed = [NatsNode.parse(n) for n in nodes] or default_nats_nodes(3)
            result = write_nats_config(
                directory, s.tenant, users, parsed, store_dir, light_consumers=light_consumers
            )
            result["nodes"] = [str(n.mqtt) for n in parsed]
        else:
            raise BrokerConfigError(
                "--node, --store-dir and --light-consumers are for the other targets"
            )
    except (BrokerConfigError, OSError) as e:
        raise BadRequest(str(e)) from None
    agents = result["agents"]
    assert isinstance(agents, dict)
    return {
        "target": target,
        "directory": str(directory),
        "written": result["written"],
        "nodes": result["nodes"],
        "agents": len(agents),
        "skipped": result["skipped"],
        "dotted": result.get("dotted", []),
        "server_username": result["server"]["username"],  # type: ignore[index]
    }


def wrote_target(r: dict[str, Any]) -> str:
    d = r["directory"]
    lines = [f"wrote {d}/credentials.json (mode 0600, the same passwords as every target)"]
    if r["target"] == "mosquitto-bridge":
        core, *regions = r["nodes"]
        lines.append(
            f"wrote {r['written'][0]}: the core broker on {core} (the server account "
            f"{r['server_username']}, {len(regions)} bridge accounts, {r['agents']} agents)"
        )
        for path, node in zip(r["written"][1:], regions, strict=True):
            lines.append(
                f"wrote {path}: a regional broker on {node}, bridged to {core} "
                "(state in, reports out)"
            )
        lines.append(f"start each with `mosquitto -c {d}/NODE/mosquitto.conf`")
    else:
        lines.append(
            f"wrote {r['written'][0]} (mode 0600): the server account "
            f"{r['server_username']} and {r['agents']} agent users with their permissions"
        )
        for path, node in zip(r["written"][1:], r["nodes"], strict=True):
            lines.append(f"wrote {path}: MQTT on {node}")
        lines.append("start each with `nats-server -c FILE`; agents and server take any node")
        if r["dotted"]:
            lines.append(
                f"note: user ids with a dot ({', '.join(r['dotted'][:5])}"
                f"{', ...' if len(r['dotted']) > 5 else ''}) need nats-server 2.10 or later: "
                "2.9 refuses MQTT topics with '.'"
            )
    if r["skipped"]:
        lines.append(
            f"warning: no broker account for user ids {', '.join(map(repr, r['skipped']))}: "
            "reserved or unsafe as a broker account name"
        )
    return "\n".join(lines)

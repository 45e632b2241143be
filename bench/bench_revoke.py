"""How fast `addin-server revoke` cuts a device off, measured on real processes.

Sets up a tenant as an admin would (`pki init`, two users' devices enrolled, `broker-config
--pki`, `broker run` with TLS, `serve --pki`), connects the device to be revoked and another
device of the same user, then runs `revoke --broker-dir` and measures:

* revoke command: the whole CLI run (DB, CRL, ACL, SIGHUP);
* HTTP 401: from the end of the command to its token's first 401 (one request);
* new TLS connection refused: an attempt made as soon as the command returns, and later;
* whether a connection accepted in the instant before the broker reloaded gets anything;
* what the still-open connection gets: the next change for its user (the other device
  receives it), and whether the broker closed the connection.

    .venv/bin/python bench/bench_revoke.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import aiomqtt
import httpx

from simulator.mosquitto import free_port

BASE = "addins/v1/contoso"


def cli(*args: str, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADDIN_SERVER_")}
    env["ADDIN_SERVER_DB"] = "server.db"
    r = subprocess.run([sys.executable, "-m", "server_stub", *args], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    if r.returncode:
        raise SystemExit(f"{args}: {r.stderr}")
    return r.stdout


def wait_port(port: int) -> None:
    for _ in range(400):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def tls(d: Path, device: str) -> ssl.SSLContext:
    cfg = tomllib.loads((d / f"{device}.toml").read_text())
    (d / f"{device}.crt").write_text(cfg["tls_cert"])
    (d / f"{device}.key").write_text(cfg["tls_key"])
    ctx = ssl.create_default_context(cafile=str(d / "pki" / "ca.crt"))
    ctx.load_cert_chain(d / f"{device}.crt", d / f"{device}.key")
    return ctx


async def refused(port: int, ctx: ssl.SSLContext) -> bool:
    return (await attempt(port, ctx))[0]


async def attempt(port: int, ctx: ssl.SSLContext) -> tuple[bool, int]:
    """(refused, messages received within 1 s of subscribing to the user's retained
    membership) for a new connection with `ctx`'s certificate."""
    got = 0
    try:
        async with aiomqtt.Client("127.0.0.1", port, identifier="x", tls_context=ctx,
                                  protocol=aiomqtt.ProtocolVersion.V5, timeout=5) as c:  # fmt: skip
            await c.subscribe(f"{BASE}/member/ann", timeout=5)
            try:
                async with asyncio.timeout(1.0):
                    async for _ in c.messages:
                        got += 1
            except TimeoutError:
                pass
    except aiomqtt.MqttError:
        return True, got
    return False, got


async def one_round(d: Path, n: int, bport: int, https: str) -> dict[str, object]:
    victim, other = f"ann-laptop{n}", f"ann-desktop{n}"
    for device in (victim, other):
        cli("enroll", "--user", "ann", "--device", device, "--pki", "pki", "--broker-dir",
            "broker", "-o", f"{device}.toml", cwd=d)  # fmt: skip
    token = tomllib.loads((d / f"{victim}.toml").read_text())["server_token"]
    verify = ssl.create_default_context(cafile=str(d / "pki" / "ca.crt"))
    got: dict[str, int] = {victim: 0, other: 0}
    closed = False

    async def listen(c: aiomqtt.Client, name: str) -> None:
        nonlocal closed
        try:
            async for _ in c.messages:
                got[name] += 1
        except aiomqtt.MqttError:
            closed = name == victim or closed

    kw = {"protocol": aiomqtt.ProtocolVersion.V5, "timeout": 5}
    async with aiomqtt.Client("127.0.0.1", bport, identifier=victim, tls_context=tls(d, victim), **kw) as a, \
            aiomqtt.Client("127.0.0.1", bport, identifier=other, tls_context=tls(d, other), **kw) as b:  # type: ignore[arg-type]  # fmt: skip
        tasks = [asyncio.create_task(listen(a, victim)), asyncio.create_task(listen(b, other))]
        for c in (a, b):
            await c.subscribe(f"{BASE}/member/ann", qos=1)
        t0 = time.perf_counter()
        out = await asyncio.to_thread(cli, "revoke", victim, "--pki", "pki", "--broker-dir", "broker", cwd=d)
        t1 = time.perf_counter()
        async with httpx.AsyncClient(verify=verify) as http:
            status = (await http.get(f"{https}/v1/agents/ann/digest",
                                     headers={"Authorization": f"Bearer {token}"})).status_code  # fmt: skip
        t_http = time.perf_counter() - t1
        # A new connection attempted at once, while the old one is still open.
        at_once, late_got = await attempt(bport, tls(d, victim))
        before = dict(got)
        async with httpx.AsyncClient(verify=verify, headers={"Authorization": "Bearer adm"}) as http:
            await http.post(f"{https}/v1/groups", json={"id": f"g{n}"})
            await http.put(f"{https}/v1/groups/g{n}/members/ann")
        for _ in range(300):
            if got[other] > before[other]:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(1.0)
        for t in tasks:
            t.cancel()
    t2 = time.perf_counter()
    attempts = 0
    while not await refused(bport, tls(d, victim)):
        attempts += 1
    t_refused = time.perf_counter() - t1
    return {
        "revoke command s": round(t1 - t0, 3),
        "http status": status,
        "http 401 after s": round(t_http, 3),
        "other device got the change": got[other] > before[other],
        "revoked device got the change": got[victim] > before[victim],
        "broker closed the revoked connection": closed,
        "accepted attempts before refusal": attempts,
        "first refusal after s (incl. the 1 s wait above)": round(t_refused, 3),
        "refusal attempt s": round(time.perf_counter() - t2, 3),
        "new connection right after the command refused": at_once,
        "messages that connection got (if accepted)": late_got,
        "sighup": "sent SIGHUP" in out,
    }


def start(d: Path, bport: int, hport: int) -> list[subprocess.Popen[bytes]]:
    """The tenant's PKI, one user, the TLS broker and `serve --pki`."""
    cli("pki", "init", "pki", "--tenant", "contoso", cwd=d)
    cli("user", "add", "ann", "--tenant", "contoso", cwd=d)
    cli("broker-config", "broker", "--pki", "pki", cwd=d)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADDIN_SERVER_")}
    env["ADDIN_SERVER_DB"] = "server.db"
    quiet = {"cwd": d, "env": env, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    procs = [subprocess.Popen([sys.executable, "-m", "server_stub", "broker", "run", "broker",
                               "--listen", f"127.0.0.1:{bport}"], **quiet)]  # type: ignore[call-overload]  # fmt: skip
    wait_port(bport)
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "server_stub", "serve", "--tenant", "contoso", "--pki", "pki",
         "--broker", f"mqtts://127.0.0.1:{bport}", "--listen", f"127.0.0.1:{hport}",
         "--admin-token", "adm"], **quiet))  # type: ignore[call-overload]  # fmt: skip
    wait_port(hport)
    return procs


async def rounds(d: Path, n: int, bport: int, hport: int) -> None:
    for i in range(n):
        print(await one_round(d, i, bport, f"https://127.0.0.1:{hport}"))


def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        bport, hport = free_port(), free_port()
        procs: list[subprocess.Popen[bytes]] = []
        try:
            procs = start(d, bport, hport)
            asyncio.run(rounds(d, n, bport, hport))
        finally:
            for p in procs:
                p.terminate()
                p.wait(10)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    main(ap.parse_args().rounds)

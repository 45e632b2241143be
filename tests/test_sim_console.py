"""`addin-sim run --console` (what `scripts/demo.sh --console` runs): the console's URL and
token printed, the fleet kept up after the last step with the console counting it, and
Ctrl-C ending the run the usual way (report, summary, exit 0)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest


def _wait_for(path: Path, text: str, proc: subprocess.Popen[bytes], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = path.read_text(errors="replace") if path.exists() else ""
        if text in got:
            return got
        assert proc.poll() is None, f"the run ended early:\n{got[-3000:]}"
        time.sleep(0.2)
    raise AssertionError(f"no {text!r} within {timeout} s:\n{path.read_text(errors='replace')[-3000:]}")


def _sign_in(web: httpx.Client, token: str) -> None:
    form = web.get("/console/login")
    nonce = re.search(r'name="nonce" value="([^"]+)"', form.text)
    assert nonce is not None
    assert web.post("/console/login", data={"token": token, "nonce": nonce[1]}).status_code == 303


def _counts(web: httpx.Client) -> dict[str, dict[str, int]]:
    with web.stream("GET", "/console/events") as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                counts: dict[str, dict[str, int]] = json.loads(line[5:])["counts"]
                return counts
    raise AssertionError("the event stream ended without counts")


@pytest.mark.slow
def test_console_run_holds_the_fleet_until_ctrl_c(tmp_path: Path) -> None:
    err, out = tmp_path / "stderr.txt", tmp_path / "stdout.txt"
    with open(err, "wb") as e, open(out, "wb") as o:
        run = subprocess.Popen(
            [sys.executable, "-m", "simulator.cli", "run", "--console", "--console-delay", "0",
             "--clients", "10", "--workers", "0", "--no-baseline", "--report", str(tmp_path / "r")],
            stdout=o, stderr=e, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    try:
        text = _wait_for(err, "Ctrl-C stops it", run, 180)
        url = re.search(r"console: (http://127\.0\.0\.1:\d+)/console", text)
        token = re.search(r"sign in with the admin token: (\S+)", text)
        assert url is not None and token is not None, text
        with httpx.Client(base_url=url[1], timeout=30) as web:
            _sign_in(web, token[1])
            # The scenario is over and the fleet is still up: the console counts every
            # client as having applied what it is entitled to (bounded wait for the count).
            deadline = time.monotonic() + 30
            while True:
                counts = _counts(web)
                done = [c for c in counts.values() if c["entitled"] and c["applied"] == c["entitled"]]
                if done or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert done, counts
            assert max(c["entitled"] for c in counts.values()) == 10
        run.send_signal(signal.SIGINT)
        assert run.wait(120) == 0, err.read_text()[-3000:]
        assert "0 mismatches" in out.read_text()
        assert (tmp_path / "r" / "report.json").exists()
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()

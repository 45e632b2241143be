"""The wheel as a workstation installs it: built with the standard build tool, installed into a
fresh virtualenv with the agent's dependencies only (no FastAPI, uvicorn, PyYAML or
HdrHistogram), where every agent module imports, `addin-agent --version` and `--help` work,
the daemon runs against a real broker, and `addin-server` names the extra it lacks.

Offline by construction: the build uses this venv's setuptools (--no-isolation), and the
fresh venv gets the agent's dependencies by linking the installed distributions of this venv
(and only those) into its site-packages; pip then installs the wheel with no index and no
find-links, so a base requirement that is not an agent dependency fails the install."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from importlib import metadata
from pathlib import Path

import pytest
from harness import stop_process
from packaging.requirements import Requirement

from simulator.mosquitto import MosquittoBroker

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("addin_core", "addin_runtime", "agent", "server_stub", "simulator")
AGENT_PACKAGES = ("addin_core", "addin_runtime", "agent")
SERVER_ONLY = ("fastapi", "uvicorn", "yaml", "hdrh", "starlette")
TIMEOUT = 180


def sh(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    r = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert r.returncode == 0, f"{args}:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def offline_env(venv: Path) -> dict[str, str]:
    """No pip configuration (this machine's may add an index or a wheel folder), no index."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON", "ADDIN_"))}
    env.update(
        PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1",
        VIRTUAL_ENV=str(venv), PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
    )  # fmt: skip
    return env


def build_wheel(tmp: Path) -> Path:
    pytest.importorskip("build", reason="the `build` tool (test extra): run scripts/bootstrap.sh")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp / "dist"
    sh(sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", out, src, cwd=tmp)
    (wheel,) = out.glob("addin_deploy-*.whl")
    return wheel


def base_requirements(wheel: Path) -> list[Requirement]:
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        meta = z.read(name).decode()
    reqs = [Requirement(line.split(":", 1)[1].strip()) for line in meta.splitlines()
            if line.startswith("Requires-Dist:")]  # fmt: skip
    return [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]


def closure(reqs: list[Requirement]) -> dict[str, metadata.Distribution]:
    """The installed distributions `reqs` need, transitively (this venv's)."""
    found: dict[str, metadata.Distribution] = {}
    todo = list(reqs)
    while todo:
        req = todo.pop()
        key = re.sub(r"[-_.]+", "-", req.name).lower()
        if key in found:
            continue
        dist = metadata.distribution(req.name)
        found[key] = dist
        for line in dist.requires or []:
            sub = Requirement(line)
            if sub.marker is None or sub.marker.evaluate({"extra": ""}):
                todo.append(sub)
    return found


def link_into(site: Path, dists: dict[str, metadata.Distribution]) -> None:
    """Make `dists` importable (and known to pip) in `site`: a link per top-level entry."""
    for dist in dists.values():
        root = Path(str(dist.locate_file("")))
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            if not (site / top).exists() and (root / top).exists():
                (site / top).symlink_to(root / top)


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    wheel = build_wheel(tmp)
    reqs = base_requirements(wheel)
    assert not [
        r.name for r in reqs if r.name.lower() in ("fastapi", "uvicorn", "pyyaml", "hdrhistogram")
    ]
    venv = tmp / "venv"
    sh(sys.executable, "-m", "venv", venv, cwd=tmp)  # pip from ensurepip: offline
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    link_into(site, closure(reqs))
    # --no-index with no find-links: every dependency must be one of the linked ones.
    sh(venv / "bin" / "python", "-m", "pip", "install", "-q", f"{wheel}[agent]", cwd=tmp,
       env=offline_env(venv))  # fmt: skip
    return venv


def test_the_agent_installs_and_imports_without_the_servers_dependencies(fresh_venv: Path) -> None:
    py = fresh_venv / "bin" / "python"
    env, cwd = offline_env(fresh_venv), fresh_venv.parent
    where = sh(py, "-c", "import agent; print(agent.__file__)", cwd=cwd, env=env)
    assert where.startswith(str(fresh_venv)), where  # the installed copy, not the checkout
    for mod in SERVER_ONLY:
        r = subprocess.run([py, "-c", f"import {mod}"], env=env, cwd=cwd, capture_output=True, timeout=TIMEOUT)  # fmt: skip
        assert r.returncode != 0, f"{mod} is importable in the agent-only venv"
    # Every module of the agent's packages imports: none needs a server or simulator package.
    walk = (
        "import importlib, pkgutil\n"
        f"for top in {AGENT_PACKAGES!r}:\n"
        "    pkg = importlib.import_module(top)\n"
        "    for m in pkgutil.walk_packages(pkg.__path__, top + '.'):\n"
        "        importlib.import_module(m.name); print(m.name)\n"
    )
    imported = sh(py, "-c", walk, cwd=cwd, env=env).split()
    assert {"agent.cli", "agent.daemon", "agent.service", "agent.control_windows"} <= set(imported)

    assert sh(fresh_venv / "bin" / "addin-agent", "--version", cwd=cwd, env=env) == (
        "addin-agent, version 0.1.0\n"
    )
    help_text = sh(fresh_venv / "bin" / "addin-agent", "--help", cwd=cwd, env=env)
    assert re.search(r"^\s+run\s", help_text, re.M) and re.search(r"^\s+service\s", help_text, re.M)

    r = subprocess.run([fresh_venv / "bin" / "addin-server", "--help"], env=env, cwd=cwd,
                       capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert re.fullmatch(
        r"error: addin-server needs the 'server' extra \((fastapi|yaml|uvicorn) is not "
        r"installed\): pip install 'addin-deploy\[server\]'\n",
        r.stderr,
    ), r.stderr


def test_the_agent_only_install_runs_the_daemon(
    fresh_venv: Path, broker: MosquittoBroker, tmp_path: Path
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        'tenant = "contoso"\nuser_id = "ann"\nclient_id = "ann-laptop"\ninsecure = true\n'
        f'broker_url = "{broker.url}"\nserver_url = "http://127.0.0.1:9"\n'
        'cache_path = "cache.sqlite"\ncontrol = "agent.sock"\nanti_entropy_interval = 0\n'
    )
    log = tmp_path / "daemon.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [fresh_venv / "bin" / "addin-agent", "--config", config, "run"],
            stdout=out, stderr=out, env=offline_env(fresh_venv), cwd=tmp_path,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while "running; cache" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.1)
        wait_connected(log, proc)
        status = sh(fresh_venv / "bin" / "addin-agent", "--config", config, "status", "--json",
                    cwd=tmp_path, env=offline_env(fresh_venv))  # fmt: skip
        assert '"client_id": "ann-laptop"' in status
    finally:
        assert stop_process(proc) == 0, log.read_text()


def wait_connected(log: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if "connected to 127.0.0.1" in log.read_text():
            return
        assert proc.poll() is None, log.read_text()
        time.sleep(0.1)
    raise AssertionError(f"the daemon did not connect:\n{log.read_text()}")

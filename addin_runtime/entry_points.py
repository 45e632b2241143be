"""The console scripts of the tools whose dependencies are extras (`addin-server`,
`addin-sim`). One wheel ships every package, but a workstation installs only the agent's
dependencies (the base install): there `addin-server` says which extra it needs in one line
instead of dying in an import traceback."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import cast

from addin_runtime.cli_support import error

SERVER_DEPENDENCIES = frozenset({"fastapi", "starlette", "uvicorn", "yaml"})
SIM_DEPENDENCIES = SERVER_DEPENDENCIES | {"hdrh"}


def _main(module: str, tool: str, extra: str, needs: frozenset[str]) -> None:
    try:
        main = cast(Callable[[], None], importlib.import_module(module).main)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in needs:
            raise  # a bug, not a missing extra: the traceback is the report
        error(
            f"{tool} needs the '{extra}' extra ({e.name} is not installed): "
            f"pip install 'addin-deploy[{extra}]'"
        )
    main()


def server() -> None:
    _main("server_stub.cli", "addin-server", "server", SERVER_DEPENDENCIES)


def sim() -> None:
    _main("simulator.cli", "addin-sim", "sim", SIM_DEPENDENCIES)

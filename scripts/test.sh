#!/usr/bin/env bash
# The test command: installs what the tests need, then runs lint, types, the
# dead-code check and the whole pytest suite (real Mosquitto brokers on free loopback ports).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
echo "==> ruff"
.venv/bin/ruff check addin_core addin_runtime agent server_stub simulator tests bench scripts
echo "==> mypy"
.venv/bin/mypy
echo "==> vulture (dead code; paths and exceptions in pyproject.toml [tool.vulture])"
.venv/bin/vulture
echo "==> pytest"
exec .venv/bin/pytest -q -rs "$@"   # -rs: say why each skipped test skipped

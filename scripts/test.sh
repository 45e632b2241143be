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
# -rs: say why each skipped test skipped. -n 2 --dist loadfile: two processes, each taking whole
# test files (a file's fixtures and order stay as written); most tests wait on brokers, servers
# and agents, so two of them share this 2-core machine's time (the suite alone took ~17 min).
exec .venv/bin/pytest -q -rs -n 2 --dist loadfile "$@"

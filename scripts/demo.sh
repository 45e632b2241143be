#!/usr/bin/env bash
# The main job: a 1,000-client simulated phased rollout against a private Mosquitto and the
# server stub, every client checked against the independent oracle. Report in sim-report/.
#
#   scripts/demo.sh [addin-sim run options]
#   scripts/demo.sh --console [addin-sim run options]
#
# --console: the ring-rollout scenario (DEMO_SCENARIO overrides) with the server's console
# beside it. It prints the console's URL and the token to sign in with, waits 20 s
# (--console-delay) before the scenario starts, and keeps broker, server and fleet up after
# the last step until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
if [ "${1:-}" = "--console" ]; then
    shift
    exec .venv/bin/addin-sim run --console --scenario "${DEMO_SCENARIO:-ring-rollout}" "$@"
fi
exec .venv/bin/addin-sim run "$@"

#!/usr/bin/env bash
# Simulator benchmarks (docs/benchmarks.md): phased-rollout and storm at 1,000 / 5,000 / 10,000
# clients, one worker process per core, agents with the volatile cache (`--cache none`), then
# 10,000 phased-rollout again with in-memory SQLite caches (the default) for the memory cost.
# Reports go to bench-results/<scenario>-<clients>[-memory]/. Other parts append their own
# benchmark commands below.
set -uo pipefail
cd "$(dirname "$0")/.."
for clients in ${SIM_BENCH_CLIENTS:-1000 5000 10000}; do
    for scenario in phased-rollout storm; do
        echo "==> addin-sim run --clients $clients --scenario $scenario --cache none"
        .venv/bin/addin-sim run --clients "$clients" --scenario "$scenario" --cache none \
            --report "bench-results/$scenario-$clients" || echo "   (exit status $?)"
    done
done
# The same 10,000 clients in secure mode: every client an enrolled device with its own
# certificate, MQTT over TLS, HTTPS (docs/benchmarks.md "TLS").
echo "==> addin-sim run --clients 10000 --scenario phased-rollout --cache none --tls"
.venv/bin/addin-sim run --clients 10000 --scenario phased-rollout --cache none --tls \
    --report "bench-results/phased-rollout-10000-tls" || echo "   (exit status $?)"
echo "==> addin-sim run --clients 10000 --scenario phased-rollout (cache: in-memory SQLite)"
.venv/bin/addin-sim run --clients 10000 --scenario phased-rollout \
    --report "bench-results/phased-rollout-10000-memory" || echo "   (exit status $?)"

# How cost grows with the fleet (docs/benchmarks.md "How cost grows"): phased-rollout with the
# volatile cache at 1,000 / 5,000 / 10,000 / 19,000 clients, three runs each back to back, one
# table of medians with ranges and one page of plots (bench-results/growth/growth.html).
echo "==> bench/bench_growth.py"
.venv/bin/python bench/bench_growth.py --sizes ${SIM_GROWTH_CLIENTS:-1000 5000 10000 19000} \
    --repeats 3 || echo "   (exit status $?)"

# Per-agent CPU and memory of one fleet-wide change, many agents in one process.
echo "==> bench/bench_agent_fleet.py"
.venv/bin/python bench/bench_agent_fleet.py --agents 4000 || echo "   (exit status $?)"

# Agent: idle RSS/CPU with 50 add-ins, launch and why latency, admin write -> manifest cached.
echo "==> bench/bench_agent.py"
.venv/bin/python bench/bench_agent.py --addins 50 --launches 300 --writes 20 || echo "   (exit status $?)"

# Helpdesk commands as processes (why, status, list, launch through the daemon) on a cache of
# 200 add-ins and 10,000 events (docs/benchmarks.md "Helpdesk commands as processes").
echo "==> bench/bench_cli.py"
.venv/bin/python bench/bench_cli.py --addins 200 --events 10000 --runs 30 || echo "   (exit status $?)"

# The console's pages with 10,000 devices and 200 add-ins, over HTTP from a real server
# (docs/benchmarks.md "Console").
echo "==> bench/bench_console.py"
.venv/bin/python bench/bench_console.py --users 10000 --rounds 20 || echo "   (exit status $?)"

# Mosquitto vs a three-node NATS cluster (its MQTT gateway, JetStream): the same phased
# rollout at 2,000 and at 10,000 clients on each, ratio of notified and cached p99
# (docs/benchmarks.md "Brokers").
echo "==> bench/bench_brokers.py --clients 2000 10000"
.venv/bin/python bench/bench_brokers.py --clients 2000 10000 || echo "   (exit status $?)"

# What one digest, one manifest download and one agent report cost the server (CPU per
# operation, operations per second): the unit costs docs/scale.md sizes from.
echo "==> bench/bench_unit_costs.py"
.venv/bin/python bench/bench_unit_costs.py --users 10000 --requests 5000 --reports 10000 || echo "   (exit status $?)"

# The server under bulk admin work (docs/benchmarks.md "The server under bulk admin work"):
# writes/s with 16 HTTP clients (group commit), status/explain with 10,000 reporting devices
# and 200 add-ins, admin write latency during a 10,000-report burst after a broker restart.
# Median of 3 runs each; with BENCH_PG_URL (an empty PostgreSQL database) on PostgreSQL too.
echo "==> bench/bench_server_writes.py --part writes,reads,burst --runs 3"
.venv/bin/python bench/bench_server_writes.py --part writes,reads,burst --runs 3 \
    || echo "   (exit status $?)"
if [ -n "${BENCH_PG_URL:-}" ]; then
    echo "==> bench/bench_server_writes.py --part writes,reads,burst --runs 3 --db \$BENCH_PG_URL"
    .venv/bin/python bench/bench_server_writes.py --part writes,reads,burst --runs 3 \
        --db "$BENCH_PG_URL" || echo "   (exit status $?)"
fi

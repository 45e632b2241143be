# Shortcuts for the project's main commands (see README.md).
.PHONY: test run bench bench-brokers fuzz walkthrough

test:
	scripts/test.sh

run:
	scripts/demo.sh

bench:
	scripts/bootstrap.sh
	bench/run_benchmarks.sh

# Only the Mosquitto vs NATS cluster comparison (part of `make bench`); CLIENTS=1000 for a quick one
# (several sizes: CLIENTS="2000 10000").
bench-brokers:
	scripts/bootstrap.sh
	.venv/bin/python bench/bench_brokers.py --clients $(or $(CLIENTS),2000 10000)

fuzz:
	scripts/bootstrap.sh
	scripts/fuzz.sh

walkthrough:
	scripts/walkthrough.sh

# Shortcuts for the project's main commands (see README.md).
.PHONY: test run bench fuzz walkthrough

test:
	scripts/test.sh

run:
	scripts/demo.sh

bench:
	scripts/bootstrap.sh
	bench/run_benchmarks.sh

fuzz:
	scripts/bootstrap.sh
	scripts/fuzz.sh

walkthrough:
	scripts/walkthrough.sh

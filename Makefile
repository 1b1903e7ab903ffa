# nodemesh — the two commands users run are `make demo` and `make test` (as root).
.PHONY: setup demo test lint test-unit test-datapath bench install vm-test

VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# Tests run on JOBS workers (pytest-xdist): most root tests wait on sockets and timers, not on the
# CPU. loadgroup: each test is a unit of work, except that a file with a module-scoped fixture
# stays on one worker (tests/conftest.py groups it), so its set-up is made once; tests marked
# slow start first (tests/conftest.py orders them), so that short ones fill the end.
JOBS ?= 3
XDIST := -n $(JOBS) --dist loadgroup

setup:
	bash scripts/setup

demo: setup
	$(VENV)/bin/nodemesh demo

test: setup lint
	$(PY) -m pytest -ra $(XDIST) $(PYTEST_ARGS)

# ruff on the whole tree; mypy --strict on the core modules (pyproject.toml lists them)
lint: setup
	$(VENV)/bin/ruff check agent tests bench
	$(VENV)/bin/mypy

# No root needed once root's `make setup` made the venv; others cannot write root's pytest cache
# in the checkout, so they run without one.
test-unit: setup
	$(PY) -m pytest -ra $(if $(filter 0,$(shell id -u)),,-p no:cacheprovider) tests/unit $(XDIST) $(PYTEST_ARGS)

test-datapath: setup
	$(PY) -m pytest -ra $(XDIST) tests/datapath tests/e2e tests/fault $(PYTEST_ARGS)

# Dataplane benchmark: quick (< 10 min on 2 cores) by default, FULL=1 for N up to 100,000.
# Parts of it: SIZES=1,100 VARIANTS=direct,nodemesh WORKLOADS=conn APPEND=bench/results/x.md
# (each part adds its figures to the same results file; README, Performance). ORDER=bracketed
# or rounds: how conn's rounds pair each variant with its baseline (default concurrent, side
# by side); REPS=8: rounds; PAIRS=20: conn's paired rounds (the quick mode 12).
bench: setup
	$(PY) bench/run.py $(if $(FULL),--full,--quick) $(if $(WORKLOADS),--workloads $(WORKLOADS)) \
		$(if $(SIZES),--sizes $(SIZES)) $(if $(VARIANTS),--variants $(VARIANTS)) \
		$(if $(APPEND),--append $(APPEND)) $(if $(ORDER),--order $(ORDER)) \
		$(if $(REPS),--reps $(REPS)) $(if $(PAIRS),--pair-rounds $(PAIRS))

install: setup
	bash scripts/install-host.sh

# Root tests on Debian 12's 6.1 kernel in a local Vagrant VM (~20 min; not part of `test`).
vm-test:
	bash scripts/vm-test

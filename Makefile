# nodemesh — the two commands users run are `make demo` and `make test` (as root).
.PHONY: setup demo test lint test-unit test-datapath bench install vm-test

VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

setup:
	bash scripts/setup

demo: setup
	$(VENV)/bin/nodemesh demo

test: setup lint
	$(PY) -m pytest -ra $(PYTEST_ARGS)

# ruff on the whole tree; mypy --strict on the core modules (pyproject.toml lists them)
lint: setup
	$(VENV)/bin/ruff check agent tests bench
	$(VENV)/bin/mypy

# No root needed once root's `make setup` made the venv; others cannot write root's pytest cache
# in the checkout, so they run without one.
test-unit: setup
	$(PY) -m pytest -ra $(if $(filter 0,$(shell id -u)),,-p no:cacheprovider) tests/unit $(PYTEST_ARGS)

test-datapath: setup
	$(PY) -m pytest -ra tests/datapath tests/e2e $(PYTEST_ARGS)

# Dataplane benchmark: quick (< 10 min on 2 cores) by default, FULL=1 for N up to 100,000.
bench: setup
	$(PY) bench/run.py $(if $(FULL),--full,--quick)

install: setup
	bash scripts/install-host.sh

# Root tests on Debian 12's 6.1 kernel in a local Vagrant VM (~20 min; not part of `test`).
vm-test:
	bash scripts/vm-test

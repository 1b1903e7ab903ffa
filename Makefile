# nodemesh — the two commands users run are `make demo` and `make test` (as root).
.PHONY: setup demo test test-unit test-datapath bench install

VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

setup:
	bash scripts/setup

demo: setup
	$(VENV)/bin/nodemesh demo

test: setup
	$(PY) -m pytest -ra $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest -ra tests/unit $(PYTEST_ARGS)

test-datapath: setup
	$(PY) -m pytest -ra tests/datapath tests/e2e $(PYTEST_ARGS)

bench: setup
	$(PY) bench/run.py

install: setup
	bash scripts/install-host.sh

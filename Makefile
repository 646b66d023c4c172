# Two entry points for a fresh machine: `make run` (the embedded default job) and `make test`.
# Both create .venv and install the tested dependency set (constraints.txt) on first use.
# `make test` is the quick suite (under 10 minutes on 2 cores); `make test-slow` the tests marked
# slow (fault injection, the device measurement's toy run); CI (.ci/run) runs both.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test test-slow lint

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -c constraints.txt -e '.[dev]'
	touch $@

run: $(VENV)/.installed
	$(PY) -m icep

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --dist worksteal -m "not slow" --durations=15

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --dist worksteal -m slow --durations=15

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

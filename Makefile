# budgetgate developer tasks (GNU make).
#
#   make venv           create .venv (python >= 3.11), pip install -e ".[dev]" -c requirements.lock
#   make lock           rewrite requirements.lock from .venv (after changing dependencies)
#   make run            gateway with the embedded SQLite ledger on :8080
#   make test           full test suite (postgres tests start their own throwaway server)
#   make lint           ruff check + ruff format --check + mypy app
#   make mock-upstream  fake OpenAI-compatible upstream on :9100
#   make migrate        apply ledger migrations (database from the environment / .env)
#   make bench | stress | test-litellm
#   make soak           the gateway under steady load for SOAK_MINUTES (default 10) on PostgreSQL and SQLite
#   make clean          remove caches/build artifacts (keeps .venv)
#   make distclean      clean + remove .venv
#
# Settings (BUDGETGATE_*) come from the environment / .env, not from this file.

PYTHON ?= python3
VENV   ?= .venv
HOST   ?= 0.0.0.0
PORT   ?= 8080
MOCK_PORT ?= 9100
PYTEST_ARGS ?=

VENV_PY  := $(VENV)/bin/python
VENV_BIN := $(VENV)/bin
STAMP    := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help venv lock run test lint mock-upstream migrate bench soak stress test-litellm clean distclean

help:
	@sed -n 's/^#   make /  make /p' $(firstword $(MAKEFILE_LIST))

venv: $(STAMP)

# The interpreter: created once; must be >= 3.11.
$(VENV_PY):
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "$(PYTHON) is %d.%d; budgetgate needs Python >= 3.11 (make PYTHON=python3.X ...)" % sys.version_info[:2])'
	$(PYTHON) -m venv $(VENV)

# (Re)install when pyproject.toml or the lock is newer than the stamp. The lock constrains the
# runtime dependencies to the versions the Docker image installs; the dev tools float.
$(STAMP): pyproject.toml requirements.lock | $(VENV_PY)
	$(VENV_PY) -m pip install -c requirements.lock -e ".[dev]"
	@touch $@

# The runtime dependencies (no dev extras, not the project itself) pinned to what .venv holds.
lock: venv
	$(VENV_PY) scripts/lock.py > requirements.lock.tmp
	mv requirements.lock.tmp requirements.lock

run: venv
	$(VENV_BIN)/budgetgate serve --host $(HOST) --port $(PORT)

test: venv
	$(VENV_PY) -m pytest -q $(PYTEST_ARGS)

lint: venv
	$(VENV_BIN)/ruff check .
	$(VENV_BIN)/ruff format --check .
	$(VENV_BIN)/mypy app

mock-upstream: venv
	$(VENV_BIN)/budgetgate mock-upstream --port $(MOCK_PORT)

migrate: venv
	$(VENV_BIN)/budgetgate migrate

bench: venv
	$(VENV_PY) bench/run.py

# SOAK_MINUTES (environment) or SOAK_ARGS="--minutes 60 --ledger postgres".
soak: venv
	$(VENV_PY) bench/soak.py $(SOAK_ARGS)

stress: venv
	STRESS=1 $(VENV_PY) -m pytest tests/stress -q $(PYTEST_ARGS)

test-litellm: venv
	PYTHON="$(PYTHON)" bash scripts/litellm-venv.sh
	BUDGETGATE_LITELLM_BIN="$(CURDIR)/.litellm-venv/bin/litellm" $(VENV_PY) -m pytest tests/litellm -q $(PYTEST_ARGS)

clean:
	rm -rf build dist .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . \( -path ./$(VENV) -o -path ./.litellm-venv -o -path ./.git \) -prune \
		-o -type d -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) *.egg-info

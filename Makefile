# Development tasks. Targets that need Redis and PostgreSQL first run `scripts/services.sh up`,
# which uses the configured servers when they answer and starts private ones otherwise.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SOURCES := worker tests scripts migrations
# mypy refuses a directory without Python files; scripts/ may hold only shell scripts
TYPED_SOURCES := worker tests migrations $(wildcard scripts/*.py)
PYTEST_ARGS ?=

# Exports CONSOLIDATOR_REDIS_URL and CONSOLIDATOR_DATABASE_URL into the recipe's shell; stops the
# recipe if the services cannot be brought up.
SERVICES_ENV := exports="$$(bash scripts/services.sh up)" && eval "$$exports"

.PHONY: help venv lint format services services-down migrate test demo run bench soak \
	clean distclean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

venv: $(STAMP) ## create .venv and install the project with its dev tools

$(STAMP): pyproject.toml
	@if ! $(BIN)/python -m pip --version >/dev/null 2>&1; then \
		rm -rf $(VENV); \
		if ! $(PYTHON) -m venv $(VENV); then \
			echo "venv: python3 -m venv failed; installing python3-venv" >&2; \
			rm -rf $(VENV); \
			sudo=""; [ "$$(id -u)" -eq 0 ] || sudo="sudo -n"; \
			$$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq; \
			$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >&2; \
			$(PYTHON) -m venv $(VENV); \
		fi; \
	fi
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

lint: venv ## ruff, ruff format --check, mypy --strict
	$(BIN)/ruff check $(SOURCES)
	$(BIN)/ruff format --check $(SOURCES)
	$(BIN)/mypy --strict $(TYPED_SOURCES)

format: venv ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix $(SOURCES)
	$(BIN)/ruff format $(SOURCES)

services: ## start what is missing and print the export lines (eval "$(make -s services)")
	@bash scripts/services.sh up

services-down: ## stop the private services
	@bash scripts/services.sh down

migrate: venv ## apply the database migrations
	@$(SERVICES_ENV) && $(BIN)/consolidator migrate

test: venv ## the test suite against real Redis and PostgreSQL (extra args: PYTEST_ARGS=...)
	@$(SERVICES_ENV) && bash scripts/test-adk.sh && $(BIN)/pytest -q $(PYTEST_ARGS)

demo: venv ## the demo: generated sessions, consolidated, queried
	@$(SERVICES_ENV) && $(BIN)/python scripts/demo.py

run: venv ## migrate, then run the daemon in the foreground
	@$(SERVICES_ENV) && $(BIN)/consolidator migrate && exec $(BIN)/consolidator run

bench: venv ## the benchmark
	@$(SERVICES_ENV) && $(BIN)/python scripts/bench.py

soak: venv ## the fault scenarios at length (marker `soak`); figures to docs/faults.md
	@$(SERVICES_ENV) && SOAK=1 $(BIN)/pytest -q -m soak tests/ $(PYTEST_ARGS)

clean: ## stop the private services and delete their state
	bash scripts/services.sh clean

distclean: clean ## clean, and delete the virtualenv and caches
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build *.egg-info

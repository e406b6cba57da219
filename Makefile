# cellgate — `make run` serves the demo model, `make test` runs every check.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
DEMO_RUN := runs/demo
DEMO_BUNDLE := bundles/demo
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: run test lint format install install-dev demo bench bench-serve-short soak audit clean help

help:
	@echo "make run    - install, train + export the demo model if needed, serve it on http://$(HOST):$(PORT)"
	@echo "make test   - install test dependencies, lint, run the whole test suite"
	@echo "make lint   - ruff + mypy"
	@echo "make bench-serve-short - a <= 60 s serving benchmark"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Stamps record which extras are installed; they are redone when pyproject.toml changes.
$(VENV)/.run-installed: pyproject.toml | $(BIN)/python
	$(PIP) install --quiet -e '.[serve,train]'
	@touch $@

$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(PIP) install --quiet -e '.[serve,train,dev]'
	@touch $@ $(VENV)/.run-installed

install: $(VENV)/.run-installed
install-dev: $(VENV)/.dev-installed

$(DEMO_BUNDLE)/manifest.json: | $(VENV)/.run-installed
	$(BIN)/cellgate train --corpus builtin:longrange --out $(DEMO_RUN)
	$(BIN)/cellgate export $(DEMO_RUN) --out $(DEMO_BUNDLE) --force

demo: $(DEMO_BUNDLE)/manifest.json

run: $(VENV)/.run-installed $(DEMO_BUNDLE)/manifest.json
	@echo
	@echo "cellgate is starting on http://$(HOST):$(PORT)  (Ctrl-C to stop). Try:"
	@echo "  curl -s -X POST http://$(HOST):$(PORT)/v1/predict -H 'Content-Type: application/json' -d '{\"text\": \"i stay in india . we cooked a song . i speak\", \"k\": 3}'"
	@echo
	CELLGATE_BUNDLE=$(DEMO_BUNDLE) CELLGATE_HOST=$(HOST) CELLGATE_PORT=$(PORT) $(BIN)/cellgate serve

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy cellgate model export service bench

format: $(VENV)/.dev-installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/pytest $(PYTEST_ARGS)

bench-serve-short: $(VENV)/.dev-installed $(DEMO_BUNDLE)/manifest.json
	$(BIN)/python -m bench.serve --short

clean:
	rm -rf $(VENV) runs bundles .pytest_cache .mypy_cache .ruff_cache

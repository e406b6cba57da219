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
# Empty: scripts/system-packages.sh's own list (the tests set it to exercise a package that is missing).
SYSTEM_PACKAGES ?=
# `make test` prints each phase's time as it ends and all of them at the end.
PHASES_FILE := build/make-test-phases.txt
PHASE := PHASES_FILE=$(PHASES_FILE) scripts/phase.sh

.PHONY: run test lint format install install-dev install-test system-packages demo bench bench-serve-short bench-export soak audit clean help test-deploy compose-up

help:
	@echo "make run    - install, train + export the demo model if needed, serve it on http://$(HOST):$(PORT)"
	@echo "make test   - install what the tests need (system packages via apt, Python extras), lint, run every test"
	@echo "make lint   - ruff + mypy"
	@echo "make bench-serve-short - a <= 60 s serving benchmark"
	@echo "make bench-export - ONNX Runtime vs PyTorch, graph forms, prefill, int8 (~30 s; docs/benchmarks.md)"
	@echo "make soak   - 30 s overload + 5-minute soak, RSS growth < 10 % (not in CI)"
	@echo "make audit  - pip-audit of the serve dependencies"
	@echo "make test-deploy - only the deploy and observability checks (promtool, nginx, compose, k8s, Dockerfile)"

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

# The system packages the tests need (redis-server, prometheus, nginx, chromium, podman, ...): installed with
# apt as root or with password-less sudo, else one line naming the command to run and exit 2. Seconds when present.
system-packages:
	@PYTHON=$(PYTHON) scripts/system-packages.sh $(SYSTEM_PACKAGES)

install-test: system-packages $(VENV)/.dev-installed

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
	$(BIN)/mypy cellgate vocab model export service bench

format: $(VENV)/.dev-installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Everything a fresh clone needs, then every check; CI (.ci/run) runs exactly this.
test:
	@rm -f $(PHASES_FILE)
	@$(PHASE) install $(MAKE) --no-print-directory install-test
	@$(PHASE) lint $(MAKE) --no-print-directory lint
	@$(PHASE) tests $(BIN)/pytest $(PYTEST_ARGS)
	@echo "make test passed:" && cat $(PHASES_FILE)

# The deploy/observability checks alone (they are part of `make test` too).
test-deploy: install-test
	$(BIN)/pytest tests/deploy tests/service/test_metrics.py $(PYTEST_ARGS)

# Where a Docker engine exists: build the images and start cellgate + Prometheus + Grafana (deploy/README.md).
compose-up:
	docker compose up -d --build

bench-serve-short: $(VENV)/.dev-installed $(DEMO_BUNDLE)/manifest.json
	$(BIN)/python -m bench.serve --short

bench-export: $(VENV)/.dev-installed
	$(BIN)/python -m bench.export_speed --out bench/results/export_speed.json

# Not in CI: 30 s of overload at 2x capacity and a 5-minute soak on a Redis-backed replica; both check that
# RSS grows < 10 % after warm-up (CELLGATE_SOAK_SECONDS sets the soak's length; the soak test's own timeout
# follows it). Needs redis-server.
soak: $(VENV)/.dev-installed
	CELLGATE_SOAK=1 $(BIN)/pytest tests/service/test_faults.py -k soak --timeout 900 \
		-o log_cli=true --log-cli-level=INFO $(PYTEST_ARGS)

# Known vulnerabilities in what `pip install .[serve]` resolves to today (there is no lock file: the
# serving image installs the newest versions within pyproject's ranges). Needs network to PyPI.
audit: $(VENV)/.dev-installed
	$(BIN)/python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["serve"]))' > $(VENV)/serve-requirements.txt
	$(BIN)/pip-audit --strict --progress-spinner off -r $(VENV)/serve-requirements.txt

clean:
	rm -rf $(VENV) runs bundles .pytest_cache .mypy_cache .ruff_cache

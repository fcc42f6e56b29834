# llmq developer commands. `make` lists them; everything runs from the virtualenv in .venv.

PYTHON ?= python3
VENV := .venv
VENV_PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Postgres and Redis for commands that need them: the configured or default ones when they
# answer, embedded ones when not, stopped again when the command ends, whose exit status it
# keeps. Prefix a command with it.
WITH_SERVICES = $(VENV_PY) -m ops.devstack exec --

.DEFAULT_GOAL := help
.PHONY: help venv run test lint docs bench migrate up down logs clean

help: ## List the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

venv: $(STAMP) ## Create .venv with torch and llmq (dev, embedded and docs extras)

# Reinstall only when the dependencies or the torch installer change.
$(STAMP): pyproject.toml ops/install-torch.sh
	test -x $(VENV_PY) || $(PYTHON) -m venv $(VENV)
	$(VENV_PY) -m pip install --upgrade pip
	bash ops/install-torch.sh $(VENV_PY)
	$(VENV_PY) -m pip install -e ".[dev,embedded,docs]"
	touch $@

run: venv ## Start the whole stack (API, worker, Flower) until Ctrl-C
	$(VENV_PY) -m ops.devstack run

test: venv ## Run the test suite against real Postgres and Redis
	$(WITH_SERVICES) $(VENV_PY) -m pytest

lint: venv ## Check the code with ruff and the layout's import contracts
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

# The API reference is generated from api.main:app (docs/hooks/openapi.py), hence the venv.
docs: venv ## Build the documentation site into site/ (strict: broken links fail)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

bench: venv ## Run the benchmarks: the job path, then throughput (BENCH_ARGS, JOBPATH_ARGS="--quick")
	$(VENV_PY) -m bench.jobpath $(JOBPATH_ARGS)
	$(VENV_PY) -m bench.run $(BENCH_ARGS)

migrate: venv ## Bring the database schema up to date
	$(WITH_SERVICES) $(VENV)/bin/alembic upgrade head

up: ## Start the stack with docker compose
	docker compose up -d --build

down: ## Stop the docker compose stack
	docker compose down

logs: ## Follow the docker compose logs
	docker compose logs -f

clean: ## Remove .venv, caches and the built docs (keeps the data in .llmq)
	rm -rf $(VENV) .pytest_cache .ruff_cache site
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

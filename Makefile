# Slipstream: `make run` starts everything locally, `make test` runs the whole suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck deps system-deps clean help faults
.DEFAULT_GOAL := help

help:
	@echo "make run    - install (first time: ~6 min to build llama-cpp-python) and start Redis,"
	@echo "              a gateway on :8000 and a worker with the Gemma 3 270M model"
	@echo "make test   - install and run ruff, mypy and the test suite"
	@echo "make bench  - quick side-by-side benchmark (writes docs/benchmarks.md)"

system-deps:
	@command -v redis-server >/dev/null 2>&1 || bash scripts/install-system-deps.sh

$(STAMP): pyproject.toml scripts/llama-cmake-args.sh scripts/llama-no-amx.sh
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	CMAKE_ARGS="$$(bash scripts/llama-cmake-args.sh)" $(BIN)/pip install --quiet -e '.[dev,llama]'
	bash scripts/llama-no-amx.sh $(BIN)
	@touch $(STAMP)

deps: system-deps $(STAMP)

run: deps
	$(BIN)/slipstream up

lint: deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: deps
	$(BIN)/mypy

test: deps lint typecheck
	$(BIN)/pytest

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .slipstream-redis

-include bench/bench.mk

faults: deps
	$(BIN)/pytest -m faults --trials 20

.PHONY: bench-overload
bench-overload: deps  ## overload run: 0.7 -> 2x burst -> 0.7 of capacity (docs/overload.md)
	$(BIN)/python -m bench.overload --json bench/results/overload.json

# Two commands a user needs: `make run` and `make test`. Each creates/reuses .venv first.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CORES ?= 2

.PHONY: run test bench plan clean-data

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/snakemake --cores $(CORES)

test: $(STAMP)
	$(BIN)/python -m pytest tests

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_rng.py

# Change planning: `make plan ARGS="--config seed=7"` or `make plan ARGS="--configfile proposed.yaml"`
plan: $(STAMP)
	$(BIN)/python -m engine.cli.plan $(ARGS)

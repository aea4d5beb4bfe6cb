# shardwise: the front door. `make demo` and `make test` set up what they need on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build by default; GPU users: make setup TORCH_SPEC="torch==2.13.0 --index-url <your CUDA index>"
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.setup-done
ASSETS ?= .cache/assets
PYTEST_ARGS ?=

.PHONY: setup assets demo test test-fast lint bench docs clean

setup: $(STAMP)

# The stamp depends on pyproject.toml so that changed dependencies re-run setup; otherwise idempotent.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, so nothing below pulls a multi-GB CUDA build on a CPU machine.
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

assets: $(STAMP)
	$(PY) -m shardwise.data.assets --cache $(ASSETS)

# The demo is one fixed, seeded run: running it again replaces its own outputs/bert_minilm_r8.
demo: $(STAMP) assets
	$(PY) recipes/finetune_bert.py --config configs/recipes/bert_minilm_r8.yaml train.overwrite=true

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check src tests bench recipes

# Benchmarks (not tests): anchors need the bench extras (bitsandbytes, torchao; no torch pulled).
bench: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	bash bench/run_all.sh

clean:
	rm -rf outputs .pytest_cache .ruff_cache

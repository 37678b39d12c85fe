# Two commands do all set-up on a fresh machine:
#   make run    install, then run the main job (an automatic ablation search) on the embedded default model
#   make test   install, then run the test suite (offline)
# Installs are locked: pip gets constraints.txt, the exact set of versions CI tested (regenerate: make lock).
# TORCH picks the PyTorch build. The default is the CPU wheel; on a GPU machine use e.g.
#   make run TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
LOCK ?= constraints.txt
TORCH ?= torch==2.13.0
PIP_VERSION ?= 26.3
RUN_ARGS ?=
TEST_ARGS ?=
BIN = $(VENV)/bin
ENV = HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error

.PHONY: setup run test lint typecheck bench lock canary clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q pip==$(PIP_VERSION)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -c $(LOCK) -e '.[test]'
	$(BIN)/python tools/check_lock.py $(LOCK)
	touch $@

run: setup
	$(ENV) $(BIN)/hereticlab run $(RUN_ARGS)

test: setup
	$(ENV) $(BIN)/python -m pytest -q -x $(TEST_ARGS)

# ruff (lint + format check, line length 120; config in pyproject.toml). .ci/run runs it.
lint: setup
	$(BIN)/ruff check src tests bench tools
	$(BIN)/ruff format --check src tests bench tools

# mypy on src/hereticlab (config: [tool.mypy] in pyproject.toml); tests/test_typing.py checks that every public
# function and method is annotated, so this checks the whole public API.
typecheck: setup
	$(BIN)/mypy

bench: setup
	$(ENV) $(BIN)/python bench/trial_speed.py
	$(ENV) $(BIN)/python bench/capture_overhead.py

# Re-resolve the newest versions pyproject.toml's ranges allow in a scratch venv and write them to the lock.
# Run `make test` afterwards; commit constraints.txt only when it passes.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q pip==$(PIP_VERSION) && .venv-lock/bin/python -m pip install -q $(TORCH)
	.venv-lock/bin/python -m pip install -q -e '.[test]'
	.venv-lock/bin/python tools/check_lock.py --write $(LOCK)
	rm -rf .venv-lock

# The newest versions the registries serve (upper bounds lifted, torch kept), on a fast subset of the tests.
# Never fails: prints a banner and writes ci-canary.txt. A passing canary is the signal to raise bounds + lock.
canary:
	bash .ci/canary

clean:
	rm -rf $(VENV) .venv-lock .venv-canary build src/*.egg-info

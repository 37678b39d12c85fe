# Two commands do all set-up on a fresh machine:
#   make run    install, then run the main job (an automatic ablation search) on the embedded default model
#   make test   install, then run the test suite (offline)
# TORCH picks the PyTorch build. The default is the CPU wheel; on a GPU machine use e.g.
#   make run TORCH="torch --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
RUN_ARGS ?=
BIN = $(VENV)/bin

.PHONY: setup run test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

run: setup
	HF_HUB_OFFLINE=1 $(BIN)/hereticlab run $(RUN_ARGS)

test: setup
	HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error $(BIN)/python -m pytest -q -x

bench: setup
	HF_HUB_OFFLINE=1 $(BIN)/python bench/trial_speed.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/capture_overhead.py

clean:
	rm -rf $(VENV) build src/*.egg-info

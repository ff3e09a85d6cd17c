# `make train` and `make test` create or refresh .venv, then run.
# TORCH_SPEC lets CI pin the CPU wheel (TORCH_SPEC=torch==2.13.0) while users get their platform's torch.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch
ARGS ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install train test lint bench clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-install when pyproject.toml or the torch requirement changes.
$(STAMP): pyproject.toml $(PY)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[dev]"
	$(PY) -c "import torch, hydra, omegaconf, transformers, tokenizers, datasets, accelerate, wandb, safetensors, tqdm, scipy, optuna, submitit, hydra_plugins.hydra_optuna_sweeper, hydra_plugins.hydra_submitit_launcher"
	echo "$(TORCH_SPEC)" > $(STAMP)

train: $(STAMP)
	$(PY) train.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q --durations=25 $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) scripts/bench.py $(ARGS)

clean:
	rm -rf runs outputs multirun .cache .pytest_cache

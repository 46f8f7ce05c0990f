# Two entry points: `make demo` (set up, generate the demo dataset, train) and `make test` (lint, then every
# test); `make test-fast` skips the end-to-end tests marked slow. `make demo CONFIG=configs/demo_shards.yaml` trains
# the demo on WebDataset shards.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
NPROC ?= 2
# Not from the environment, where the launch scripts' CONFIG may be set: `make demo CONFIG=...` only.
CONFIG = configs/demo.yaml

.PHONY: setup demo lint test test-fast clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: setup
	OMP_NUM_THREADS=1 WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/torchrun --standalone --nproc_per_node=$(NPROC) \
		-m trainer.main --config $(CONFIG) $(ARGS)

lint: setup
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: lint
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs wandb data/demo data/demo-shards

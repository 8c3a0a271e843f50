# The two commands of the README. Both create .venv on a fresh machine.
# torch==2.13.0 is installed first: on these machines it is a local CPU build,
# and a bare torch requirement would pull a multi-GB CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test install install-test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(if $(TORCH_PIN),$(BIN)/python -m pip install -q $(TORCH_PIN))
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(BIN)/eri demo

test: install-test
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache

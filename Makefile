# The two commands of the README. Both create .venv on a fresh machine.
# torch==2.13.0 is installed first: on these machines it is a local CPU build,
# and a bare torch requirement would pull a multi-GB CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test test-fast install install-test chromium cxx clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(if $(TORCH_PIN),$(BIN)/python -m pip install -q $(TORCH_PIN))
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(BIN)/python -m pip install -q -e '.[test,ui,optim]'
	touch $@

# The browser test (tests/ui/test_browser.py) drives Debian's chromium through Playwright
# (Playwright's own browser download is not reachable). Installed when missing and we are
# root with apt; otherwise that one test skips and says why.
chromium:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		|| echo "make: chromium could not be installed; the browser test will skip"; fi

# CPU inductor (tests/test_compile_cache.py compiles with it) needs a C++ compiler; installed the same way,
# otherwise that test skips and says why.
cxx:
	@if ! command -v g++ >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null) \
		|| echo "make: g++ could not be installed; the compile-cache test will skip"; fi

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test chromium cxx

demo: install
	$(BIN)/eri demo

test: install-test
	$(BIN)/python -m pytest -q

# A quicker lane while working: the tests marked slow (> ~20 s each) left out. `make test` runs them all.
test-fast: install-test
	$(BIN)/python -m pytest -q -m "not slow and not gpu"

clean:
	rm -rf $(VENV) runs .pytest_cache

# Lumen: `make quickstart` (venv + install + default experiment) and `make test` (the test suite).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/quickstart
PYTEST_ARGS ?=

# A Python >= 3.12: python3.13/python3.12 on PATH if they really run (pyenv shims may not), else pyenv's newest.
FIND_PYTHON = for c in python3.13 python3.12 \
	  $$(command -v pyenv >/dev/null && for v in $$(pyenv versions --bare 2>/dev/null | grep -E '^3\.(1[2-9]|[2-9][0-9])' | sort -Vr); do echo "$$(pyenv root)/versions/$$v/bin/python"; done); do \
	  if "$$c" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; then echo "$$c"; exit 0; fi; \
	done; exit 1

.PHONY: quickstart test test-slow lint parity venv install install-test clean

$(VENV)/bin/python:
	@py=$$($(FIND_PYTHON)) || { echo "error: Lumen needs Python >= 3.12 and none was found (tried python3.13, python3.12 and pyenv's versions). Install one, e.g. 'pyenv install 3.12', and rerun." >&2; exit 1; }; \
	echo "Using $$py ($$($$py --version))"; "$$py" -m venv $(VENV) && $(PY) -m pip install -q --upgrade pip

venv: $(VENV)/bin/python

# Install only when the package metadata changed since the last install (stamps in the venv).
$(VENV)/.installed: $(VENV)/bin/python setup.cfg pyproject.toml
	@echo "installing lumen into $(VENV) (pip log: $(VENV)/pip.log)"
	$(PY) -m pip install -q -e . >$(VENV)/pip.log 2>&1 || { cat $(VENV)/pip.log; exit 1; }
	@touch $@

$(VENV)/.installed-test: $(VENV)/bin/python setup.cfg pyproject.toml
	@echo "installing lumen[test] into $(VENV) (pip log: $(VENV)/pip.log)"
	$(PY) -m pip install -q -e '.[test]' >$(VENV)/pip.log 2>&1 || { cat $(VENV)/pip.log; exit 1; }
	@touch $@ $(VENV)/.installed

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

quickstart: install
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(PY) -m scripts.launch --config=configs/quickstart.py --workdir=$(WORKDIR)

# pytest exits 5 when no test is collected; treat that as a failure only if tests were expected.
test: install-test
	JAX_PLATFORMS=cpu $(PY) -m pytest -q -n 2 --dist=loadfile $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: no tests were collected" >&2; exit 1; fi; exit $$rc

# ruff's lint rules and formatter (settings in pyproject.toml); `.ci/run` runs this before the tests.
lint: install-test
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test-slow: install-test
	JAX_PLATFORMS=cpu $(PY) -m pytest -q -m slow $(PYTEST_ARGS)

parity: install-test
	$(PY) -m pip install -q -e '.[parity]'
	JAX_PLATFORMS=cpu $(PY) -m pytest -q -m parity tests/test_hf.py tests/test_hf_families.py tests/test_hf_export.py tests/test_prefopt_losses.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

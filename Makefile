# Set-up is two commands: `make train` and `make test`; each creates .venv if it is missing.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=
# pytest workers (pytest-xdist; test files stay whole on one worker): the suite is mostly
# single-threaded compiles and small steps, so two workers use a 2-core machine
TEST_WORKERS ?= 2

# First Python >= 3.12 found: an explicit $(PYTHON), then python3.13 / python3.12 / python3 on PATH,
# then pyenv's installs (pyenv's shims need .python-version, which this repo has).
PYTHON_FOUND := $(shell for p in $(PYTHON) python3.13 python3.12 python3 $$HOME/.pyenv/versions/3.1[2-9]*/bin/python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null && { echo $$p; break; }; done)

# LOCK=1 (default): install the exact versions in requirements/py<X.Y>-<set>.txt (`make lock`);
# LOCK=0: the ranges in pyproject.toml, resolved by pip that day (unsupported: it may not resolve)
LOCK ?= 1
# uv resolves the lock (`make lock`); installs use plain pip, so users need no uv
UV_VERSION := $(shell sed -n 's/^UV_VERSION = "\(.*\)".*/\1/p' requirements/lock.py)

.PHONY: train test bench venv lock clean

# One venv for every target: the train set is the base dependencies; the test set adds the test,
# notebook and TPU-compiler extras to the same venv (same pins, so nothing already there changes).
$(VENV)/.installed-%: pyproject.toml requirements/build.in $(wildcard requirements/py*.txt)
	@if [ -z "$(PYTHON_FOUND)" ]; then \
	  echo "error: polyformer needs Python >= 3.12 (jax >= 0.11 does not support older Pythons)."; \
	  echo "       Install one (e.g. 'pyenv install 3.12' or your OS package python3.12) or pass PYTHON=/path/to/python3.12."; \
	  exit 1; fi
	@set -e; py=$(PYTHON_FOUND); [ -x $(PY) ] && py=$(PY); \
	if [ "$(LOCK)" != 0 ]; then $$py requirements/lock.py path $* >/dev/null; fi
	@[ -x $(PY) ] || { echo "creating $(VENV) with $(PYTHON_FOUND)"; $(PYTHON_FOUND) -m venv $(VENV); }
	@set -e; if [ "$(LOCK)" != 0 ]; then \
	  lock=$$($(PY) requirements/lock.py path $*); \
	  echo "installing $$lock (exact versions) into $(VENV)"; \
	  $(PY) -m pip install -q --disable-pip-version-check "$$(grep -m1 -o '^pip==[^ ]*' $$lock)"; \
	  $(PY) -m pip install -q --only-binary :all: -r $$lock; \
	  PYTHONWARNINGS=ignore $(PY) -m pip install -q --no-deps --no-build-isolation -e .; \
	  rm -f $(VENV)/.unlocked; \
	else \
	  extra=$$([ "$*" = train ] || echo "[$*]"); \
	  echo "LOCK=0: installing the unlocked ranges of pyproject.toml (unsupported)"; \
	  $(PY) -m pip install -q --upgrade pip setuptools; \
	  $(PY) -m pip install -q -e ".$$extra"; \
	  touch $(VENV)/.unlocked; \
	fi
	@touch $@

venv: $(VENV)/.installed-test

train: $(VENV)/.installed-train
	$(PY) -m trainer.main --config=configs/lm.py:default --workdir=runs/lm $(ARGS)

test: $(VENV)/.installed-test
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(ARGS)

# every benchmark, quick budgets (18 min on 2 idle cores; ARGS=--full: the documented ones), tables to
# bench/results/*.md and the README's generated tables (bench/all.py)
bench: $(VENV)/.installed-test
	$(PY) bench/all.py $(ARGS)

# regenerate every lock file (requirements/py*-{train,test}.txt) with uv; UPGRADE=1 moves every
# package to the newest version pyproject.toml allows (README: "Dependencies and the lock")
lock:
	@[ -x $(PY) ] || { [ -n "$(PYTHON_FOUND)" ] || { echo "error: make lock needs Python >= 3.12"; exit 1; }; \
	  echo "creating $(VENV) with $(PYTHON_FOUND)"; $(PYTHON_FOUND) -m venv $(VENV); }
	$(PY) -m pip install -q "uv==$(UV_VERSION)"
	UV=$(VENV)/bin/uv $(PY) requirements/lock.py compile $(if $(filter 1,$(UPGRADE)),--upgrade)

clean:
	rm -rf $(VENV) runs

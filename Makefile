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

.PHONY: train test bench venv clean

$(VENV)/.installed-%: pyproject.toml
	@if [ -z "$(PYTHON_FOUND)" ]; then \
	  echo "error: polyformer needs Python >= 3.12 (jax >= 0.11 does not support older Pythons)."; \
	  echo "       Install one (e.g. 'pyenv install 3.12' or your OS package python3.12) or pass PYTHON=/path/to/python3.12."; \
	  exit 1; fi
	@[ -x $(PY) ] || { echo "creating $(VENV) with $(PYTHON_FOUND)"; $(PYTHON_FOUND) -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip >/dev/null
	$(PY) -m pip install -q -e '.[$*]'
	@touch $@

venv: $(VENV)/.installed-test

train: $(VENV)/.installed-test
	$(PY) -m trainer.main --config=configs/lm.py:default --workdir=runs/lm $(ARGS)

test: $(VENV)/.installed-test
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(ARGS)

# every benchmark, quick budgets (18 min on 2 idle cores; ARGS=--full: the documented ones), tables to
# bench/results/*.md and the README's generated tables (bench/all.py)
bench: $(VENV)/.installed-test
	$(PY) bench/all.py $(ARGS)

clean:
	rm -rf $(VENV) runs

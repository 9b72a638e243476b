# Every target creates .venv and installs the package when needed: no set-up required.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench docs clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# The main job: data hyper-cleaning on digits, three solvers, same budget, ranked by
# test accuracy after refitting; table + plot. --force: replace the previous demo's files.
demo: $(STAMP)
	$(VENV)/bin/bilevel compare hypercleaning --solvers implicitdiff,unrolled,slbamm \
		--steps 1000 --out runs/demo --force

test: $(STAMP)
	$(PY) -m pytest

# Lint and format check (ruff, configured in pyproject.toml); CI runs it before the tests.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

DOCS_STAMP := $(VENV)/.installed-docs

$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	$(VENV)/bin/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) .pytest_cache

# Quick start: `make demo` and `make test` each set up .venv (if missing),
# install the project with the extra they need, and run the demo / the fast
# test tier. `make test-all` runs every test; CI (.ci/run) runs `make lint`,
# `make docs` and `make test-all`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST := $(PY) -m pytest -q -n 2 --dist loadfile --durations=15

.PHONY: demo test test-all lint docs bench venv clean

# One stamp per extra set: a target installs only what it needs, again when
# pyproject.toml changes.
$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed-%: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[$*]'
	touch $@

# Everything a contributor needs (every extra).
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[examples,test,docs,lint]'
	touch $@

demo: $(VENV)/.installed-examples
	$(PY) examples/demo.py

# Fast tier: every module and public function, tests marked `slow` left out.
test: $(VENV)/.installed-test
	$(PYTEST) -m "not slow" tests

test-all: $(VENV)/.installed-test
	$(PYTEST) tests

lint: $(VENV)/.installed-lint
	$(VENV)/bin/ruff check gbn_jax examples benchmarks docs/results tests
	$(VENV)/bin/ruff format --check gbn_jax
	$(VENV)/bin/mypy

docs: $(VENV)/.installed-docs
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

bench: $(VENV)/.installed-examples
	$(PY) benchmarks/speed.py

clean:
	rm -rf $(VENV) build site *.egg-info

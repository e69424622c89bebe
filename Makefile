# Developer entry points. `make demo` for a first look, `make test` for the suite, `make check`
# before pushing. `.ci/run` calls these targets with the real services configured.

VENV ?= .venv
# The venv is created with Python 3.11 (pyproject: requires-python >= 3.11).
PYTHON ?= python3.11
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Extra pytest arguments, e.g. `make test PYTEST_ARGS="-k slurm -x"`.
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install demo test lint typecheck check slurm-up clean distclean

help:
	@echo "make demo       install, then run the embedded demo on http://127.0.0.1:8000 (PORT=8001: another port)"
	@echo "make test       install, then run the whole test suite"
	@echo "make lint       ruff check + ruff format --check"
	@echo "make typecheck  mypy"
	@echo "make check      lint + typecheck + test"
	@echo "make slurm-up   start a single-node SLURM cluster on this host (root)"
	@echo "make clean      remove caches and the install stamp; distclean also the venv and var/"

# scripts/make-venv.sh names the package to install when the venv module is missing (Debian).
$(PY):
	@scripts/make-venv.sh $(PYTHON) $(VENV)

# Re-installs only when pyproject.toml is newer than the stamp, so repeated runs are instant.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(STAMP)

# The port to serve on, e.g. `make demo PORT=8001` when 8000 is taken.
PORT ?=
demo: install
	$(PY) manage.py demo $(if $(PORT),--port $(PORT))

# Serial on purpose: on two cores, xdist's per-worker test database creation costs more than it
# saves for this suite (measured; see docs/operations.md). A non-zero pytest exit fails the
# target; exit code 5 (no tests collected) is called out because it would hide a broken suite.
test: install
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5) - failing" >&2; fi; \
	exit $$rc

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install
	$(VENV)/bin/mypy .

check: lint typecheck test

slurm-up:
	@if [ "$$(id -u)" -eq 0 ]; then scripts/slurm-up.sh; else sudo scripts/slurm-up.sh; fi

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache build *.egg-info $(STAMP)
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) var

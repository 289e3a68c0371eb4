# Two entry points for a fresh Debian/Ubuntu machine with Python 3.11+ (see README.md):
#   make demo   - create .venv, install shopfleet, run the demo on embedded defaults
#   make test   - create .venv with the dev extras, install the system packages the tests use, run the suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEVSTAMP := $(VENV)/.installed-dev
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: demo test venv dev system-deps fixtures lint bench screenshots clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(DEVSTAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP) $@

venv: $(STAMP)
dev: $(DEVSTAMP)

# Debian packages the full suite uses (browser, AVR toolchain and emulator, a sample video).
# Skipped without root; the tests that need them then say which package is missing.
system-deps:
	@bash scripts/install-system-deps.sh

demo: $(STAMP)
	$(VENV)/bin/shopfleet demo $(DEMO_ARGS)

test: $(DEVSTAMP) system-deps
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(DEVSTAMP)
	$(VENV)/bin/lint-imports

bench: $(DEVSTAMP)
	for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

# The README's dashboard screenshots, taken of the running demo in Debian's Chromium.
screenshots: $(DEVSTAMP)
	$(PY) scripts/screenshots.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

# Two entry points for a fresh Debian/Ubuntu machine with Python 3.11+ (see README.md):
#   make demo   - create .venv, install shopfleet with the demo extra, run the demo on embedded defaults
#   make test   - create .venv with the dev extra, install the system packages the tests use, lint, run the suite
# Installs use constraints.txt, the versions CI tests with ('make constraints' regenerates it).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEVSTAMP := $(VENV)/.installed-dev
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: demo test venv dev system-deps fixtures lint bench screenshots clean constraints packaging role-sizes images shop-in-a-box chaos

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[demo]'
	touch $@

$(DEVSTAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP) $@

venv: $(STAMP)
dev: $(DEVSTAMP)

# Debian packages the full suite uses (browser, AVR toolchain and emulator, a sample video).
# Skipped without root; the tests that need them then say which package is missing.
system-deps:
	@bash scripts/install-system-deps.sh

demo: $(STAMP)
	$(VENV)/bin/shopfleet demo $(DEMO_ARGS)

test: $(DEVSTAMP) system-deps lint
	$(PY) -m pytest $(PYTEST_ARGS)

# Import contracts (the layering of docs/architecture.md), ruff, and mypy (strict where pyproject says).
lint: $(DEVSTAMP)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# Pin what the extras pull, as installed in $(VENV), into constraints.txt (after changing a dependency).
constraints: $(DEVSTAMP)
	$(PY) scripts/freeze_constraints.py

# Build the wheel and install it per role into fresh venvs (tests/packaging, a few minutes).
packaging: $(DEVSTAMP)
	$(PY) -m pytest tests/packaging $(PYTEST_ARGS)

# Installed size of each role's venv (docs/benchmarks.md).
role-sizes: $(DEVSTAMP)
	$(PY) bench/role_sizes.py

# Container images of every component for amd64 and arm64, one multi-arch index each, pushed to a
# local docker-registry on 127.0.0.1:5000 (docs/images.md). Needs root, buildah, podman, debootstrap,
# qemu-user-static. IMAGES_ARGS passes options, e.g. IMAGES_ARGS='--images agent --arches amd64 --no-push'.
IMAGES_ARGS ?=
images:
	$(PYTHON) scripts/build_images.py $(IMAGES_ARGS)

# One shop on real containers from its rendered manifests (docs/images.md); needs 'make images'.
# The last line is a JSON summary: shop_online, events, model_verified, arm64_agent_online, image_mb.
shop-in-a-box: $(DEVSTAMP)
	$(PY) -m shopfleet.sim.shop_in_a_box

# The chaos tier at full size (docs/chaos.md): real Mosquitto from 'broker-config', agents, controllers,
# SQLite and PostgreSQL, under uplink cuts and kill -9s. 'make test' runs a short version of it.
# Prints one JSON summary per scenario (the lines starting CHAOS), gathered again at the end.
CHAOS_OUT ?= $(or $(TMPDIR),/tmp)/shopfleet-chaos-summary.jsonl
chaos: $(DEVSTAMP)
	rm -f $(CHAOS_OUT)
	SHOPFLEET_CHAOS=full SHOPFLEET_CHAOS_OUT=$(CHAOS_OUT) $(PY) -m pytest tests/chaos -m chaos -s -p no:cacheprovider $(PYTEST_ARGS); \
	  rc=$$?; echo "== chaos summaries ($(CHAOS_OUT))"; cat $(CHAOS_OUT) 2>/dev/null; exit $$rc

bench: $(DEVSTAMP)
	for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

# The README's dashboard screenshots, taken of the running demo in Debian's Chromium.
screenshots: $(DEVSTAMP)
	$(PY) scripts/screenshots.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

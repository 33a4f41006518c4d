# The two commands of the quick start. Both work on a fresh Debian machine with Python 3.11 and apt.
#   make demo   set up .venv, build the sample models, benchmark the loop, run the fleet demo
#   make test   set up .venv with the dev extras (and Mosquitto), run ruff and the whole test suite

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
MODELS := build/models

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-demo: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[models,signing,cloud]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

$(MODELS)/digits_mlp.onnx: $(wildcard models/*.py) | $(VENV)/.installed-demo
	$(BIN)/python models/build_all.py --out $(MODELS)

demo: $(VENV)/.installed-demo $(MODELS)/digits_mlp.onnx
	@echo "== edge-runtime bench: the agent loop against bare onnxruntime session.run =="
	$(BIN)/edge-runtime bench --model $(MODELS)/digits_mlp.onnx --seconds 2
	@echo
	@echo "== edge-runtime demo: a fleet of three, drift on one, retraining, a rollout (Ctrl-C ends it) =="
	$(BIN)/edge-runtime demo --duration 120

# Mosquitto (Debian's package) is the real broker the tests start on a free loopback port.
mosquitto:
	@if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian's mosquitto (tests start their own broker on loopback)"; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mosquitto >/dev/null; \
	else \
		echo "mosquitto is missing: run 'sudo apt-get install mosquitto' (the broker tests need it)"; \
	fi
.PHONY: mosquitto

# PostgreSQL (Debian's package): the store tests run their own throwaway server (initdb into a temp
# folder, a free loopback port); without it they skip the PostgreSQL half. The system service is not
# wanted: a policy-rc.d that refuses service starts is in place during the install (unless the machine
# has one already), and the unit is not enabled for the next boot.
postgresql:
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian's postgresql (tests start their own server; the system service stays off)"; \
		policy=; if [ ! -e /usr/sbin/policy-rc.d ]; then \
			printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && policy=1; fi; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null; \
		rc=$$?; [ -z "$$policy" ] || rm -f /usr/sbin/policy-rc.d; \
		if [ -d /run/systemd/system ]; then systemctl disable --quiet postgresql 2>/dev/null || :; fi; \
		exit $$rc; \
	else \
		echo "postgresql is missing: run 'sudo apt-get install postgresql' (else the PostgreSQL store tests skip)"; \
	fi
.PHONY: postgresql

# Chromium and its WebDriver (Debian's packages): the dashboard's end-to-end test drives them headless;
# without them it skips.
chromium:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian's chromium and chromium-driver (the dashboard's browser test)"; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; \
	else \
		echo "chromium is missing: run 'sudo apt-get install chromium chromium-driver' (else the browser test skips)"; \
	fi
.PHONY: chromium

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .

test: $(VENV)/.installed-dev mosquitto postgresql chromium lint
	$(BIN)/python -m pytest

bench: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/loop_overhead.py

clean:
	rm -rf $(VENV) build .pytest_cache .ruff_cache .hypothesis

# Raspberry Pi 4 and 5 under qemu-user: the agent installs, imports and serves on aarch64 (PI_CHECK_ARGS=--help).
pi-check: $(VENV)/.installed-demo $(MODELS)/digits_mlp.onnx
	$(BIN)/python devices/pi_check.py $(PI_CHECK_ARGS)
.PHONY: pi-check

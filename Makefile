# podtally — every target installs what it needs; run as root for the netns/iptables tests.
# Debian's /usr/bin/python3.11 backs the venv so the sidecar can run from it as uid 1337
# (a pyenv Python under /root is not executable by other users).
PYTHON ?= $(shell test -x /usr/bin/python3.11 && echo /usr/bin/python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
APT_PACKAGES := iptables iproute2 util-linux curl ca-certificates

.PHONY: all venv system-deps test lint demo bench clean

all: test

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade 'pip>=25.1'
	$(BIN)/python -m pip install -q --disable-pip-version-check -e . --group test --group lint
	touch $@

venv: $(STAMP)

# Debian packages the real-network tests use; installed only when missing, only as root.
system-deps:
	@if [ "$$(id -u)" = 0 ]; then \
	  missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  fi; \
	else echo "not root: skipping Debian packages ($(APT_PACKAGES))"; fi

lint: venv
	$(BIN)/ruff check src tests demo $(wildcard bench)
	$(BIN)/mypy
	$(BIN)/lint-imports

test: venv system-deps lint
	$(BIN)/python -m pytest

demo: venv
	$(BIN)/python demo/run_demo.py

bench: venv
	$(BIN)/python bench/bench_sidecar.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache

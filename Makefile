# peerd — everyday commands. `make demo` runs a node with sample media; `make test` passes the tests.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
APT_PACKAGES := python3-venv python3-dev build-essential pkg-config ffmpeg nginx wrk rclone \
	chromium chromium-driver shellcheck iproute2 curl sqlite3 systemd time
STAMP_APT := $(VENV)/.apt-done
STAMP_PIP := $(VENV)/.pip-done
PYTEST_ARGS ?=

.PHONY: install install-apt check test test-fast demo bench clean web-deps js-deps

install: $(STAMP_PIP)

install-apt: $(STAMP_APT)

# System packages the tests and benches use (ffmpeg/ffprobe as an independent HLS client,
# chromium for pages and WebRTC, nginx/wrk/rclone as benchmark anchors, shellcheck, systemd-analyze).
$(STAMP_APT):
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	command -v npm >/dev/null 2>&1 || missing="$$missing nodejs npm"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi
	@mkdir -p $(VENV) && touch $@

$(STAMP_PIP): pyproject.toml $(STAMP_APT)
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

# Browser-side test dependencies (hls.js for the HLS playback test), pinned, outside the package.
# The node serves hls.js and P2P Media Loader from here to its swarm player (/swarm/lib/).
# --ignore-scripts: the browser bundles need none, and a Node WebRTC build step would download.
HLSJS_VERSION := 1.7.4
P2PML_VERSION := 2.3.1
WEB_DIR := $(VENV)/web
WEB_PKGS := hls.js@$(HLSJS_VERSION) p2p-media-loader-core@$(P2PML_VERSION) \
	p2p-media-loader-hlsjs@$(P2PML_VERSION)
web-deps: $(WEB_DIR)/.installed-$(HLSJS_VERSION)-$(P2PML_VERSION)

$(WEB_DIR)/.installed-$(HLSJS_VERSION)-$(P2PML_VERSION): $(STAMP_APT)
	mkdir -p $(WEB_DIR)
	npm install --prefix $(WEB_DIR) --ignore-scripts --no-audit --no-fund --no-save $(WEB_PKGS)
	@test -f $(WEB_DIR)/node_modules/p2p-media-loader-hlsjs/dist/p2p-media-loader-hlsjs.es.min.js
	@touch $@

# js-libp2p 2.x (the reference libp2p) for the interop test, exactly as locked in
# tests/js/package-lock.json, with its own Node 20 binary on x64 (Debian 12's nodejs is 18).
JS_DIR := tests/js
js-deps: $(JS_DIR)/node_modules/.installed

$(JS_DIR)/node_modules/.installed: $(JS_DIR)/package.json $(JS_DIR)/package-lock.json $(STAMP_APT)
	npm ci --prefix $(JS_DIR) --no-audit --no-fund
	@touch $@

check: install
	$(BIN)/ruff check peerd tests scripts
	$(BIN)/ruff format --check peerd tests scripts
	$(BIN)/mypy

test: install check web-deps js-deps
	$(BIN)/python -m pytest -n 2 --dist loadfile $(PYTEST_ARGS)

test-fast: install web-deps js-deps
	$(BIN)/python -m pytest -x -q $(PYTEST_ARGS)

# Run a node on embedded defaults with generated sample media; prints a playback URL.
demo: install
	$(BIN)/python -m peerd.demo

bench: install
	bash scripts/bench/run_all.sh

clean:
	rm -rf $(VENV) $(JS_DIR)/node_modules .state build *.egg-info .mypy_cache .ruff_cache .pytest_cache

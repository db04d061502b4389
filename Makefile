# accelmesh: every target creates or updates .venv itself, and is a fast no-op when it is current.
#   make run    start a daemon in the foreground with embedded defaults (loopback, data dir .data/node)
#   make test   install what is missing, then run the whole test suite (CI runs exactly this)
#   make demo   a 3-node cluster on loopback: prompts streamed through one node, served by all three
#   make bench  run the benchmarks and rewrite docs/performance.md
#   make image         the CPU container image, built without an image registry (deploy/docker/cluster.sh)
#   make cluster-test  that image as a 3-node cluster on loopback, checked, then removed (not part of `make test`)

PYTHON      ?= python3.11
VENV        := .venv
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.accelmesh-installed
SYS_STAMP   := $(VENV)/.accelmesh-system-packages
# Debian/Ubuntu's venv support for $(PYTHON) (ensurepip) is a package of its own.
VENV_PACKAGE := $(notdir $(PYTHON))-venv
SYSTEM_PACKAGES := build-essential python3-dev $(VENV_PACKAGE) libgmp-dev systemd curl prometheus shellcheck
TORCH_PIN   := torch==2.13.0
PYTEST_ARGS ?=

.PHONY: run test test-lan bench demo venv clean system-packages image cluster-test

venv: $(STAMP)

system-packages: $(SYS_STAMP)

# System packages that pip cannot provide: a compiler and GMP for fastecdsa (a libp2p dependency),
# python3.11-venv so that `$(PYTHON) -m venv` works (it counts as present when $(PYTHON) can
# already make a venv, e.g. a pyenv or source build), systemd for `systemd-analyze verify` of
# deploy/systemd/accelmesh.service in the tests, prometheus for `promtool check rules|config` and
# shellcheck for deploy/docker/cluster.sh in tests/deploy (Debian's prometheus package also installs
# the Prometheus server as a service), and Node.js with npm (>= 20.19) for the
# js-libp2p interop test (a NodeSource nodejs ships npm itself). Checked once: the stamp in
# $(VENV) makes later runs a no-op (`make clean` removes it).
$(SYS_STAMP):
	@missing=""; for p in $(SYSTEM_PACKAGES); do \
	  if [ "$$p" = "$(VENV_PACKAGE)" ]; then \
	    $(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || missing="$$missing $$p"; continue; \
	  fi; \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	{ command -v node && command -v npm; } >/dev/null || missing="$$missing nodejs npm"; \
	if [ -n "$$missing" ]; then \
	  echo "accelmesh: installing missing system packages:$$missing (apt-get)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null; then SUDO=sudo; \
	  else echo "accelmesh: need root or sudo to install:$$missing" >&2; exit 1; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing || exit 1; \
	fi
	@test -x $(BIN)/python || { echo "accelmesh: creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); }
	@touch $@

# torch first and pinned: an unpinned torch would resolve to a multi-GB CUDA build.
$(STAMP): pyproject.toml $(SYS_STAMP)
	@echo "accelmesh: installing $(TORCH_PIN), then .[hf,embed,dev] into $(VENV)"
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q $(TORCH_PIN)
	$(BIN)/python -m pip install -q -e '.[hf,embed,dev]'
	@touch $@

RUN_DATA    := .data/node

# The daemon with embedded defaults: loopback only, echo and the embedded tiny model (preloaded).
run: $(STAMP)
	@echo "accelmesh: starting a daemon on loopback, data dir $(RUN_DATA); Ctrl-C stops it."
	@echo "accelmesh: from a second terminal:"
	@echo "    $(BIN)/accelmesh generate \"Hello, mesh\" --provider echo --json --data-dir $(RUN_DATA)"
	@echo "    $(BIN)/accelmesh generate \"Hello, mesh\" --stream --data-dir $(RUN_DATA)"
	@echo "    $(BIN)/accelmesh info --data-dir $(RUN_DATA)"
	@echo "accelmesh: the OpenAI-compatible API (docs/api.md) at http://127.0.0.1:8400/v1:"
	@echo "    curl -s http://127.0.0.1:8400/v1/chat/completions -H 'content-type: application/json' -d '{\"model\": \"echo\", \"messages\": [{\"role\": \"user\", \"content\": \"Hello, mesh\"}]}'"
	$(BIN)/accelmesh daemon --data-dir $(RUN_DATA) --listen /ip4/127.0.0.1/tcp/0 --http 127.0.0.1:8400 --providers-hf-local-preload

# pytest exits 5 when it collects nothing: that is a failure too (make fails on any non-zero exit).
test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Real mDNS between two daemons: multicast leaves loopback, so it is not part of `make test`.
test-lan: $(STAMP)
	$(BIN)/python -m pytest -m lan tests/mesh

demo: $(STAMP)
	$(BIN)/python -m node.demo

bench: $(STAMP)
	$(BIN)/python -m tests.benchmarks.run

# The CPU image and a 3-node cluster from it, without an image registry: a debootstrapped Debian base,
# a wheelhouse filled on the host, `docker build`, three containers on the host network (loopback).
# Needs dockerd running, debootstrap and root (apt-get install docker.io debootstrap); about 10
# minutes the first time. Not part of `make test`.
image: $(STAMP)
	TORCH_PIN=$(TORCH_PIN) PYTHON=$(BIN)/python deploy/docker/cluster.sh image

cluster-test: $(STAMP)
	TORCH_PIN=$(TORCH_PIN) PYTHON=$(BIN)/python deploy/docker/cluster.sh test

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis

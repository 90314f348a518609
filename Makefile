# Every target bootstraps what it needs from this repository's own files.
# CACHE holds the virtualenv and Go caches; CI points it at a directory that outlives the clone.
SHELL := /bin/bash
PYTHON ?= python3.11
CACHE ?= $(CURDIR)/.cache
UV_VERSION := 0.13.8
VENV_KEY := $(shell cat pyproject.toml | sha256sum | cut -c1-12)
VENV := $(CACHE)/venv-$(VENV_KEY)
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export UV_CACHE_DIR := $(CACHE)/uv
export PATH := $(VENV)/bin:$(CACHE)/bin:$(PATH)
export CC_CACHE_DIR := $(CACHE)

.PHONY: venv demo test unit lint bench cluster-tools cluster-up cluster-down clean

UV := $(CACHE)/uv-$(UV_VERSION)/bin/uv

# The venv may outlive this checkout (CI keeps CACHE outside the clone), so the editable install of the
# project itself is redone, cheaply and without dependencies, whenever the checkout's path differs.
venv: $(STAMP)
	@[ "$$(cat $(STAMP))" = "$(CURDIR)" ] || { $(UV) pip install -q --no-deps --python $(PY) -e . && \
	  echo "$(CURDIR)" > $(STAMP); }

$(STAMP): pyproject.toml
	@mkdir -p $(CACHE)
	@test -x $(UV) || { $(PYTHON) -m venv $(CACHE)/uv-$(UV_VERSION) && \
	  $(CACHE)/uv-$(UV_VERSION)/bin/pip install -q uv==$(UV_VERSION); }
	$(UV) venv -q --python $(PYTHON) --allow-existing $(VENV)
	$(UV) pip install -q --compile-bytecode --python $(PY) -e '.[test,bench]'
	@echo "$(CURDIR)" > $@

cluster-tools:
	@tests/cluster/tools/build.sh $(CACHE)

# A control plane (etcd, kube-apiserver, scheduler, controller-manager, kwok A100 pool) and MinIO for a
# person to explore with kubectl; prints the exports to use it.
cluster-up: venv cluster-tools
	$(PY) -m tests.cluster.cli up

cluster-down: venv
	$(PY) -m tests.cluster.cli down

demo: venv
	$(PY) -m commoncanvas.demo

test: venv cluster-tools
	$(PY) -m pytest -q -ra

unit: venv
	$(PY) -m pytest -q tests/unit

lint: venv
	$(PY) -m ruff check services operator tests bench
	$(PY) -m ruff format --check services operator tests bench
	$(PY) -m mypy

bench: venv
	$(PY) -m bench

clean:
	rm -rf .cache

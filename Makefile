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

venv: $(STAMP)

$(STAMP): pyproject.toml
	@mkdir -p $(CACHE)
	@test -x $(CACHE)/uv-$(UV_VERSION)/bin/uv || { $(PYTHON) -m venv $(CACHE)/uv-$(UV_VERSION) && \
	  $(CACHE)/uv-$(UV_VERSION)/bin/pip install -q uv==$(UV_VERSION); }
	$(CACHE)/uv-$(UV_VERSION)/bin/uv venv -q --python $(PYTHON) --allow-existing $(VENV)
	$(CACHE)/uv-$(UV_VERSION)/bin/uv pip install -q --compile-bytecode --python $(PY) -e '.[test,bench]'
	@touch $@

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

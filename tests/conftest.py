"""Shared pytest setup: the real-component fixtures (control plane, MinIO) live in tests/cluster."""

import os

pytest_plugins = ["tests.cluster.fixtures"]

# Tests and the demo never reach a model hub: every model is built locally from a config.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

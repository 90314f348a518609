"""Shared pytest setup: the real-component fixtures (control plane, MinIO) live in tests/cluster."""

import os
import resource

pytest_plugins = ["tests.cluster.fixtures"]

# Tests and the demo never reach a model hub: every model is built locally from a config.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Every StreamingDataset made in this one long process (training runs in-process) keeps its shared
# memory, and the prefixes left by killed runs, open until exit; a container's limit is ~1M, a login
# shell's often 1024. Workers read units without one (commoncanvas.mds.UnitShards, tested for leaks).
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
_wanted = 1 << 16 if _hard == resource.RLIM_INFINITY else min(_hard, 1 << 16)
if _soft != resource.RLIM_INFINITY and _soft < _wanted:
    resource.setrlimit(resource.RLIMIT_NOFILE, (_wanted, _hard))

"""Which series a worker process puts on /metrics."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
from prometheus_client import REGISTRY, generate_latest
from commoncanvas import metrics
metrics.initialize("scrape")
before = generate_latest(REGISTRY).decode()
metrics.export_training()
metrics.export_training()
after = generate_latest(REGISTRY).decode()
initialized = 'split="commercial",stage="scrape"' in before
print("train_step" in before, "commoncanvas_train_step 0.0" in after, initialized)
"""


def test_training_series_appear_only_where_training_exports_them() -> None:
    """A scrape pod, or rank 3 of a run, must not report a training step of 0 (it would look stalled)."""
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "True", "True"]

"""A worker's /metrics outlives its work by METRICS_LINGER_SECONDS, so a short pod's final counts are
scraped; without it the endpoint goes with the process."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request

import pytest
from tests.cluster.processes import free_port

pytestmark = pytest.mark.integration

WORKER = """
from commoncanvas import metrics
metrics.serve({port}, stage="scrape")
metrics.unit_finished("scrape", written=7, seconds=1.0)
print("work done", flush=True)
"""


def run_worker(port: int, linger: str) -> subprocess.Popen[str]:
    env = {**os.environ, "METRICS_LINGER_SECONDS": linger}
    return subprocess.Popen(
        [sys.executable, "-c", WORKER.format(port=port)], env=env, stdout=subprocess.PIPE, text=True
    )


def test_metrics_stay_up_after_the_work_for_the_linger_time() -> None:
    port = free_port()
    worker = run_worker(port, "30")
    try:
        assert worker.stdout is not None and worker.stdout.readline().strip() == "work done"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
        assert 'commoncanvas_units_total{result="succeeded",stage="scrape"} 1.0' in text
        assert 'commoncanvas_images_per_second{stage="scrape"} 7.0' in text
        # Initialized at 0 before the work, so rate() sees the first sample's increase.
        assert 'commoncanvas_samples_total{outcome="ok",split="noncommercial",stage="scrape"} 0.0' in text
        assert worker.poll() is None, "the process must still be serving"
    finally:
        worker.terminate()
        worker.wait(10)


def test_without_linger_the_process_exits_when_done() -> None:
    worker = run_worker(free_port(), "0")
    assert worker.wait(60) == 0

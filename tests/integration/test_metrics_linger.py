"""METRICS_LINGER_SECONDS: a short worker waits for its first scrape before it works and keeps /metrics
up after it, so both its zeros and its final counts are scraped; without it nothing waits."""

from __future__ import annotations

import os
import subprocess
import sys
import time
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


def scrape(port: int, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
                return str(response.read().decode())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_a_short_worker_is_scraped_before_and_after_its_work() -> None:
    """With a linger, the work waits for the first scrape (its zeros), and /metrics outlives it."""
    port = free_port()
    worker = run_worker(port, "30")
    try:
        before = scrape(port)
        assert 'commoncanvas_units_total{result="succeeded",stage="scrape"} 0.0' in before
        assert worker.stdout is not None and worker.stdout.readline().strip() == "work done"
        after = scrape(port)
        assert 'commoncanvas_units_total{result="succeeded",stage="scrape"} 1.0' in after
        assert 'commoncanvas_images_per_second{stage="scrape"} 7.0' in after
        assert 'commoncanvas_samples_total{outcome="ok",split="noncommercial",stage="scrape"} 0.0' in after
        assert worker.poll() is None, "the process must still be serving"
    finally:
        worker.terminate()
        worker.wait(10)


def test_without_linger_the_process_exits_when_done() -> None:
    worker = run_worker(free_port(), "0")
    assert worker.wait(60) == 0

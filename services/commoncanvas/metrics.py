"""Prometheus metrics of the workers (`commoncanvas_*`, labelled by stage, split and outcome)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

SAMPLES = Counter(
    "commoncanvas_samples_total", "Samples processed, by outcome", ["stage", "split", "outcome"]
)
BYTES = Counter("commoncanvas_bytes_total", "Bytes of samples written", ["stage", "split"])
UNITS = Counter("commoncanvas_units_total", "Work units finished, by result", ["stage", "result"])
IMAGES_PER_SECOND = Gauge("commoncanvas_images_per_second", "Throughput of the last finished unit", ["stage"])
FETCH_SECONDS = Histogram(
    "commoncanvas_fetch_seconds",
    "Latency of one HTTP fetch attempt",
    ["host"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
UNIT_SECONDS = Histogram(
    "commoncanvas_unit_seconds",
    "Wall time of one work unit",
    ["stage"],
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600),
)

BATCH_SECONDS = Histogram(
    "commoncanvas_batch_seconds",
    "Wall time of one model batch",
    ["stage"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64),
)
GPU_MEMORY_BYTES = Gauge(
    "commoncanvas_gpu_memory_bytes", "Peak GPU memory allocated by the worker", ["stage"]
)
OOM_BACKOFFS = Counter(
    "commoncanvas_oom_backoffs_total", "CUDA out-of-memory errors survived by halving the batch", ["stage"]
)


def serve(port: int) -> None:
    """Expose /metrics on `port` (0 = don't)."""
    if port:
        start_http_server(port)

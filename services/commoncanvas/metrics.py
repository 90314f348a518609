"""Prometheus metrics of the workers (`commoncanvas_*`, labelled by stage, split and outcome)."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, Metric, start_http_server
from prometheus_client.registry import Collector

from commoncanvas.redact import bare_host

LINGER_ENV = "METRICS_LINGER_SECONDS"
SAMPLES = Counter(
    "commoncanvas_samples_total", "Samples processed, by outcome", ["stage", "split", "outcome"]
)
BYTES = Counter("commoncanvas_bytes_total", "Bytes of samples written", ["stage", "split"])
UNITS = Counter("commoncanvas_units_total", "Work units finished, by result", ["stage", "result"])
MODEL_LOADS = Counter(
    "commoncanvas_model_loads_total", "Models loaded by workers (one per worker, not per unit)", ["stage"]
)
IMAGES_PER_SECOND = Gauge("commoncanvas_images_per_second", "Throughput of the last finished unit", ["stage"])
FETCH_SECONDS = Histogram(
    "commoncanvas_fetch_seconds",
    "Latency of one HTTP fetch attempt",
    ["host"],  # the bare host name only: see observe_fetch
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

# An EvalRun's numbers, one series per guidance scale (set by its finalize: commoncanvas eval finalize).
EVAL_LABELS = ["evalrun", "guidance_scale"]
EVAL_GAUGES = {
    "fid": Gauge("commoncanvas_eval_fid", "FID (clean-fid, InceptionV3) against the references", EVAL_LABELS),
    "kid": Gauge("commoncanvas_eval_kid", "KID (clean-fid) against the references", EVAL_LABELS),
    "clipFid": Gauge("commoncanvas_eval_clip_fid", "FID over CLIP image features", EVAL_LABELS),
    "clipScore": Gauge("commoncanvas_eval_clip_score", "Mean CLIP score of images and prompts", EVAL_LABELS),
}


def record_evaluation(evalrun: str, rows: Iterable[Mapping[str, Any]]) -> None:
    """An EvalRun's results rows (commoncanvas.eval.score) as gauges."""
    for row in rows:
        scale = f"{row['guidanceScale']:g}"
        for name, gauge in EVAL_GAUGES.items():
            if row.get(name) is not None:
                gauge.labels(evalrun, scale).set(row[name])


# Training (rank 0 of a TrainRun); images/s and GPU memory use the shared gauges with stage="train".
# Kept out of /metrics until `export_training`: other workers, and the other ranks, would report a
# step of 0 forever (and look stalled to the TrainingStalled alert).
TRAIN_STEP = Gauge("commoncanvas_train_step", "Optimizer steps done", registry=None)
TRAIN_IMAGES_SEEN = Gauge(
    "commoncanvas_train_images_seen", "Images trained on so far (all ranks)", registry=None
)
TRAIN_LOSS = Gauge("commoncanvas_train_loss", "Loss of the last step, mean over ranks", registry=None)
TRAIN_LEARNING_RATE = Gauge(
    "commoncanvas_train_learning_rate", "Learning rate of the last step", registry=None
)
TRAIN_STEP_SECONDS = Histogram(
    "commoncanvas_train_step_seconds",
    "Wall time of one optimizer step (data, forward, backward, all-reduce, update)",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64),
    registry=None,
)
TRAIN_RESTARTS = Gauge(
    "commoncanvas_train_restarts", "Restarts of the process group (TORCHELASTIC_RESTART_COUNT)", registry=None
)
TRAIN_MFU = Gauge(
    "commoncanvas_train_mfu",
    "Model FLOPs utilization: UNet training FLOPs/s over peak FLOPs/s",
    registry=None,
)
TRAIN_LAST_CHECKPOINT = Gauge(
    "commoncanvas_train_last_checkpoint_timestamp_seconds",
    "Unix time at which the newest checkpoint was published (its `latest` pointer written)",
    registry=None,
)
TRAIN_SKIPPED_STEPS = Counter(
    "commoncanvas_train_skipped_steps_total",
    "Optimizer steps skipped because the loss or a gradient was NaN or infinite (on any rank)",
    registry=None,
)
TRAIN_STAGE = Gauge(
    "commoncanvas_train_stage",
    "The resolution stage (spec.schedule.stages) training is in, 1-based; labelled with its resolution",
    ["resolution"],
    registry=None,
)
TRAINING = (
    TRAIN_STEP,
    TRAIN_STAGE,
    TRAIN_IMAGES_SEEN,
    TRAIN_LOSS,
    TRAIN_LEARNING_RATE,
    TRAIN_STEP_SECONDS,
    TRAIN_RESTARTS,
    TRAIN_MFU,
    TRAIN_LAST_CHECKPOINT,
    TRAIN_SKIPPED_STEPS,
)


def expect_hosts(urls: Iterable[str]) -> None:
    """Create the fetch-latency series of the hosts a unit is about to fetch from at 0, then, where
    workers linger for short scrapes, wait for one scrape: a series born with its only observations
    shows rate() no increase."""
    for host in {bare_host(url) or "-" for url in urls}:
        FETCH_SECONDS.labels(host=host)
    if _scrapes is not None:
        _scrapes.wait_for_next(_linger_seconds)


def observe_fetch(url: str, seconds: float) -> None:
    """One HTTP attempt's latency, labelled by the bare host name: a URL's userinfo (credentials),
    port and path never reach /metrics."""
    FETCH_SECONDS.labels(host=bare_host(url) or "-").observe(seconds)


def export_training() -> None:
    """Put the run's training series on this process's /metrics (rank 0 does; idempotent)."""
    for collector in TRAINING:
        with contextlib.suppress(ValueError):  # already registered
            REGISTRY.register(collector)


def unit_finished(stage: str, written: int, seconds: float) -> None:
    """What every stage records when a work unit's marker is written."""
    UNITS.labels(stage, "succeeded").inc()
    UNIT_SECONDS.labels(stage).observe(seconds)
    IMAGES_PER_SECOND.labels(stage).set(written / seconds if seconds else 0)


def initialize(stage: str) -> None:
    """Create a stage's labelled series at 0 before the first sample: rate() sees no increase in a
    counter whose first scrape already holds it, and a unit pod's counters are born with its work."""
    from commoncanvas.licenses import Split

    for split in Split:
        SAMPLES.labels(stage, split, "ok")
        BYTES.labels(stage, split)
    UNITS.labels(stage, "succeeded")
    MODEL_LOADS.labels(stage)
    UNIT_SECONDS.labels(stage)
    BATCH_SECONDS.labels(stage)


_scrapes: _FirstScrape | None = None  # set by serve() when workers linger for short scrapes
_linger_seconds = 0.0


def serve(port: int, stage: str | None = None, linger_seconds: float | None = None) -> None:
    """Expose /metrics on `port` (0 = don't), with `stage`'s series initialized.

    `linger_seconds` (default: $METRICS_LINGER_SECONDS, else 0) is for pods shorter than the scrape
    interval: the process waits up to that long for its first scrape before it works (so the zeros
    are seen, and rate() counts the work), and keeps /metrics up that long after it is done (so the
    final counts are seen).
    """
    if not port:
        return
    if stage:
        initialize(stage)
    if linger_seconds is None:
        linger_seconds = float(os.environ.get(LINGER_ENV) or 0)
    global _scrapes, _linger_seconds
    watch = _FirstScrape()
    if linger_seconds > 0:
        REGISTRY.register(watch)
        _scrapes, _linger_seconds = watch, linger_seconds
    try:
        start_http_server(port)
    except OSError as error:  # metrics are advisory; the work is not (a port taken where pods share a host)
        logging.getLogger(__name__).warning("not serving /metrics on port %d: %s", port, error)
        return
    if linger_seconds > 0:
        watch.seen.wait(linger_seconds)
        atexit.register(time.sleep, linger_seconds)


class _FirstScrape(Collector):
    """Collects nothing; notes that /metrics has been read (every scrape collects the registry)."""

    def __init__(self) -> None:
        self.seen = threading.Event()
        self.count = 0
        self.changed = threading.Condition()

    def wait_for_next(self, timeout: float) -> None:
        with self.changed:
            seen = self.count
            self.changed.wait_for(lambda: self.count > seen, timeout)

    def describe(self) -> list[Metric]:
        return []  # registering must not count as a scrape

    def collect(self) -> list[Metric]:
        self.seen.set()
        with self.changed:
            self.count += 1
            self.changed.notify_all()
        return []

"""The operator's own Prometheus metrics (``commoncanvas_operator_*``), served on /metrics."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from prometheus_client import Counter, Gauge, Histogram

RECONCILES = Counter(
    "commoncanvas_operator_reconciles", "Reconcile passes by kind and result (ok, error)", ["kind", "result"]
)
RECONCILE_SECONDS = Histogram(
    "commoncanvas_operator_reconcile_seconds", "Time one reconcile pass took", ["kind"]
)
RESOURCES = Gauge(
    "commoncanvas_operator_resources", "Resources by kind and phase", ["kind", "namespace", "name", "phase"]
)
API_REQUESTS = Counter(
    "commoncanvas_operator_api_requests",
    "Requests the reconciler sent to the API server (kopf's own watches, peering and indexes aside), by"
    " verb and resource (jobs, pods, configmaps, ...)",
    ["verb", "resource"],
)
SKIPPED = Counter(
    "commoncanvas_operator_finished_skips",
    "Reconcile passes over a finished, unchanged resource: no request sent",
    ["kind"],
)
UNITS_DONE = Gauge("commoncanvas_operator_units_done", "Units succeeded", ["kind", "namespace", "name"])
UNITS_PLANNED = Gauge("commoncanvas_operator_units_planned", "Units planned", ["kind", "namespace", "name"])


@contextlib.contextmanager
def reconcile_pass(kind: str) -> Iterator[None]:
    """Count one reconcile pass by result and time it."""
    started = time.monotonic()
    try:
        yield
    except Exception:
        RECONCILES.labels(kind, "error").inc()
        raise
    else:
        RECONCILES.labels(kind, "ok").inc()
    finally:
        RECONCILE_SECONDS.labels(kind).observe(time.monotonic() - started)


def record(kind: str, namespace: str, name: str, status: dict[str, object], phases: tuple[str, ...]) -> None:
    """One resource's phase (1 for the current phase, 0 for the others) and unit progress."""
    phase = status.get("phase")
    for candidate in phases:
        RESOURCES.labels(kind, namespace, name, candidate).set(1 if candidate == phase else 0)
    units = status.get("units")
    if isinstance(units, dict):
        UNITS_DONE.labels(kind, namespace, name).set(float(units.get("succeeded", 0)))
        UNITS_PLANNED.labels(kind, namespace, name).set(float(units.get("total", 0)))


def forget(kind: str, namespace: str, name: str, phases: tuple[str, ...]) -> None:
    """Drop a deleted resource's series so the gauges do not report it forever."""
    for phase in phases:
        with contextlib.suppress(KeyError):
            RESOURCES.remove(kind, namespace, name, phase)
    for gauge in (UNITS_DONE, UNITS_PLANNED):
        with contextlib.suppress(KeyError):
            gauge.remove(kind, namespace, name)

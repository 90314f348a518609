"""The operator's gauges: a resource's phase and unit progress, dropped when it is deleted."""

from __future__ import annotations

from prometheus_client import REGISTRY

from commoncanvas_operator import metrics

PHASES = ("Pending", "Running", "Succeeded", "Failed")
LABELS = {"kind": "ScrapeJob", "namespace": "cc", "name": "metrics-test"}


def value(name: str, **extra: str) -> float | None:
    return REGISTRY.get_sample_value(name, {**LABELS, **extra})


def test_record_sets_phase_and_units_and_forget_drops_them() -> None:
    status = {"phase": "Running", "units": {"total": 12, "succeeded": 5}}
    metrics.record("ScrapeJob", "cc", "metrics-test", status, PHASES)
    assert value("commoncanvas_operator_units_planned") == 12
    assert value("commoncanvas_operator_units_done") == 5
    assert value("commoncanvas_operator_resources", phase="Running") == 1
    assert value("commoncanvas_operator_resources", phase="Failed") == 0
    assert value("commoncanvas_operator_units_total") is None  # a gauge, not named like a counter

    metrics.forget("ScrapeJob", "cc", "metrics-test", PHASES)
    assert value("commoncanvas_operator_units_planned") is None
    assert value("commoncanvas_operator_units_done") is None
    assert value("commoncanvas_operator_resources", phase="Running") is None

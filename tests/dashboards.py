"""The Grafana dashboards in monitoring/dashboards as the tests read them: panel queries, with
Grafana's template variables replaced by values Prometheus accepts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "monitoring"
RULES = MONITORING / "prometheus-rules.yaml"
DASHBOARDS = sorted((MONITORING / "dashboards").glob("*.json"))
# Grafana's template variables, replaced by a value of their kind.
VARIABLES = {"$__rate_interval": "5m", "$namespace": ".*", "$stage": "caption"}


def load(path: Path) -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(path.read_text())
    return dashboard


def panel_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(``dashboard / panel / refId``, query) for every target of every panel."""
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            out.append((f"{dashboard['title']} / {panel['title']} / {target['refId']}", target["expr"]))
    return out


def substitute(expr: str, variables: dict[str, str] | None = None) -> str:
    for variable, value in {**VARIABLES, **(variables or {})}.items():
        expr = expr.replace(variable, value)
    if "$" in expr:
        raise ValueError(f"unknown template variable in {expr!r}")
    return expr


def render(dashboard: dict[str, Any], results: dict[int, list[dict[str, Any]]], target: Path) -> Path:
    """Draw each panel from its range-query results (panel id -> Prometheus ``matrix`` series) to a
    PNG, three panels a row: what the dashboard would show, for a person to look at."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [panel for panel in dashboard["panels"] if panel.get("targets")]
    columns = 3
    rows = (len(panels) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(6 * columns, 3.2 * rows), squeeze=False)
    figure.suptitle(dashboard["title"], fontsize=14)
    for axis, panel in zip(axes.flat, panels, strict=False):
        axis.set_title(panel["title"], fontsize=10)
        series = results.get(panel["id"], [])
        if not series:
            axis.text(0.5, 0.5, "no data", ha="center", va="center", transform=axis.transAxes, color="grey")
        start = min((float(s["values"][0][0]) for s in series), default=0.0)
        for item in series[:12]:
            times = [float(t) - start for t, _ in item["values"]]
            values = [float(v) for _, v in item["values"]]
            label = ",".join(f"{k}={v}" for k, v in sorted(item["metric"].items()) if k != "__name__")
            axis.plot(times, values, marker="." if len(times) < 5 else None, label=label[:40] or "value")
        if series:
            axis.set_xlabel("seconds", fontsize=8)
            axis.legend(fontsize=6, loc="best")
        axis.tick_params(labelsize=7)
    for axis in list(axes.flat)[len(panels) :]:
        axis.axis("off")
    figure.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=80)
    plt.close(figure)
    return target

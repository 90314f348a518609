"""monitoring/: the Prometheus rules (checked and unit-tested by the real promtool) and the Grafana
dashboards (every query parses, and names only metrics our code exports)."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY
from tests.cluster.processes import MissingBinaryError, find_binary
from tests.dashboards import DASHBOARDS, MONITORING, ROOT, RULES, panel_queries, substitute

# Series that other software exports, named in the dashboards on purpose:
# - dcgm-exporter's default counters (NVIDIA DCGM field names): GPU utilisation and framebuffer use.
# - ALERTS: Prometheus' own series of pending/firing alerts.
FOREIGN_METRICS = {"DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "ALERTS"}
# Modules whose prometheus_client metrics register on import.
METRIC_MODULES = ("commoncanvas.metrics", "commoncanvas_operator.metrics")


def promtool() -> Path:
    try:
        return find_binary("promtool")
    except MissingBinaryError as exc:
        pytest.fail(f"{exc} (run `make cluster-tools`)")


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(promtool()), *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def exported_metrics() -> set[str]:
    """Series names our registries expose: counters as _total, histograms as _bucket/_sum/_count."""
    for module in METRIC_MODULES:
        importlib.import_module(module)
    importlib.import_module("commoncanvas.metrics").export_training()  # what rank 0 serves
    names = set()
    for family in REGISTRY.collect():
        if family.type == "counter":
            names |= {f"{family.name}_total", f"{family.name}_created"}
        elif family.type == "histogram":
            names |= {f"{family.name}_{s}" for s in ("bucket", "sum", "count", "created")}
        else:
            names.add(family.name)
    return {n for n in names if n.startswith("commoncanvas_")}


def recorded_metrics() -> set[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["record"] for group in groups for rule in group["rules"] if "record" in rule}


_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
    "offset", "inf", "nan", "atan2",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """Metric names a (promtool-validated) PromQL expression selects.

    Strings, label matchers, range/subquery brackets and label lists are cut first; what remains that
    is an identifier not followed by "(" (a function or aggregation) and not a keyword is a metric.
    """
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?", expr):
        name, call = match.groups()
        if call or name.lower() in _KEYWORDS or re.fullmatch(r"\d+\w*", name):
            continue
        names.add(name)
    return names


# ---------------------------------------------------------------------------------- rules


def test_promtool_check_rules() -> None:
    result = run_promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_test_rules() -> None:
    result = run_promtool("test", "rules", str(MONITORING / "tests" / "rules-test.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_unit_tested() -> None:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    alerts = {rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule}
    tests = yaml.safe_load((MONITORING / "tests" / "rules-test.yaml").read_text())["tests"]
    fired = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    # Simple threshold alerts, not yet covered by a firing case.
    untested = {
        "CommonCanvasMostSamplesFailing",
        "CommonCanvasTrainingRestartingRepeatedly",
        "CommonCanvasOOMBackoffs",
    }
    assert alerts - fired <= untested, f"alerts never seen firing: {alerts - fired}"


def test_rules_name_only_exported_metrics() -> None:
    known = exported_metrics() | recorded_metrics()
    groups = yaml.safe_load(RULES.read_text())["groups"]
    for group in groups:
        for rule in group["rules"]:
            unknown = metric_names(rule["expr"]) - known
            assert not unknown, f"{rule.get('alert') or rule.get('record')} names {unknown}"


def test_promtool_catches_a_broken_rule(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("groups:\n  - name: x\n    rules:\n      - record: a:b\n        expr: sum(rate(x[5m])\n")
    assert run_promtool("check", "rules", str(bad)).returncode != 0


# ------------------------------------------------------------------------------ dashboards


def test_dashboards_exist() -> None:
    assert [d.name for d in DASHBOARDS] == [
        "caption.json",
        "pipeline-overview.json",
        "scrape.json",
        "train.json",
    ]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_structure(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    assert dashboard["uid"].startswith("commoncanvas-") and "commoncanvas" in dashboard["tags"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in dashboard["panels"]:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] + panel["gridPos"][
            "w"
        ] <= 24
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}"
    used = {m.group(0) for q in panel_queries(dashboard) for m in re.finditer(r"\$\w+", q[1])}
    assert used <= {"$__rate_interval", *(f"${name}" for name in variables)}, used


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """promtool parses every panel query (each one as a recording rule of a throwaway rule file)."""
    rules: list[dict[str, str]] = []
    where = []
    for path in DASHBOARDS:
        for what, expr in panel_queries(json.loads(path.read_text())):
            rules.append({"record": f"dashboard:query_{len(rules)}", "expr": substitute(expr)})
            where.append(what)
    assert len(rules) > 40
    file = tmp_path / "dashboard-queries.yaml"
    file.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = run_promtool("check", "rules", "--lint=none", str(file))
    if result.returncode != 0:
        # Name the panel: promtool reports the rule's position.
        numbers = [int(n) for n in re.findall(r"dashboard:query_(\d+)", result.stdout + result.stderr)]
        pytest.fail(f"{[where[n] for n in numbers] or ''}\n{result.stdout}{result.stderr}")
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_dashboards_name_only_exported_metrics() -> None:
    known = exported_metrics() | recorded_metrics() | FOREIGN_METRICS
    unknown = {}
    for path in DASHBOARDS:
        for what, expr in panel_queries(json.loads(path.read_text())):
            missing = metric_names(substitute(expr)) - known
            if missing:
                unknown[what] = sorted(missing)
    assert not unknown, f"queries naming metrics nothing exports: {unknown}"


def test_metric_name_extraction() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (host, le) "
        '(rate(commoncanvas_fetch_seconds_bucket{stage="a b"}[5m])))'
        " / on (pod) group_left count by (pod) (DCGM_FI_DEV_GPU_UTIL offset 1h) * 1e6 > bool 2"
    )
    assert metric_names(expr) == {"commoncanvas_fetch_seconds_bucket", "DCGM_FI_DEV_GPU_UTIL"}
    assert "commoncanvas_samples_total" in exported_metrics()
    assert "commoncanvas_operator_reconcile_seconds_bucket" in exported_metrics()

"""The chart's egress NetworkPolicy for ScrapeJob pods: off by default; when on, the web except the
cluster's and the metadata ranges, the cluster DNS and the object store, for scrape pods only."""

from __future__ import annotations

from typing import Any

import pytest
from tests.integration.test_chart import by_kind, render

from commoncanvas_operator import builders

pytestmark = pytest.mark.integration


def scrape_egress(*args: str) -> list[dict[str, Any]]:
    return [
        p for p in by_kind(render(*args), "NetworkPolicy") if p["metadata"]["name"].endswith("scrape-egress")
    ]


def test_the_scrape_egress_policy_is_opt_in() -> None:
    assert scrape_egress() == []


def test_scrape_pods_reach_the_web_but_not_cluster_or_metadata_ranges() -> None:
    (policy,) = scrape_egress("--set=scrapeEgress.enabled=true")
    spec = policy["spec"]
    # The label the operator puts on every pod of a ScrapeJob (plan, units, finalize).
    kind = {k: v for k, v in builders.labels("ScrapeJob", "x").items() if k.endswith("/kind")}
    assert spec["podSelector"]["matchLabels"] == kind == {"commoncanvas.dev/kind": "scrapejob"}
    assert spec["policyTypes"] == ["Egress"]
    dns, web = spec["egress"]
    assert {(p["protocol"], p["port"]) for p in dns["ports"]} == {("UDP", 53), ("TCP", 53)}
    v4, v6 = (peer["ipBlock"] for peer in web["to"])
    assert v4["cidr"] == "0.0.0.0/0" and v6["cidr"] == "::/0"
    assert {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16"} <= set(
        v4["except"]
    )
    assert {"fc00::/7", "fe80::/10"} <= set(v6["except"])  # fd00:ec2::254 is in fc00::/7
    assert {p["port"] for p in web["ports"]} == {80, 443}


def test_an_in_cluster_object_store_is_allowed_and_namespaces_are_configurable() -> None:
    policies = scrape_egress(
        "--set=scrapeEgress.enabled=true",
        "--set=scrapeEgress.namespaces={team-a,team-b}",
        "--set=scrapeEgress.objectStore.to[0].podSelector.matchLabels.app=minio",
        "--set=scrapeEgress.objectStore.ports={9000}",
    )
    assert [p["metadata"]["namespace"] for p in policies] == ["team-a", "team-b"]
    _, store, _ = policies[0]["spec"]["egress"]
    assert store == {
        "to": [{"podSelector": {"matchLabels": {"app": "minio"}}}],
        "ports": [{"protocol": "TCP", "port": 9000}],
    }

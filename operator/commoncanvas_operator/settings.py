"""Operator settings: what the chart's values decide (images, node pools, object store), read once at start.

The chart renders them as JSON into a ConfigMap mounted at ``COMMONCANVAS_OPERATOR_SETTINGS``; every
field has a default so a bare ``python -m commoncanvas_operator`` runs too.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SETTINGS_ENV = "COMMONCANVAS_OPERATOR_SETTINGS"
A100_PRODUCT = "NVIDIA-A100-SXM4-80GB"


@dataclass(frozen=True)
class NodePool:
    """Where a pool's pods go: its nodeSelector and tolerations, as Kubernetes writes them."""

    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)


def _default_pools() -> dict[str, NodePool]:
    return {
        "a100": NodePool(
            node_selector={"nvidia.com/gpu.product": A100_PRODUCT},
            tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        ),
        "cpu": NodePool(),
    }


@dataclass(frozen=True)
class Settings:
    cpu_image: str = "commoncanvas/worker:0.1.0"
    gpu_image: str = "commoncanvas/worker-gpu:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    # The chart's Secret (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) and ConfigMap (S3_ENDPOINT_URL).
    object_store_secret: str = "commoncanvas-object-store"
    object_store_config: str = "commoncanvas-object-store"
    pools: dict[str, NodePool] = field(default_factory=_default_pools)
    # Pools for the pods that name none: ScrapeJob units, and every stage's plan/finalize pod.
    scrape_pool: str = "cpu"
    control_pool: str = "cpu"
    worker_service_account: str = ""
    backoff_limit_per_index: int = 2
    metrics_port: int = 9400
    reconcile_seconds: float = 10.0
    # The operator's own /metrics (0 = off).
    operator_metrics_port: int = 8080

    def pool(self, name: str) -> NodePool:
        if name not in self.pools:
            raise KeyError(f"node pool {name!r} is not one of the operator's pools {sorted(self.pools)}")
        return self.pools[name]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Settings:
        """Settings from the chart's camelCase JSON; unknown keys are an error (a typo must not pass)."""
        names = {
            "cpuImage": "cpu_image",
            "gpuImage": "gpu_image",
            "imagePullPolicy": "image_pull_policy",
            "objectStoreSecret": "object_store_secret",
            "objectStoreConfig": "object_store_config",
            "scrapePool": "scrape_pool",
            "controlPool": "control_pool",
            "workerServiceAccount": "worker_service_account",
            "backoffLimitPerIndex": "backoff_limit_per_index",
            "metricsPort": "metrics_port",
            "reconcileSeconds": "reconcile_seconds",
            "operatorMetricsPort": "operator_metrics_port",
        }
        unknown = set(data) - set(names) - {"pools"}
        if unknown:
            raise ValueError(
                f"unknown operator settings {sorted(unknown)}; known: {sorted([*names, 'pools'])}"
            )
        kwargs: dict[str, Any] = {names[key]: value for key, value in data.items() if key in names}
        if "pools" in data:
            kwargs["pools"] = {
                name: NodePool(
                    node_selector=dict(pool.get("nodeSelector") or {}),
                    tolerations=list(pool.get("tolerations") or []),
                )
                for name, pool in data["pools"].items()
            }
        return cls(**kwargs)

    @classmethod
    def load(cls) -> Settings:
        path = os.environ.get(SETTINGS_ENV)
        if not path:
            return cls()
        return cls.from_dict(json.loads(Path(path).read_text()))

"""Operator settings: what the chart's values decide (images, node pools, object store, the worker pods'
security contexts), read once at start.

The chart renders them as JSON into a ConfigMap mounted at ``COMMONCANVAS_OPERATOR_SETTINGS``; every
field has a default so a bare ``python -m commoncanvas_operator`` runs too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic.alias_generators import to_camel

from commoncanvas.specs.common import DEFAULT_NODE_POOL

SETTINGS_ENV = "COMMONCANVAS_OPERATOR_SETTINGS"
A100_PRODUCT = "NVIDIA-A100-SXM4-80GB"
# The worker images' user (images/worker*.Dockerfile: USER 10001:10001).
WORKER_UID = 10001


class _ChartValues(BaseModel):
    """camelCase as the chart writes it; an unknown key is an error (a typo must not pass unseen)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class NodePool(_ChartValues):
    """Where a pool's pods go: its nodeSelector and tolerations, as Kubernetes writes them."""

    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    # The PriorityClass of the pool's pods unless a resource names its own (spec.priorityClassName).
    priority_class_name: str = ""

    @field_validator("node_selector", "tolerations", mode="before")
    @classmethod
    def _null_is_empty(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:  # a chart value set to null: none
            return {} if info.field_name == "node_selector" else []
        return value


def default_pod_security_context() -> dict[str, Any]:
    """Every worker pod's securityContext unless the chart says otherwise: the images' non-root user."""
    return {
        "runAsNonRoot": True,
        "runAsUser": WORKER_UID,
        "runAsGroup": WORKER_UID,
        "fsGroup": WORKER_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def default_security_context() -> dict[str, Any]:
    """Every worker container's securityContext unless the chart says otherwise (the root filesystem
    read-only: the builders give the pods an emptyDir at /tmp for what they write)."""
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _default_pools() -> dict[str, NodePool]:
    return {
        DEFAULT_NODE_POOL: NodePool(
            node_selector={"nvidia.com/gpu.product": A100_PRODUCT},
            tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        ),
        "cpu": NodePool(),
    }


class Settings(_ChartValues):
    cpu_image: str = "commoncanvas/worker:0.1.0"
    gpu_image: str = "commoncanvas/worker-gpu:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    # The chart's Secret (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) and ConfigMap (S3_ENDPOINT_URL).
    object_store_secret: str = "commoncanvas-object-store"
    object_store_config: str = "commoncanvas-object-store"
    pools: dict[str, NodePool] = Field(default_factory=_default_pools)
    # Pools for the pods that name none: ScrapeJob units, and every stage's plan/finalize pod.
    scrape_pool: str = "cpu"
    control_pool: str = "cpu"
    worker_service_account: str = ""
    # As Kubernetes writes them; empty: none. The TrainRun's pods size themselves from its spec, so
    # worker_resources is for the stages' pods (plan, units, finalize) only.
    worker_pod_security_context: dict[str, Any] = Field(default_factory=default_pod_security_context)
    worker_security_context: dict[str, Any] = Field(default_factory=default_security_context)
    worker_resources: dict[str, Any] = Field(default_factory=dict)
    # A Kubernetes volume source for the model cache the workers of a node share (a PVC, or hostPath
    # where Pod Security allows it); empty: each pod caches under its own /tmp emptyDir.
    model_cache: dict[str, Any] = Field(default_factory=dict)
    backoff_limit_per_index: int = 2
    metrics_port: int = 9400
    # Workers keep /metrics up this long after their work (METRICS_LINGER_SECONDS in their pods).
    metrics_linger_seconds: float = 0
    # A replica silent this long in the peering object is gone; another takes over.
    peering_lifetime_seconds: int = 60
    reconcile_seconds: float = 10.0
    # The operator's own /metrics (0 = off).
    operator_metrics_port: int = 8080

    def pool(self, name: str) -> NodePool:
        if name not in self.pools:
            raise KeyError(f"node pool {name!r} is not one of the operator's pools {sorted(self.pools)}")
        return self.pools[name]

    @field_validator(
        "worker_pod_security_context",
        "worker_security_context",
        "worker_resources",
        "model_cache",
        mode="before",
    )
    @classmethod
    def _null_is_none(cls, value: Any) -> Any:
        # null (a chart value set to null) is none, as {} is; absent is the default.
        return {} if value is None else value

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Settings:
        """Settings from the chart's camelCase JSON; every problem is named by its field, one line."""
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(str(part) for part in problem['loc'])}: {problem['msg']}"
                for problem in error.errors()
            )
            raise ValueError(f"operator settings ({SETTINGS_ENV}): {problems}") from None

    @classmethod
    def load(cls) -> Settings:
        path = os.environ.get(SETTINGS_ENV)
        if not path:
            return cls()
        return cls.from_dict(json.loads(Path(path).read_text()))

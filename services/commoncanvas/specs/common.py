"""Pieces every custom resource shares: metadata, status conditions, phases, YAML loading."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

GROUP = "commoncanvas.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"


class KubeModel(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields are an error locally (the API
    server prunes them, so a typo must fail here rather than be silently ignored)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class ObjectMeta(KubeModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    name: str = Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    namespace: str = "default"
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class Phase(StrEnum):
    PENDING = "Pending"
    WAITING = "Waiting"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"


class Condition(KubeModel):
    type: str
    status: str = Field(description="True, False or Unknown")
    reason: str = ""
    message: str = ""
    last_transition_time: str = ""


class UnitCounts(KubeModel):
    total: int = 0
    succeeded: int = 0
    failed: int = 0


class CommonStatus(KubeModel):
    phase: Phase = Phase.PENDING
    conditions: list[Condition] = Field(default_factory=list)
    units: UnitCounts = Field(default_factory=UnitCounts)
    progress: str = Field("", description="units succeeded/total, for kubectl get")
    workers: int = Field(0, description="Worker processes that ran (pods x GPUs), not units")
    model_loads: int = Field(0, description="Models loaded by the workers: one per worker, not per unit")
    start_time: str = ""
    completion_time: str = ""
    observed_generation: int = 0


class SpecError(ValueError):
    """A resource file that does not validate; the message names the file, document and field."""


def format_validation_error(exc: ValidationError, where: str) -> str:
    lines = [f"{where} is not a valid resource:"]
    for error in exc.errors():
        field = ".".join(str(p) for p in error["loc"]) or "(top level)"
        lines.append(f"  {field}: {error['msg']}")
    return "\n".join(lines)


def load_resources(path: str | Path, kinds: Mapping[str, type[BaseModel]]) -> list[Any]:
    """Every document of a YAML file, each validated by the model its `kind` names."""
    path = Path(path)
    resources: list[Any] = []
    with path.open() as handle:
        docs = [doc for doc in yaml.safe_load_all(handle) if doc]
    for number, doc in enumerate(docs, start=1):
        where = f"{path} (document {number})"
        kind = doc.get("kind") if isinstance(doc, dict) else None
        if not isinstance(kind, str) or kind not in kinds:
            raise SpecError(f"{where}: kind {kind!r} is not one of {sorted(kinds)}")
        try:
            resources.append(kinds[kind].model_validate(doc))
        except ValidationError as exc:
            raise SpecError(format_validation_error(exc, where)) from None
    return resources

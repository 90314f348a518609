"""CustomResourceDefinitions generated from the pydantic spec models.

Kubernetes wants a *structural* schema: no $ref, a type on every node, no anyOf for nullability.
This module turns pydantic's JSON Schema into that form; a test keeps the checked-in files equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from commoncanvas.specs import GROUP, VERSION, CaptionJob, EvalRun, ScrapeJob, TrainRun
from commoncanvas.specs.common import PLURALS

_DROP = {"title", "additionalProperties", "$defs", "discriminator"}


@dataclass(frozen=True)
class KindInfo:
    model: type[BaseModel]
    plural: str
    short_names: tuple[str, ...]
    extra_columns: tuple[dict[str, Any], ...] = ()


KIND_INFO: dict[str, KindInfo] = {
    "ScrapeJob": KindInfo(
        ScrapeJob,
        PLURALS["ScrapeJob"],
        ("sj",),
        (
            {"name": "Commercial", "type": "integer", "jsonPath": ".status.samples.commercial"},
            {
                "name": "NonCommercial",
                "type": "integer",
                "jsonPath": ".status.samples.noncommercial",
                "priority": 1,
            },
        ),
    ),
    "CaptionJob": KindInfo(
        CaptionJob,
        PLURALS["CaptionJob"],
        ("cj",),
        (
            {"name": "Commercial", "type": "integer", "jsonPath": ".status.captions.commercial"},
            {
                "name": "NonCommercial",
                "type": "integer",
                "jsonPath": ".status.captions.noncommercial",
                "priority": 1,
            },
        ),
    ),
    "TrainRun": KindInfo(
        TrainRun,
        PLURALS["TrainRun"],
        ("tr",),
        (
            {"name": "Step", "type": "integer", "jsonPath": ".status.step"},
            {"name": "Images/s", "type": "number", "jsonPath": ".status.imagesPerSecond"},
            {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts", "priority": 1},
        ),
    ),
    "EvalRun": KindInfo(
        EvalRun,
        PLURALS["EvalRun"],
        ("er",),
        (
            {"name": "Prompts", "type": "integer", "jsonPath": ".status.prompts"},
            {"name": "FID", "type": "number", "jsonPath": ".status.results[0].fid", "priority": 1},
        ),
    ),
}


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_structural(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _structural(merged, defs)
    options = node.get("anyOf")
    if options and any(o.get("type") == "null" for o in options):
        rest = [o for o in options if o.get("type") != "null"]
        if len(rest) == 1:
            merged = {**rest[0], **{k: v for k, v in node.items() if k != "anyOf"}, "nullable": True}
            if merged.get("default", 0) is None:
                merged.pop("default")
            return _structural(merged, defs)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP and not (key == "additionalProperties" and isinstance(value, dict)):
            continue
        if key == "properties":
            out[key] = {name: _structural(sub, defs) for name, sub in value.items()}
        elif key == "const":
            out["enum"] = [value]
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            # JSON Schema's numeric form -> OpenAPI 3.0's boolean beside minimum/maximum.
            out[key.replace("exclusiveM", "m")] = value
            out[key] = True
        else:
            out[key] = _structural(value, defs)
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    if "properties" in out:
        out.setdefault("type", "object")
    return out


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True)
    schema = _structural(raw, raw.get("$defs", {}))
    props = schema["properties"]
    # apiVersion/kind/metadata belong to the API server; only spec and status are ours to describe.
    props["apiVersion"] = {"type": "string"}
    props["kind"] = {"type": "string"}
    props["metadata"] = {"type": "object"}
    schema["required"] = ["spec"]
    schema.pop("default", None)
    return schema


def build_crd(kind: str) -> dict[str, Any]:
    info = KIND_INFO[kind]
    columns = [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Progress", "type": "string", "jsonPath": ".status.progress"},
        *info.extra_columns,
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{info.plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": info.plural,
                "singular": kind.lower(),
                "shortNames": list(info.short_names),
                "categories": ["commoncanvas"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": openapi_schema(info.model)},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                }
            ],
        },
    }


def render_crd(kind: str) -> str:
    header = "# Generated by `commoncanvas crds` from the pydantic models; do not edit.\n"
    return header + yaml.safe_dump(build_crd(kind), sort_keys=False, width=100)


def crd_filename(kind: str) -> str:
    return f"{KIND_INFO[kind].plural}.{GROUP}.yaml"


def write_crds(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for kind in KIND_INFO:
        path = directory / crd_filename(kind)
        path.write_text(render_crd(kind))
        written.append(path)
    return written

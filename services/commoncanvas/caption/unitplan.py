"""CaptionJob work units: groups of input shards per split, planned once from the catalog's indexes."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from commoncanvas import units
from commoncanvas.specs.caption import CaptionJobSpec
from commoncanvas.storage import Storage, open_storage
from commoncanvas.units import StageLayout

CaptionLayout = StageLayout


class InputMissing(RuntimeError):
    """The catalog to caption is not there (yet): the message names the URI and the upstream."""


@dataclass(frozen=True)
class CaptionUnit:
    unit: int
    split: str
    split_root: str
    shards: list[dict[str, Any]]
    columns: dict[str, str]


def input_roots(spec: CaptionJobSpec, resolve_ref: Callable[[str], str] | None) -> list[tuple[str, str]]:
    """(root URI, where it came from) per input, resolving a ScrapeJob reference."""
    if spec.input.scrape_job_ref:
        ref = spec.input.scrape_job_ref
        if resolve_ref is None:
            raise InputMissing(f"input.scrapeJobRef {ref!r} cannot be resolved here; give input.uris instead")
        return [(resolve_ref(ref), f"ScrapeJob {ref!r}")]
    return [(uri, "input.uris") for uri in spec.input.uris]


def plan_caption_units(spec: CaptionJobSpec, resolve_ref: Callable[[str], str] | None) -> list[CaptionUnit]:
    planned: list[CaptionUnit] = []
    for root, origin in input_roots(spec, resolve_ref):
        for split in spec.input.splits:
            split_root = f"{root.rstrip('/')}/{split}"
            storage = open_storage(split_root)
            if not storage.exists("index.json"):
                raise InputMissing(
                    f"{split_root}/index.json does not exist: the catalog from {origin} is missing or not "
                    "finished (a ScrapeJob writes it once all its units are done)"
                )
            shards = json.loads(storage.read_text("index.json"))["shards"]
            for start in range(0, len(shards), spec.shards_per_unit):
                group = shards[start : start + spec.shards_per_unit]
                columns = dict(zip(group[0]["column_names"], group[0]["column_encodings"], strict=True))
                planned.append(CaptionUnit(len(planned), split, split_root, group, columns))
    return planned


def caption_plan_hash(spec: CaptionJobSpec, roots: list[tuple[str, str]]) -> str:
    relevant = {"roots": [r for r, _ in roots], "splits": spec.input.splits, "per_unit": spec.shards_per_unit}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def ensure_caption_plan(
    spec: CaptionJobSpec, layout: StageLayout, resolve_ref: Callable[[str], str] | None
) -> Storage:
    """Plan once and keep it: later units and reruns see the same units even if the input grows."""
    plan = layout.plan
    digest = caption_plan_hash(spec, input_roots(spec, resolve_ref))
    if plan.exists("units.json"):
        stored = json.loads(plan.read_text("units.json"))
        if stored["hash"] != digest:
            raise ValueError(f"{plan.uri} was planned from other inputs; use a new output URI")
        return plan
    planned = plan_caption_units(spec, resolve_ref)
    plan.write_text("units.json", json.dumps({"hash": digest, "units": [asdict(u) for u in planned]}))
    return plan


def read_caption_units(plan: Storage) -> list[CaptionUnit]:
    return [CaptionUnit(**unit) for unit in json.loads(plan.read_text("units.json"))["units"]]


def finalize(spec: CaptionJobSpec, resolve_ref: Callable[[str], str] | None = None) -> dict[str, Any]:
    """Once every unit has its marker: merge each split's index and write the job summary.
    Torch-free on purpose: the finalize pod runs in the CPU image."""
    layout = CaptionLayout.at(spec.output.uri)
    plan = ensure_caption_plan(spec, layout, resolve_ref)
    merged = units.summarize(layout, {u.unit: u.split for u in read_caption_units(plan)})
    excluded = merged.pop("failed")
    result = {**merged, "excluded": excluded, "captions": merged["samples"]}
    layout.output.write_text("summary.json", json.dumps(result, indent=1))
    return result

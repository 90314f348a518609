"""CaptionJob work units: groups of the scrape catalog's shards per split, planned once (shardplan)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from commoncanvas import shardplan, units
from commoncanvas.shardplan import InputMissing as InputMissing  # where cli, train and tests import it
from commoncanvas.shardplan import ShardInput, Upstream
from commoncanvas.specs.caption import CaptionJobSpec
from commoncanvas.storage import Storage
from commoncanvas.units import StageLayout

CaptionLayout = StageLayout
read_caption_units = shardplan.read_units
SCRAPE_CATALOG = Upstream("ScrapeJob", "catalog", "input.scrapeJobRef", "input.uris")


def caption_input(spec: CaptionJobSpec) -> ShardInput:
    source = spec.input
    return ShardInput(
        SCRAPE_CATALOG, source.scrape_job_ref, source.uris, source.splits, spec.samples_per_unit
    )


def ensure_caption_plan(
    spec: CaptionJobSpec, layout: StageLayout, resolve_ref: Callable[[str], str] | None
) -> Storage:
    return shardplan.ensure_plan(
        layout, caption_input(spec), resolve_ref, output_settings(spec), "CaptionJob"
    )


def output_settings(spec: CaptionJobSpec) -> dict[str, Any]:
    """What a caption depends on besides its image: a change must not reuse finished units."""
    decoding = spec.decoding.model_dump(by_alias=True)
    return {
        "spec.model.source": spec.model.source,
        "spec.model.revision": spec.model.revision,
        "spec.model.dtype": spec.model.dtype,
        "spec.prompt": spec.prompt,
        "spec.imageSize": spec.image_size,
        **{f"spec.decoding.{name}": value for name, value in sorted(decoding.items())},
    }


def finalize(spec: CaptionJobSpec, resolve_ref: Callable[[str], str] | None = None) -> dict[str, Any]:
    """Once every unit has its marker: merge each split's index and write the job summary.
    Torch-free on purpose: the finalize pod runs in the CPU image."""
    layout = CaptionLayout.at(spec.output.uri)
    plan = ensure_caption_plan(spec, layout, resolve_ref)
    merged = units.summarize(layout, {u.unit: u.split for u in read_caption_units(plan)}, spec.input.splits)
    excluded = merged.pop("failed")
    result = {**merged, "excluded": excluded, "captions": merged["samples"]}
    layout.output.write_text("summary.json", json.dumps(result, indent=1))
    return result

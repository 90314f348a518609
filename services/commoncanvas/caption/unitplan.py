"""CaptionJob work units: groups of the scrape catalog's shards per split, planned once (shardplan)."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from commoncanvas import shardplan, units
from commoncanvas.licenses import Split
from commoncanvas.shardplan import InputMissing as InputMissing  # where cli, train and tests import it
from commoncanvas.shardplan import ShardInput, Upstream
from commoncanvas.specs.caption import EVALUATION_CAPTIONS_FILE, CaptionJobSpec
from commoncanvas.storage import Storage
from commoncanvas.units import StageLayout

CaptionLayout = StageLayout
read_caption_units = shardplan.read_units
# Per evaluation unit, beside its shards; finalize joins them into EVALUATION_CAPTIONS_FILE.
UNIT_EVALUATION_CAPTIONS = EVALUATION_CAPTIONS_FILE.rsplit("/", 1)[-1]
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


def join_evaluation_captions(output: Storage, markers: dict[int, dict[str, Any]]) -> int:
    """EVALUATION_CAPTIONS_FILE from the winning attempts' per-unit files, in unit order, written in one
    piece (a rerun rewrites the same file: nothing duplicated). Streamed through a local file: at ~30M
    NoDerivs photos x ~300 bytes it is ~9 GB. Returns the lines written."""
    lines = 0
    with tempfile.TemporaryDirectory(prefix="commoncanvas-evaluation-") as tmp:
        joined = Path(tmp) / UNIT_EVALUATION_CAPTIONS
        with joined.open("wb") as out:
            for unit in sorted(markers):
                prefix = units.winning_prefix(Split.EVALUATION, unit, markers[unit])
                key = f"{prefix}/{UNIT_EVALUATION_CAPTIONS}"
                if not markers[unit].get("written") or not output.exists(key):
                    continue  # nothing of the unit was captioned
                data = output.read_bytes(key)
                out.write(data)
                lines += data.count(b"\n")
        output.upload_file(EVALUATION_CAPTIONS_FILE, joined)
    return lines


def finalize(spec: CaptionJobSpec, resolve_ref: Callable[[str], str] | None = None) -> dict[str, Any]:
    """Once every unit has its marker: merge each split's index and write the job summary.
    Torch-free on purpose: the finalize pod runs in the CPU image."""
    layout = CaptionLayout.at(spec.output.uri)
    plan = ensure_caption_plan(spec, layout, resolve_ref)
    unit_splits = {u.unit: u.split for u in read_caption_units(plan)}
    markers = units.read_markers(layout.output)
    merged = units.summarize(layout, unit_splits, spec.input.splits, markers)
    excluded = merged.pop("failed")
    result = {**merged, "excluded": excluded, "captions": merged["samples"]}
    if Split.EVALUATION in spec.input.splits:
        evaluation = {u: m for u, m in markers.items() if unit_splits.get(u) == Split.EVALUATION}
        lines = join_evaluation_captions(layout.output, evaluation)
        result["evaluationCaptions"] = {"uri": layout.output.url(EVALUATION_CAPTIONS_FILE), "photos": lines}
    layout.output.write_text("summary.json", json.dumps(result, indent=1))
    return result

"""EvalRun work units, planned once: generation units (a slice of the sampled prompts at one guidance
scale and one seed) and reference units (a slice of the real images), frozen under `_plan/`.

Both kinds of unit run in the work phase (the GPU workers: the extractors are models), so finalize only
reads features and does the statistics. Torch-free on purpose, like the other stages' plans.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import PurePosixPath
from typing import Any

from commoncanvas.identity import OutputReused, check_not_input, claim_output
from commoncanvas.shardplan import InputMissing, group_shards
from commoncanvas.specs.caption import EVALUATION_CAPTIONS_FILE
from commoncanvas.specs.common import SpecError
from commoncanvas.specs.eval import TRAIN_PIPELINE_DIR, EvalRunSpec
from commoncanvas.storage import Storage, open_storage
from commoncanvas.units import StageLayout

PLAN_FILE = "units.json"
PROMPTS_FILE = "prompts.json"  # the sampled prompts, under _plan/: every worker reads the same
GENERATED = "generated"  # the units' "split" (their output prefix): images generated from prompts
REFERENCES = "references"  # ... and features of the real images
FEATURES_FILE = "features.npz"  # what each unit attempt writes (eval.worker), finalize reads (eval.score)
# A captions file is text a person made or a CaptionJob wrote: 1M COCO-length captions are ~100 MB.
MAX_PROMPTS_BYTES = 256 * 1024 * 1024
MAX_CAPTION_CHARS = 2000
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

# Resolves a reference: (kind, name) -> that resource's output URI.
Resolve = Callable[[str, str], str]


@dataclass(frozen=True)
class EvalUnit:
    """One unit: `split` GENERATED (prompts [start, end) at `guidance_scale` with `seed`) or REFERENCES
    (`images`: MDS shards of `source` or file keys under it)."""

    unit: int
    split: str
    start: int = 0
    end: int = 0
    guidance_scale: float = 0.0
    seed: int = 0
    source: str = ""
    shards: list[dict[str, Any]] | None = None
    files: list[str] | None = None
    limit: int = 0  # reference images this unit takes at most (the references.limit's remainder)


def resolved(spec: EvalRunSpec, resolve: Resolve | None) -> EvalRunSpec:
    """The spec with its references replaced by URIs: the TrainRun's exported pipeline, the CaptionJob's
    evaluation captions. Without `resolve` (a pod's job file is resolved already) a reference left is
    an InputMissing naming the field."""
    model, prompts = spec.model, spec.prompts

    def output_of(kind: str, name: str, field: str, instead: str) -> str:
        if resolve is None:
            raise InputMissing(f"spec.{field} {name!r} cannot be resolved here; give spec.{instead} instead")
        return resolve(kind, name).rstrip("/")

    if model.train_run_ref:
        root = output_of("TrainRun", model.train_run_ref, "model.trainRunRef", "model.pipelineUri")
        model = model.model_copy(
            update={"train_run_ref": None, "pipeline_uri": f"{root}/{TRAIN_PIPELINE_DIR}"}
        )
    if prompts.caption_job_ref:
        root = output_of("CaptionJob", prompts.caption_job_ref, "prompts.captionJobRef", "prompts.uri")
        prompts = prompts.model_copy(
            update={"caption_job_ref": None, "uri": f"{root}/{EVALUATION_CAPTIONS_FILE}", "format": "jsonl"}
        )
    return spec.model_copy(update={"model": model, "prompts": prompts})


def _split_uri(uri: str) -> tuple[Storage, str]:
    parent, _, name = uri.rstrip("/").rpartition("/")
    return open_storage(parent or "."), name


def parse_prompts(text: str, fmt: str, where: str) -> list[dict[str, Any]]:
    """Every record of a captions file with a non-empty `caption` (other fields kept: ids, licenses).
    A line that is not a record is an error naming `where:line`."""
    records: list[dict[str, Any]] = []
    if fmt == "tsv":
        reader = csv.DictReader(io.StringIO(text), delimiter="\t")
        if "caption" not in (reader.fieldnames or []):
            raise SpecError(
                f"{where}:1: the TSV header has no `caption` column; name the captions column caption"
            )
        rows: Any = ((reader.line_num, row) for row in reader)
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SpecError(
                    f"{where}:{number}: not JSON ({exc.msg}); write one JSON object per line"
                ) from None
            if not isinstance(row, dict) or not isinstance(row.get("caption"), str):
                raise SpecError(
                    f"{where}:{number}: not a JSON object with a string `caption`; give one per line"
                )
            rows.append((number, row))
    for number, row in rows:
        caption = " ".join(str(row.get("caption") or "").split())
        if not caption:
            continue
        if len(caption) > MAX_CAPTION_CHARS:
            raise SpecError(
                f"{where}:{number}: caption of {len(caption)} characters; at most {MAX_CAPTION_CHARS}"
            )
        records.append({**row, "caption": caption})
    return records


def read_prompts(spec: EvalRunSpec) -> tuple[list[dict[str, Any]], int]:
    """The prompts to generate from: `prompts.limit` of the file's records sampled with `prompts.seed`
    (in file order), and how many the file held."""
    uri = spec.prompts.uri
    assert uri, "resolve the spec first"
    storage, name = _split_uri(uri)
    if not storage.exists(name):
        raise InputMissing(f"spec.prompts.uri: {uri} does not exist; give a captions file (JSONL or TSV)")
    data = storage.read_bytes(name)
    if len(data) > MAX_PROMPTS_BYTES:
        raise SpecError(f"spec.prompts.uri: {uri} is {len(data)} bytes, over {MAX_PROMPTS_BYTES >> 20} MiB")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise SpecError(f"{uri}:{line}: not UTF-8; save the captions file as UTF-8") from None
    fmt = spec.prompts.format
    if fmt == "auto":
        fmt = "tsv" if PurePosixPath(name).suffix.lower() == ".tsv" else "jsonl"
    records = parse_prompts(text, fmt, uri)
    if len(records) < 2:
        raise SpecError(f"spec.prompts.uri: {uri} holds {len(records)} captions; FID needs at least 2")
    count = len(records)
    if count > spec.prompts.limit:
        keep = sorted(random.Random(spec.prompts.seed).sample(range(count), spec.prompts.limit))
        records = [records[index] for index in keep]
    return records, count


def plan_references(spec: EvalRunSpec) -> list[EvalUnit]:
    """Reference units after the generation units' numbers: MDS shards (whole shards, `samplesPerUnit`
    images or more each) or image files (`samplesPerUnit` each), the first `references.limit` images."""
    uri, limit, per_unit = spec.references.uri.rstrip("/"), spec.references.limit, spec.samples_per_unit
    storage = open_storage(uri)
    planned: list[EvalUnit] = []
    if storage.exists("index.json"):
        shards = [s for s in json.loads(storage.read_text("index.json"))["shards"] if s["samples"]]
        if shards and "image" not in shards[0]["column_names"]:
            raise InputMissing(f"spec.references.uri: {uri} is an MDS dataset without an `image` column")
        taken, kept = 0, []
        for shard in shards:
            if taken >= limit:
                break
            kept.append(shard)
            taken += int(shard["samples"])
        remaining = limit
        for group in group_shards(kept, per_unit):
            planned.append(EvalUnit(0, REFERENCES, source=uri, shards=group, limit=remaining))
            remaining -= sum(int(s["samples"]) for s in group)
    else:
        files = sorted(key for key in storage.list("") if key.lower().endswith(IMAGE_SUFFIXES))[:limit]
        for start in range(0, len(files), per_unit):
            chunk = files[start : start + per_unit]
            planned.append(EvalUnit(0, REFERENCES, source=uri, files=chunk, limit=len(chunk)))
    if not planned:
        raise InputMissing(
            f"spec.references.uri: {uri} holds no images; give an MDS dataset (with index.json) or a folder "
            f"of {'/'.join(IMAGE_SUFFIXES)} files"
        )
    return planned


def plan_units(spec: EvalRunSpec, prompt_count: int) -> list[EvalUnit]:
    """Generation units (per guidance scale, per seed, per slice of prompts), then reference units."""
    planned: list[EvalUnit] = []
    for scale in spec.guidance_scales:
        for seed in spec.seeds:
            for start in range(0, prompt_count, spec.samples_per_unit):
                end = min(prompt_count, start + spec.samples_per_unit)
                planned.append(EvalUnit(len(planned), GENERATED, start, end, scale, seed))
    for reference in plan_references(spec):
        planned.append(replace(reference, unit=len(planned)))
    return planned


def output_settings(spec: EvalRunSpec) -> dict[str, Any]:
    """What the output depends on (field path -> value): a change must not reuse finished units."""
    body = spec.model_dump(by_alias=True, mode="json")
    return {
        "spec.model.pipelineUri": spec.model.pipeline_uri,
        **{f"spec.prompts.{k}": v for k, v in sorted(body["prompts"].items())},
        **{f"spec.references.{k}": v for k, v in sorted(body["references"].items())},
        **{f"spec.extractors.{k}": v for k, v in sorted(body["extractors"].items())},
        **{f"spec.{k}": body[k] for k in ("resolution", "guidanceScales", "seeds", "inferenceSteps")},
        "spec.samplesPerUnit": spec.samples_per_unit,
    }


def ensure_plan(spec: EvalRunSpec, layout: StageLayout) -> Storage:
    """Plan once (spec resolved): `_plan/identity.json` (the settings, claimed for the output),
    `_plan/prompts.json` and `_plan/units.json`; a rerun finds them and plans nothing."""
    plan = layout.plan
    settings = output_settings(spec)
    inputs = [(spec.references.uri, "spec.references.uri")]
    if spec.model.pipeline_uri:
        inputs.append((spec.model.pipeline_uri, "spec.model.pipelineUri"))
    check_not_input(layout.output.uri, "spec.output.uri", inputs)
    claim_output(layout, "EvalRun", settings, "spec.output.uri")
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    if plan.exists(PLAN_FILE):
        if json.loads(plan.read_text(PLAN_FILE))["hash"] != digest:
            raise OutputReused(f"{plan.uri} was planned from other settings; use a new output.uri")
        return plan
    prompts, available = read_prompts(spec)
    plan.write_text(PROMPTS_FILE, json.dumps({"available": available, "prompts": prompts}))
    planned = plan_units(spec, len(prompts))
    # units.json last: its presence means the plan is whole.
    plan.write_text(PLAN_FILE, json.dumps({"hash": digest, "units": [asdict(u) for u in planned]}))
    return plan


def read_units(plan: Storage) -> list[EvalUnit]:
    return [EvalUnit(**unit) for unit in json.loads(plan.read_text(PLAN_FILE))["units"]]


def read_planned_prompts(plan: Storage) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(plan.read_text(PROMPTS_FILE))
    return data

"""Work units over another stage's output: groups of its MDS shards per split, planned once.

The stages that read a finished stage's output (caption reads the scrape catalog, latents reads the
captioned dataset) plan the same way: each unit is consecutive shards of one split's `index.json`
holding at least `samples_per_unit` samples between them (the last unit of a split may hold fewer;
a unit never splits a shard), and the plan is frozen under the stage's `_plan/units.json` with a hash
of what it was planned from, so reruns see the same units even if the input grows. Torch-free on
purpose: the plan and finalize pods run in the CPU image.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from commoncanvas.identity import OutputReused, check_not_input, claim_output
from commoncanvas.storage import Storage, open_storage
from commoncanvas.units import StageLayout

PLAN_FILE = "units.json"


class InputMissing(RuntimeError):
    """A stage's input is not there (yet): the message names the URI and the upstream."""


@dataclass(frozen=True)
class ShardGroupUnit:
    """One unit: some shards of `split_root`'s index, with the columns of the first of them."""

    unit: int
    split: str
    split_root: str
    shards: list[dict[str, Any]]
    columns: dict[str, str]


@dataclass(frozen=True)
class Upstream:
    """The stage whose output a stage reads, as the reading spec names it (for error messages)."""

    kind: str  # e.g. "ScrapeJob"
    noun: str  # what its output is called, e.g. "catalog"
    ref_field: str  # e.g. "input.scrapeJobRef"
    uris_field: str  # e.g. "input.uris"
    required_columns: tuple[str, ...] = ()


@dataclass(frozen=True)
class ShardInput:
    """What a stage reads: its upstream's output by reference or by URIs, which splits, how grouped."""

    upstream: Upstream
    ref: str | None
    uris: Sequence[str]
    splits: Sequence[str]
    samples_per_unit: int


def input_roots(source: ShardInput, resolve_ref: Callable[[str], str] | None) -> list[tuple[str, str]]:
    """(root URI, where it came from) per input, resolving a reference to the upstream resource."""
    upstream = source.upstream
    if source.ref:
        if resolve_ref is None:
            raise InputMissing(
                f"{upstream.ref_field} {source.ref!r} cannot be resolved here; "
                f"give {upstream.uris_field} instead"
            )
        return [(resolve_ref(source.ref), f"{upstream.kind} {source.ref!r}")]
    return [(uri, upstream.uris_field) for uri in source.uris]


def plan_units(source: ShardInput, resolve_ref: Callable[[str], str] | None) -> list[ShardGroupUnit]:
    upstream = source.upstream
    planned: list[ShardGroupUnit] = []
    for root, origin in input_roots(source, resolve_ref):
        for split in source.splits:
            split_root = f"{root.rstrip('/')}/{split}"
            storage = open_storage(split_root)
            if not storage.exists("index.json"):
                raise InputMissing(
                    f"{split_root}/index.json does not exist: the {upstream.noun} from {origin} is missing "
                    f"or not finished (a {upstream.kind} writes it once all its units are done)"
                )
            # A shard with no samples (MDSWriter can leave one) would make an empty, unreadable unit.
            shards = [s for s in json.loads(storage.read_text("index.json"))["shards"] if s["samples"]]
            for group in group_shards(shards, source.samples_per_unit):
                columns = dict(zip(group[0]["column_names"], group[0]["column_encodings"], strict=True))
                if any(name not in columns for name in upstream.required_columns):
                    missing = "/".join(upstream.required_columns)
                    raise InputMissing(f"{split_root} is not a {upstream.noun}: it has no {missing}")
                planned.append(ShardGroupUnit(len(planned), split, split_root, group, columns))
    return planned


def group_shards(shards: list[dict[str, Any]], samples_per_unit: int) -> list[list[dict[str, Any]]]:
    """Consecutive shards, cut as soon as a group holds `samples_per_unit` samples."""
    groups: list[list[dict[str, Any]]] = []
    group: list[dict[str, Any]] = []
    samples = 0
    for shard in shards:
        group.append(shard)
        samples += int(shard["samples"])
        if samples >= samples_per_unit:
            groups.append(group)
            group, samples = [], 0
    if group:
        groups.append(group)
    return groups


def plan_hash(source: ShardInput, roots: list[tuple[str, str]], settings: dict[str, Any]) -> str:
    relevant = {
        "roots": [root for root, _ in roots],
        "splits": list(source.splits),
        "samples_per_unit": source.samples_per_unit,
        **settings,
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def ensure_plan(
    layout: StageLayout,
    source: ShardInput,
    resolve_ref: Callable[[str], str] | None,
    settings: Mapping[str, Any] | None = None,
    kind: str = "",
) -> Storage:
    """Plan once and keep it under `_plan/`: later units and reruns see the same units even if the input
    grows. `settings` (field path -> value) are what else the output depends on; with the reading
    stage's `kind` they are claimed for the output (identity), so a change is refused naming the field."""
    plan = layout.plan
    roots = input_roots(source, resolve_ref)
    if kind:
        inputs_field = f"spec.{source.upstream.uris_field}"
        check_not_input(layout.output.uri, "spec.output.uri", [(root, inputs_field) for root, _ in roots])
        claimed = {**(settings or {}), inputs_field: [root for root, _ in roots]}
        claim_output(layout, kind, claimed, "spec.output.uri")
    digest = plan_hash(source, roots, dict(settings or {}))
    if plan.exists(PLAN_FILE):
        if json.loads(plan.read_text(PLAN_FILE))["hash"] != digest:
            raise OutputReused(
                f"{plan.uri} was planned from other inputs, splits or unit size; use a new output.uri"
            )
        return plan
    planned = plan_units(source, resolve_ref)
    plan.write_text(PLAN_FILE, json.dumps({"hash": digest, "units": [asdict(u) for u in planned]}))
    return plan


def read_units(plan: Storage) -> list[ShardGroupUnit]:
    return [ShardGroupUnit(**unit) for unit in json.loads(plan.read_text(PLAN_FILE))["units"]]

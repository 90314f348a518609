"""The ScrapeJob worker: fetch a unit's planned samples into MDS shards (workqueue publishes them)."""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from commoncanvas import metrics, units
from commoncanvas.identity import check_not_input, claim_output
from commoncanvas.mds import MDSShardWriter
from commoncanvas.scrape import dedup
from commoncanvas.scrape.fetch import Fetcher, FetchResult
from commoncanvas.scrape.plan import (
    PLAN_SUMMARY,
    SPLITS,
    UNITS_FILE,
    PlannedSample,
    plan_hash,
    read_unit_plan,
    read_units,
    spec_splits,
    unit_plan_key,
    write_plan,
)
from commoncanvas.specs.common import PlanMismatch
from commoncanvas.specs.scrape import ScrapeJobSpec
from commoncanvas.units import StageLayout
from commoncanvas.workqueue import TransientUnitError

log = logging.getLogger(__name__)
STAGE = "scrape"
FAILURES_KEPT = 10_000  # per unit; the counts are always exact
RETRYABLE = "retryable"  # a marker's outcome for samples that failed transiently

# The catalog's columns: the image as fetched (native resolution), its full license + attribution and
# every YFCC100M field read (CommonCatalog's; the README lists them). Later stages carry them all.
CATALOG_COLUMNS = {
    "image": "bytes",
    "photo_id": "int",
    "split": "str",
    "license_code": "str",
    "license_name": "str",
    "license_url": "str",
    "author": "str",
    "author_nsid": "str",
    "title": "str",
    "description": "str",
    "tags": "json",
    "machine_tags": "json",
    "date_taken": "str",
    "date_uploaded": "int",
    "capture_device": "str",
    "longitude": "str",
    "latitude": "str",
    "accuracy": "str",
    "photo_hash": "str",
    "page_url": "str",
    "download_url": "str",
    "fetched_url": "str",
    "width": "int",
    "height": "int",
    "sha256": "str",
}
# Columns of the plan's sample copied as they are.
_PLANNED_COLUMNS = tuple(
    name for name in CATALOG_COLUMNS if name in PlannedSample._fields and name not in ("tags", "machine_tags")
)


_BLANK = {"bytes": b"", "str": "", "int": 0, "json": []}


def blank_catalog_row(**values: Any) -> dict[str, Any]:
    """A catalog row with every column blank but `values` (for tests and benchmarks that write one)."""
    return {name: _BLANK[encoding] for name, encoding in CATALOG_COLUMNS.items()} | values


def catalog_row(result: FetchResult) -> dict[str, Any]:
    s = result.sample
    row: dict[str, Any] = {name: getattr(s, name) for name in _PLANNED_COLUMNS}
    row.update(
        image=result.data,
        tags=list(s.tags),
        machine_tags=list(s.machine_tags),
        fetched_url=result.url,
        width=result.width,
        height=result.height,
        sha256=result.sha256,
    )
    return row


def layout_of(spec: ScrapeJobSpec) -> StageLayout:
    return StageLayout.at(spec.output.uri)


# What decides which samples the catalog keeps, beyond the plan itself (its source, license policy,
# URL templates and unit size are in plan_hash): a rerun with another value must not reuse the units.
OUTPUT_SETTINGS = {
    "spec.filters.minSide": lambda s: s.filters.min_side,
    "spec.filters.maxPixels": lambda s: s.filters.max_pixels,
    "spec.filters.check": lambda s: s.filters.check,
    "spec.fetch.maxBytes": lambda s: s.fetch.max_bytes,
    "spec.fetch.maxRedirects": lambda s: s.fetch.max_redirects,
    "spec.fetch.allowedHosts": lambda s: s.fetch.allowed_hosts,
    "spec.fetch.allowPrivateNetworks": lambda s: s.fetch.allow_private_networks,
    "spec.fetch.honorRobotsTags": lambda s: s.fetch.honor_robots_tags,
    "spec.fetch.unavailableUrlMarkers": lambda s: s.fetch.unavailable_url_markers,
    "spec.fetch.placeholderFingerprints": lambda s: s.fetch.placeholder_fingerprints,
    "spec.source.uri": lambda s: s.source.uri,
    "spec.licenses.allow": lambda s: sorted(s.licenses.allow),
    "spec.unitSize": lambda s: s.unit_size,
    "spec.fetch.originalUrlTemplate": lambda s: s.fetch.original_url_template,
    "spec.fetch.sizedUrlTemplate": lambda s: s.fetch.sized_url_template,
    "spec.fetch.useDownloadUrl": lambda s: s.fetch.use_download_url,
}


def ensure_plan(spec: ScrapeJobSpec, layout: StageLayout) -> dict[str, Any]:
    """Plan once; a rerun reuses the plan if it was made from the same inputs and settings, else
    refuses naming the field."""
    check_not_input(spec.output.uri, "spec.output.uri", [(spec.source.uri, "spec.source.uri")], nested=False)
    claim_output(
        layout, "ScrapeJob", {name: get(spec) for name, get in OUTPUT_SETTINGS.items()}, "spec.output.uri"
    )
    if layout.plan.exists(PLAN_SUMMARY):
        summary: dict[str, Any] = json.loads(layout.plan.read_text(PLAN_SUMMARY))
        if summary.get("spec_hash") != plan_hash(spec):
            raise PlanMismatch(
                f"{layout.plan.uri} holds a plan made from a different source, license policy, URL "
                "templates or unit size; use a new output URI (finished units would not match)"
            )
        return summary
    return write_plan(spec, layout.plan).to_dict()


class ScrapeStage:
    """The ScrapeJob's part of a worker (workqueue.StageWorker): fetch one unit's planned samples and
    write them as MDS under the attempt's prefix. No model to load."""

    stage = STAGE

    def __init__(self, spec: ScrapeJobSpec) -> None:
        self.spec = spec
        self.layout = layout_of(spec)
        self.output = self.layout.output
        self.planned = read_units(self.layout.plan)

    def total_units(self) -> int:
        return len(self.planned)

    def load_model(self) -> bool:
        return False

    def run_attempt(self, unit: int, attempt: int) -> dict[str, Any]:
        return run_attempt(self.spec, self.layout, self.planned[unit], attempt)


def run_attempt(spec: ScrapeJobSpec, layout: StageLayout, unit_info: dict[str, Any], attempt: int) -> dict:
    """Fetch one unit's samples into the attempt's MDS and return its stats (the marker to publish)."""
    unit, split = int(unit_info["unit"]), str(unit_info["split"])
    samples = read_unit_plan(layout.plan, unit)
    units.begin_attempt(layout.output, [split], unit, attempt)
    started = time.perf_counter()
    outcomes: Counter[str] = Counter()
    written_licenses: Counter[str] = Counter()
    failures: list[dict[str, Any]] = []
    retryable: list[tuple[int, str]] = []  # (plan line, outcome): fetched again by a rerun's retry units
    copies: list[str] = []  # what the catalog-wide deduplication reads (scrape.dedup)
    written_bytes = 0
    first_transient = ""
    with tempfile.TemporaryDirectory(prefix=f"commoncanvas-scrape-{unit:06d}-") as tmp:
        local = units.staging_dir(layout.output, split, unit, attempt, Path(tmp))
        # One writer thread keeps shard flushes off the event loop and the rows in arrival order.
        with (
            MDSShardWriter(local, CATALOG_COLUMNS) as writer,
            ThreadPoolExecutor(1, thread_name_prefix="mds-writer") as write_thread,
        ):
            writes: list[Future[None]] = []

            def on_result(result: FetchResult) -> None:
                nonlocal written_bytes, first_transient
                # A transient failure is never an exclusion: counted apart, its sample kept for a rerun.
                outcomes[RETRYABLE if result.transient else result.outcome] += 1
                metrics.SAMPLES.labels(STAGE, split, result.outcome).inc()
                if result.transient:
                    retryable.append((result.sample.line, result.outcome))
                    first_transient = first_transient or f"{result.outcome}: {result.detail[:200]}"
                elif result.outcome == "ok":
                    writes.append(write_thread.submit(writer.write, catalog_row(result)))
                    copies.append(dedup.copy_line(result.sha256, result.sample))
                    written_licenses[result.sample.license_code] += 1
                    written_bytes += len(result.data)
                    metrics.BYTES.labels(STAGE, split).inc(len(result.data))
                elif len(failures) < FAILURES_KEPT:
                    failures.append(
                        {
                            "photo_id": result.sample.photo_id,
                            "reason": result.outcome,
                            "detail": result.detail[:500],
                        }
                    )

            metrics.expect_hosts(url for sample in samples for url in sample.candidates)
            asyncio.run(Fetcher(spec.fetch, spec.filters, split).fetch_all(samples, on_result))
            for write in writes:
                write.result()  # re-raise a failed write here, before the unit can be published
        if outcomes["ok"]:
            (local / dedup.COPIES).write_text("".join(copies), encoding="utf-8")
            units.upload_attempt(layout.output, split, unit, attempt, local)
    assert sum(outcomes.values()) == len(samples), "every planned sample must have an outcome"
    if len(retryable) > spec.fetch.max_transient_failures * len(samples):
        # An outage, not the photos: publishing now would leave most of the unit to reruns.
        raise TransientUnitError(
            f"unit {unit}: {len(retryable)} of {len(samples)} samples failed transiently (first: "
            f"{first_transient}), over fetch.maxTransientFailures={spec.fetch.max_transient_failures:g}; "
            "the unit is retried, nothing of it is published"
        )
    return {
        "unit": unit,
        "split": split,
        "planned": len(samples),
        "written": outcomes["ok"],
        "outcomes": dict(sorted(outcomes.items())),
        "bytes": written_bytes,
        "seconds": round(time.perf_counter() - started, 3),
        "licenses": dict(sorted(written_licenses.items())),
        "failures": failures,
        "retryable": sorted(retryable),
    }


def pending_retries(
    layout: StageLayout, planned: list[dict[str, Any]], markers: dict[int, dict[str, Any]]
) -> dict[int, dict[int, str]]:
    """Samples whose latest fetch failed transiently: {unit that reported them: {plan line: outcome}}.
    A line is pending until a later (retry) unit holds it; each metadata line is planned once, so a
    line names one sample."""
    retried_in: dict[int, int] = {}  # line -> the latest retry unit holding it
    for info in planned:
        if info.get("retry"):
            for sample in read_unit_plan(layout.plan, int(info["unit"])):
                retried_in[sample.line] = int(info["unit"])
    pending: dict[int, dict[int, str]] = {}
    for unit, marker in markers.items():
        for line, outcome in marker.get("retryable", ()):
            if retried_in.get(line, unit) <= unit:
                pending.setdefault(unit, {})[int(line)] = str(outcome)
    return pending


def plan_retries(spec: ScrapeJobSpec, layout: StageLayout) -> int:
    """A rerun's first step: once every planned unit has its marker, plan retry units (numbered after
    the others, `unitSize` samples each, per split) holding the samples that failed transiently, so
    they are fetched again without refetching or duplicating anything. Returns the units added."""
    planned = read_units(layout.plan)
    done = units.done_units(layout.output)
    if any(int(info["unit"]) not in done for info in planned):
        return 0  # an unfinished run: its own units first (a retry is for what finished transiently)
    by_split: dict[str, list[PlannedSample]] = {}
    markers = units.read_markers(layout.output)
    for unit, lines in sorted(pending_retries(layout, planned, markers).items()):
        for sample in read_unit_plan(layout.plan, unit):
            if sample.line in lines:
                by_split.setdefault(sample.split, []).append(sample)
    added: list[dict[str, Any]] = []
    for split in SPLITS:
        samples = sorted(by_split.get(split, ()), key=lambda s: s.line)
        for start in range(0, len(samples), spec.unit_size):
            chunk = samples[start : start + spec.unit_size]
            unit = len(planned) + len(added)
            layout.plan.write_bytes(unit_plan_key(unit), "".join(s.to_json() + "\n" for s in chunk).encode())
            added.append({"unit": unit, "split": split, "samples": len(chunk), "retry": True})
    if added:
        # The unit files first, the list last: a reader never sees a unit without its file.
        layout.plan.write_text(UNITS_FILE, json.dumps([*planned, *added], indent=0))
    return len(added)


def prepare(spec: ScrapeJobSpec) -> int:
    """A run's first step (the plan pod's, or the local runner's): plan once, then retry units for
    what an earlier run left transient. Returns how many units the workers have to see."""
    layout = layout_of(spec)
    ensure_plan(spec, layout)
    plan_retries(spec, layout)
    return len(read_units(layout.plan))


def finalize(spec: ScrapeJobSpec) -> dict[str, Any]:
    """Once every unit has its marker: merge each split's index and write the job summary."""
    layout = layout_of(spec)
    plan = ensure_plan(spec, layout)
    planned = read_units(layout.plan)
    markers = units.read_markers(layout.output)  # read once: ~7k objects at paper scale
    splits = spec_splits(spec)
    merged = units.summarize(layout, {u["unit"]: u["split"] for u in planned}, splits, markers)
    failed = merged.pop("failed")
    failed.pop(RETRYABLE, None)  # counted below, by what is still to fetch (a retry unit may have it)
    excluded = Counter(plan["excluded"])
    excluded.update({f"fetch:{outcome}": n for outcome, n in failed.items()})
    duplicates = dedup.find_duplicates(layout.output, markers)
    layout.output.write_text(dedup.DUPLICATES, json.dumps(duplicates))
    for split, photo_ids in duplicates["dropped"].items():
        merged["samples"][split] -= len(photo_ids)
        excluded["duplicate"] += len(photo_ids)
    licenses = Counter(merged["licenses"])
    licenses.subtract(c["license_code"] for copies in duplicates["credits"].values() for c in copies)
    merged["licenses"] = {code: n for code, n in sorted(licenses.items()) if n}
    transient = Counter(
        outcome for lines in pending_retries(layout, planned, markers).values() for outcome in lines.values()
    )
    result = {
        **merged,
        "excluded": dict(sorted(excluded.items())),
        # Not exclusions: samples a rerun fetches again (retry units), by the outcome of their last try.
        "transient": dict(sorted(transient.items())),
        "warnings": plan.get("warnings", {}),
        "planned": {split: plan.get(split, 0) for split in splits},
        "malformed": plan["malformed"],
    }
    layout.output.write_text("summary.json", json.dumps(result, indent=1))
    return result

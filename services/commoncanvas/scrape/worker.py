"""One ScrapeJob work unit: fetch its planned samples, write MDS shards, publish, then the marker."""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streaming import MDSWriter

from commoncanvas import metrics, units
from commoncanvas.scrape.fetch import Fetcher, FetchResult
from commoncanvas.scrape.plan import PLAN_SUMMARY, plan_hash, read_unit_plan, read_units, write_plan
from commoncanvas.specs.scrape import ScrapeJobSpec
from commoncanvas.storage import Storage, open_storage

log = logging.getLogger(__name__)
STAGE = "scrape"
PLAN_DIR = "_plan"
FAILURES_KEPT = 10_000  # per unit; the counts are always exact

# The catalog's columns: the image as fetched (native resolution) and its full license + attribution.
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
    "tags": "json",
    "page_url": "str",
    "fetched_url": "str",
    "width": "int",
    "height": "int",
    "sha256": "str",
}


def catalog_row(result: FetchResult) -> dict[str, Any]:
    s = result.sample
    return {
        "image": result.data,
        "photo_id": s.photo_id,
        "split": s.split,
        "license_code": s.license_code,
        "license_name": s.license_name,
        "license_url": s.license_url,
        "author": s.author,
        "author_nsid": s.author_nsid,
        "title": s.title,
        "tags": list(s.tags),
        "page_url": s.page_url,
        "fetched_url": result.url,
        "width": result.width,
        "height": result.height,
        "sha256": result.sha256,
    }


@dataclass(frozen=True)
class ScrapeLayout:
    """Where a ScrapeJob keeps things under its output root."""

    output: Storage

    @property
    def plan(self) -> Storage:
        return self.output.child(PLAN_DIR)

    @classmethod
    def of(cls, spec: ScrapeJobSpec) -> ScrapeLayout:
        return cls(open_storage(spec.output.uri))


def ensure_plan(spec: ScrapeJobSpec, layout: ScrapeLayout) -> dict[str, Any]:
    """Plan once; a rerun reuses the plan if it was made from the same inputs, else refuses."""
    if layout.plan.exists(PLAN_SUMMARY):
        summary: dict[str, Any] = json.loads(layout.plan.read_text(PLAN_SUMMARY))
        if summary.get("spec_hash") != plan_hash(spec):
            raise ValueError(
                f"{layout.plan.uri} holds a plan made from a different source, license policy, URL "
                "templates or unit size; use a new output URI (finished units would not match)"
            )
        return summary
    return write_plan(spec, layout.plan).to_dict()


def run_unit(spec: ScrapeJobSpec, unit: int) -> dict[str, Any]:
    """Run unit `unit` to completion, or return its marker if it already finished."""
    layout = ScrapeLayout.of(spec)
    if units.is_done(layout.output, unit):
        return units.read_marker(layout.output, unit)
    unit_info = read_units(layout.plan)[unit]
    split = unit_info["split"]
    samples = read_unit_plan(layout.plan, unit)
    units.begin_unit(layout.output, [split], unit)
    started = time.perf_counter()
    outcomes: Counter[str] = Counter()
    written_licenses: Counter[str] = Counter()
    failures: list[dict[str, Any]] = []
    written_bytes = 0
    with tempfile.TemporaryDirectory(prefix=f"commoncanvas-scrape-{unit:06d}-") as tmp:
        local = Path(tmp) / split
        with MDSWriter(out=str(local), columns=CATALOG_COLUMNS, size_limit="256mb") as writer:

            def on_result(result: FetchResult) -> None:
                nonlocal written_bytes
                outcomes[result.outcome] += 1
                metrics.SAMPLES.labels(STAGE, split, result.outcome).inc()
                if result.outcome == "ok":
                    writer.write(catalog_row(result))
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

            asyncio.run(Fetcher(spec.fetch, spec.filters, split).fetch_all(samples, on_result))
        if outcomes["ok"]:
            units.publish_unit(layout.output, split, unit, local)
    seconds = time.perf_counter() - started
    stats = {
        "unit": unit,
        "split": split,
        "planned": len(samples),
        "written": outcomes["ok"],
        "outcomes": dict(sorted(outcomes.items())),
        "bytes": written_bytes,
        "seconds": round(seconds, 3),
        "licenses": dict(sorted(written_licenses.items())),
        "failures": failures,
    }
    assert sum(outcomes.values()) == len(samples), "every planned sample must have an outcome"
    units.finish_unit(layout.output, unit, stats)
    metrics.UNITS.labels(STAGE, "succeeded").inc()
    metrics.UNIT_SECONDS.labels(STAGE).observe(seconds)
    metrics.IMAGES_PER_SECOND.labels(STAGE).set(outcomes["ok"] / seconds if seconds else 0)
    log.info("unit %d (%s): %d/%d written in %.1fs", unit, split, outcomes["ok"], len(samples), seconds)
    return stats


def finalize(spec: ScrapeJobSpec) -> dict[str, Any]:
    """Once every unit has its marker: merge each split's index and return the job summary."""
    layout = ScrapeLayout.of(spec)
    plan_units = read_units(layout.plan)
    markers = units.read_markers(layout.output)
    missing = [u["unit"] for u in plan_units if u["unit"] not in markers]
    if missing:
        raise RuntimeError(f"{len(missing)} units have no marker yet (first: {missing[:5]}); rerun to finish")
    summary = ensure_plan(spec, layout)
    samples: dict[str, int] = {}
    licenses: Counter[str] = Counter()
    excluded: Counter[str] = Counter(summary["excluded"])
    for split in ("commercial", "noncommercial"):
        split_units = [u["unit"] for u in plan_units if u["split"] == split]
        samples[split] = units.merge_split_index(layout.output, split, split_units)
    for marker in markers.values():
        licenses.update(marker["licenses"])
        excluded.update(
            {f"fetch:{outcome}": n for outcome, n in marker["outcomes"].items() if outcome != "ok"}
        )
    result = {
        "samples": samples,
        "licenses": dict(sorted(licenses.items())),
        "excluded": dict(sorted(excluded.items())),
        "units": len(plan_units),
        "outputs": {split: layout.output.url(split) for split, n in samples.items() if n},
        "planned": {"commercial": summary["commercial"], "noncommercial": summary["noncommercial"]},
        "malformed": summary["malformed"],
    }
    layout.output.write_text("summary.json", json.dumps(result, indent=1))
    return result

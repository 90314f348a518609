"""Planning: metadata rows -> licensed, attributed records grouped into per-split work units.

Pure decisions (`plan_record`) are separate from the streaming writer (`write_plan`), so a 100M-row
metadata file is planned in constant memory and the decisions are unit-tested directly.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from commoncanvas.licenses import LicensePolicy, Split, normalized_license_url
from commoncanvas.metadata import MalformedRow, PhotoRecord, ReadStats, read_metadata
from commoncanvas.specs.scrape import FetchPolicy, ScrapeJobSpec
from commoncanvas.storage import Storage, open_storage

MALFORMED_REPORTED = 1000  # line numbers kept in the summary; the count is always exact
PLAN_SUMMARY = "summary.json"


@dataclass(frozen=True, slots=True)
class PlannedSample:
    photo_id: int
    line: int
    split: str
    license_code: str
    license_name: str
    license_url: str
    author: str
    author_nsid: str
    title: str
    tags: tuple[str, ...]
    page_url: str
    candidates: tuple[str, ...]

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> PlannedSample:
        data = json.loads(text)
        data["tags"] = tuple(data["tags"])
        data["candidates"] = tuple(data["candidates"])
        return cls(**data)


def candidate_urls(record: PhotoRecord, fetch: FetchPolicy) -> tuple[str, ...]:
    """Original resolution first, then the `_b` size, then the listed download URL; no repeats."""
    values = {
        "farm": record.farm,
        "server": record.server,
        "id": record.photo_id,
        "secret": record.secret,
        "secret_original": record.secret_original,
        "ext": record.extension,
    }
    urls: list[str] = []
    if record.farm and record.server and record.secret_original and record.extension:
        urls.append(fetch.original_url_template.format(**values))
    if record.farm and record.server and record.secret:
        urls.append(fetch.sized_url_template.format(**values))
    if fetch.use_download_url and record.download_url:
        urls.append(record.download_url)
    return tuple(dict.fromkeys(urls))


def plan_record(record: PhotoRecord, policy: LicensePolicy, fetch: FetchPolicy) -> PlannedSample | str:
    """One metadata row -> a planned sample, or the reason it is excluded."""
    if record.is_video:
        return "video"
    decision = policy.decide(record.license_name, record.license_url)
    if decision.reason:
        return decision.reason
    assert decision.license and decision.split
    candidates = candidate_urls(record, fetch)
    if not candidates:
        return "no-candidate-url"
    return PlannedSample(
        photo_id=record.photo_id,
        line=record.line,
        split=str(decision.split),
        license_code=decision.license.code,
        license_name=decision.license.name,
        license_url=normalized_license_url(decision.license, record.license_url),
        author=record.user_nickname,
        author_nsid=record.user_nsid,
        title=record.title,
        tags=record.tags,
        page_url=record.page_url,
        candidates=candidates,
    )


@dataclass
class PlanSummary:
    commercial: int = 0
    noncommercial: int = 0
    excluded: Counter[str] = field(default_factory=Counter)
    licenses: Counter[str] = field(default_factory=Counter)
    rows: int = 0
    layout: str = ""
    units: list[dict[str, Any]] = field(default_factory=list)
    malformed: list[dict[str, Any]] = field(default_factory=list)
    spec_hash: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "commercial": self.commercial,
            "noncommercial": self.noncommercial,
            "excluded": dict(sorted(self.excluded.items())),
            "licenses": dict(sorted(self.licenses.items())),
            "rows": self.rows,
            "layout": self.layout,
            "units": len(self.units),
            "malformed": self.malformed,
            "spec_hash": self.spec_hash,
        }


def plan_hash(spec: ScrapeJobSpec) -> str:
    """What the plan depends on; a rerun with a different one must not reuse the plan."""
    relevant = {
        "source": spec.source.model_dump(),
        "licenses": spec.licenses.model_dump(),
        "fetch_urls": [
            spec.fetch.original_url_template,
            spec.fetch.sized_url_template,
            spec.fetch.use_download_url,
        ],
        "unit_size": spec.unit_size,
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def iter_plan(
    rows: Iterable[PhotoRecord | MalformedRow],
    policy: LicensePolicy,
    fetch: FetchPolicy,
    unit_size: int,
    summary: PlanSummary,
) -> Iterator[tuple[str, list[PlannedSample]]]:
    """Yields (split, samples) per work unit, in unit order, filling each split's unit in turn."""
    pending: dict[str, list[PlannedSample]] = {Split.COMMERCIAL: [], Split.NONCOMMERCIAL: []}
    for row in rows:
        if isinstance(row, MalformedRow):
            summary.excluded[f"malformed:{row.reason}"] += 1
            if len(summary.malformed) < MALFORMED_REPORTED:
                summary.malformed.append({"line": row.line, "reason": row.reason, "detail": row.detail})
            continue
        result = plan_record(row, policy, fetch)
        if isinstance(result, str):
            summary.excluded[result] += 1
            continue
        summary.licenses[result.license_code] += 1
        bucket = pending[result.split]
        bucket.append(result)
        if len(bucket) == unit_size:
            yield result.split, bucket
            pending[result.split] = []
    for split, bucket in pending.items():
        if bucket:
            yield split, bucket


def write_plan(spec: ScrapeJobSpec, plan: Storage) -> PlanSummary:
    """Plan `spec.source` into `plan` (units/NNNNNN.jsonl, units.json, then summary.json last)."""
    summary = PlanSummary(spec_hash=plan_hash(spec))
    stats = ReadStats()
    policy = LicensePolicy(frozenset(spec.licenses.allow))
    with _local_metadata(spec.source.uri) as path:
        rows = read_metadata(path, stats)
        for unit, (split, samples) in enumerate(iter_plan(rows, policy, spec.fetch, spec.unit_size, summary)):
            plan.write_text(unit_plan_key(unit), "".join(s.to_json() + "\n" for s in samples))
            summary.units.append({"unit": unit, "split": split, "samples": len(samples)})
            if split == Split.COMMERCIAL:
                summary.commercial += len(samples)
            else:
                summary.noncommercial += len(samples)
    summary.rows, summary.layout = stats.rows, stats.layout
    plan.write_text("units.json", json.dumps(summary.units, indent=0))
    plan.write_text(PLAN_SUMMARY, json.dumps(summary.to_dict(), indent=1))
    return summary


def unit_plan_key(unit: int) -> str:
    return f"units/{unit:06d}.jsonl"


def read_unit_plan(plan: Storage, unit: int) -> list[PlannedSample]:
    return [
        PlannedSample.from_json(line)
        for line in plan.read_text(unit_plan_key(unit)).splitlines()
        if line.strip()
    ]


def read_units(plan: Storage) -> list[dict[str, Any]]:
    units: list[dict[str, Any]] = json.loads(plan.read_text("units.json"))
    return units


@contextmanager
def _local_metadata(uri: str) -> Iterator[str]:
    """A local path for the metadata: itself, or a download of an s3:// object into a temp file."""
    if not uri.startswith("s3://"):
        yield uri
        return
    parent, _, key = uri.rpartition("/")
    with tempfile.TemporaryDirectory(prefix="commoncanvas-metadata-") as tmp:
        local = Path(tmp) / key
        open_storage(parent).download_file(key, local)
        yield str(local)

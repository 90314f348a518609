"""Planning: metadata rows -> licensed, attributed records grouped into per-split work units.

Pure decisions (`plan_record`) are separate from the streaming writer (`write_plan`). The metadata is
planned part by part (`metadata.iter_parts`) in a process pool, each part streamed to its own temporary
files; parts are merged in file order, so the plan is the same byte for byte whatever the number of
processes, and memory stays flat however large the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from array import array
from collections import Counter, deque
from collections.abc import Generator, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain, islice
from json.encoder import encode_basestring
from multiprocessing import get_context
from pathlib import Path
from typing import Any, NamedTuple

from commoncanvas.licenses import TRAINING_SPLITS, LicensePolicy, Split, normalized_license_url
from commoncanvas.metadata import (
    PART_BYTES,
    MalformedRow,
    Part,
    PhotoRecord,
    ReadStats,
    iter_parts,
    layout_of,
    read_part,
)
from commoncanvas.redact import strip_userinfo
from commoncanvas.specs.scrape import FetchPolicy, ScrapeJobSpec
from commoncanvas.storage import Storage, open_storage

MALFORMED_REPORTED = 1000  # line numbers kept in the summary; the count is always exact
PLAN_SUMMARY = "summary.json"
UNITS_FILE = "units.json"  # the unit list; a rerun appends retry units (scrape.worker.plan_retries)
# Every split a plan may hold; last partial units are written in this order.
SPLITS = (Split.COMMERCIAL.value, Split.NONCOMMERCIAL.value, Split.EVALUATION.value)
_WRITE_BATCH = 1024  # planned lines buffered per temporary file
_UNIT_WRITERS = 16  # unit files written at once (object stores take one request per unit)
_LINES_IN_FLIGHT = 256 << 20  # bytes of decompressed parts handed to processes and not yet planned


class PlannedSample(NamedTuple):
    """One sample to fetch. A named tuple: built per planned row, and a frozen dataclass costs 3x."""

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
    # Informational: carried into the catalog as read (blank where unreadable), never a reason to drop.
    description: str = ""
    machine_tags: tuple[str, ...] = ()
    date_taken: str = ""
    date_uploaded: int = 0
    capture_device: str = ""
    longitude: str = ""
    latitude: str = ""
    accuracy: str = ""
    photo_hash: str = ""
    download_url: str = ""

    def to_json(self) -> str:
        """One JSON line, as json.dumps(self._asdict(), ensure_ascii=False) writes it at a third of the
        cost (written per planned row). No "\n" inside; U+2028 and the like may be: split on "\n"."""
        q = encode_basestring
        return (
            f'{{"photo_id": {self.photo_id}, "line": {self.line}, "split": {q(self.split)}, '
            f'"license_code": {q(self.license_code)}, "license_name": {q(self.license_name)}, '
            f'"license_url": {q(self.license_url)}, "author": {q(self.author)}, '
            f'"author_nsid": {q(self.author_nsid)}, "title": {q(self.title)}, '
            f'"tags": [{", ".join(map(q, self.tags))}], "page_url": {q(self.page_url)}, '
            f'"candidates": [{", ".join(map(q, self.candidates))}], '
            f'"description": {q(self.description)}, '
            f'"machine_tags": [{", ".join(map(q, self.machine_tags))}], '
            f'"date_taken": {q(self.date_taken)}, "date_uploaded": {self.date_uploaded}, '
            f'"capture_device": {q(self.capture_device)}, "longitude": {q(self.longitude)}, '
            f'"latitude": {q(self.latitude)}, "accuracy": {q(self.accuracy)}, '
            f'"photo_hash": {q(self.photo_hash)}, "download_url": {q(self.download_url)}}}'
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> PlannedSample:
        data = json.loads(text)
        data["tags"] = tuple(data["tags"])
        data["candidates"] = tuple(data["candidates"])
        data["machine_tags"] = tuple(data.get("machine_tags", ()))
        return cls(**data)


def candidate_urls(record: PhotoRecord, fetch: FetchPolicy) -> tuple[str, ...]:
    """Original resolution first, then the `_b` size, then the listed download URL; no repeats."""
    urls: list[str] = []
    if record.farm and record.server and ((record.secret_original and record.extension) or record.secret):
        values = {
            "farm": record.farm,
            "server": record.server,
            "id": record.photo_id,
            "secret": record.secret,
            "secret_original": record.secret_original,
            "ext": record.extension,
        }
        if record.secret_original and record.extension:
            urls.append(fetch.original_url_template.format_map(values))
        if record.secret:
            urls.append(fetch.sized_url_template.format_map(values))
    if fetch.use_download_url and record.download_url:
        urls.append(record.download_url)
    # Plans never hold a credential: a template's is put back at fetch time for its own origin only
    # (fetch.TemplateCredentials); one planted in the metadata's download URL is never sent.
    return tuple(dict.fromkeys(map(strip_userinfo, urls)))


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
        page_url=strip_userinfo(record.page_url),
        candidates=candidates,
        description=record.description,
        machine_tags=record.machine_tags,
        date_taken=record.date_taken,
        date_uploaded=record.date_uploaded,
        capture_device=record.capture_device,
        longitude=record.longitude,
        latitude=record.latitude,
        accuracy=record.accuracy,
        photo_hash=record.photo_hash,
        download_url=strip_userinfo(record.download_url),
    )


@dataclass
class PlanSummary:
    commercial: int = 0
    noncommercial: int = 0
    evaluation: int = 0
    excluded: Counter[str] = field(default_factory=Counter)
    licenses: Counter[str] = field(default_factory=Counter)
    warnings: Counter[str] = field(default_factory=Counter)  # by field: kept, blank where unreadable
    rows: int = 0
    layout: str = ""
    units: list[dict[str, Any]] = field(default_factory=list)
    malformed: list[dict[str, Any]] = field(default_factory=list)
    spec_hash: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "commercial": self.commercial,
            "noncommercial": self.noncommercial,
            **({"evaluation": self.evaluation} if self.evaluation else {}),  # licenses.evaluationSplit
            "excluded": dict(sorted(self.excluded.items())),
            "licenses": dict(sorted(self.licenses.items())),
            "warnings": dict(sorted(self.warnings.items())),
            "rows": self.rows,
            "layout": self.layout,
            "units": len(self.units),
            "malformed": self.malformed,
            "spec_hash": self.spec_hash,
        }


def license_policy(spec: ScrapeJobSpec) -> LicensePolicy:
    return LicensePolicy(frozenset(spec.licenses.allow), spec.licenses.evaluation_split)


def spec_splits(spec: ScrapeJobSpec) -> tuple[str, ...]:
    """The splits a ScrapeJob writes (each gets an index, empty or not): C and NC, and the evaluation
    split when `licenses.evaluationSplit` asks for it."""
    return SPLITS if spec.licenses.evaluation_split else TRAINING_SPLITS


def plan_hash(spec: ScrapeJobSpec) -> str:
    """What the plan depends on; a rerun with a different one must not reuse the plan."""
    relevant = {
        "source": spec.source.model_dump(),
        # Off, the evaluation switch leaves the hash as it was before it existed: old plans still resume.
        "licenses": spec.licenses.model_dump(
            exclude=None if spec.licenses.evaluation_split else {"evaluation_split"}
        ),
        "fetch_urls": [
            spec.fetch.original_url_template,
            spec.fetch.sized_url_template,
            spec.fetch.use_download_url,
        ],
        "unit_size": spec.unit_size,
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


# --- one part ---------------------------------------------------------------------------------------


@dataclass
class PartPlan:
    """A part's planned samples, in a temporary file per split, with each sample's place among the
    part's samples (what decides which unit fills first) and where its line ends in its file."""

    files: dict[str, str]
    positions: dict[str, array[int]]
    ends: dict[str, array[int]]
    samples: int = 0
    excluded: Counter[str] = field(default_factory=Counter)
    licenses: Counter[str] = field(default_factory=Counter)
    malformed: list[dict[str, Any]] = field(default_factory=list)
    stats: ReadStats = field(default_factory=ReadStats)


def plan_part(part: Part, policy: LicensePolicy, fetch: FetchPolicy, tmp: str, index: int) -> PartPlan:
    """Plan one part into `tmp` (in a pool process, or this one)."""
    result = PartPlan(
        files={split: os.path.join(tmp, f"{index:08d}.{split}") for split in SPLITS},
        positions={split: array("I") for split in SPLITS},
        ends={split: array("Q") for split in SPLITS},
    )
    buffers: dict[str, list[bytes]] = {split: [] for split in SPLITS}
    written = dict.fromkeys(SPLITS, 0)
    handles = {split: open(path, "wb") for split, path in result.files.items()}  # noqa: SIM115
    try:
        for row in read_part(part, result.stats):
            if isinstance(row, MalformedRow):
                result.excluded[f"malformed:{row.reason}"] += 1
                if len(result.malformed) < MALFORMED_REPORTED:
                    result.malformed.append({"line": row.line, "reason": row.reason, "detail": row.detail})
                continue
            sample = plan_record(row, policy, fetch)
            if isinstance(sample, str):
                result.excluded[sample] += 1
                continue
            split = sample.split
            line = sample.to_json().encode() + b"\n"
            written[split] += len(line)
            result.ends[split].append(written[split])
            result.positions[split].append(result.samples)
            result.samples += 1
            result.licenses[sample.license_code] += 1
            buffer = buffers[split]
            buffer.append(line)
            if len(buffer) == _WRITE_BATCH:
                handles[split].write(b"".join(buffer))
                buffer.clear()
        for split, buffer in buffers.items():
            handles[split].write(b"".join(buffer))
    finally:
        for handle in handles.values():
            handle.close()
    return result


# --- the whole file ---------------------------------------------------------------------------------


class _Units:
    """Fills each split's units in sample order, parts merged in file order: unit numbers go by the
    sample that completes a unit, exactly as if the file had been planned row by row. Lines are cut
    from the parts' files by offset, so merging costs next to nothing per sample."""

    def __init__(self, plan: Storage, unit_size: int, summary: PlanSummary) -> None:
        self.plan, self.unit_size, self.summary = plan, unit_size, summary
        self.pending: dict[str, list[bytes]] = {split: [] for split in SPLITS}  # the next unit's lines
        self.count = dict.fromkeys(SPLITS, 0)  # ... and how many samples they hold
        self.writes: deque[Future[None]] = deque()
        self.writer = ThreadPoolExecutor(_UNIT_WRITERS, thread_name_prefix="plan-writer")

    def add(self, part: PartPlan) -> None:
        data: dict[str, bytes] = {}
        fills: list[tuple[int, str, int]] = []  # (place among the part's samples, split, samples taken)
        for split in SPLITS:
            with open(part.files[split], "rb") as handle:
                data[split] = handle.read()
            os.unlink(part.files[split])
            first = self.unit_size - self.count[split] - 1
            for last in range(first, len(part.ends[split]), self.unit_size):
                fills.append((part.positions[split][last], split, last + 1))
        taken = dict.fromkeys(SPLITS, 0)
        for _, split, upto in sorted(fills):
            start = part.ends[split][taken[split] - 1] if taken[split] else 0
            lines = [*self.pending[split], data[split][start : part.ends[split][upto - 1]]]
            self._emit(split, b"".join(lines), self.count[split] + upto - taken[split])
            self.pending[split], self.count[split], taken[split] = [], 0, upto
        for split in SPLITS:
            start = part.ends[split][taken[split] - 1] if taken[split] else 0
            if start < len(data[split]):
                self.pending[split].append(data[split][start:])
                self.count[split] += len(part.ends[split]) - taken[split]

    def finish(self) -> None:
        for split in SPLITS:
            if self.count[split]:
                self._emit(split, b"".join(self.pending[split]), self.count[split])
        self.close()

    def close(self) -> None:
        self.writer.shutdown(wait=True)
        while self.writes:
            self.writes.popleft().result()

    def _emit(self, split: str, body: bytes, samples: int) -> None:
        unit = len(self.summary.units)
        self.summary.units.append({"unit": unit, "split": split, "samples": samples})
        if split == Split.COMMERCIAL:
            self.summary.commercial += samples
        elif split == Split.EVALUATION:
            self.summary.evaluation += samples
        else:
            self.summary.noncommercial += samples
        self.writes.append(self.writer.submit(self.plan.write_bytes, unit_plan_key(unit), body))
        while len(self.writes) > 2 * _UNIT_WRITERS or (self.writes and self.writes[0].done()):
            self.writes.popleft().result()


def available_cpus() -> int:
    """CPUs this process may use: its affinity, capped by a cgroup CPU quota (a pod's CPU limit)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    for quota_file, period_file in (
        ("/sys/fs/cgroup/cpu.max", None),  # cgroup v2: "QUOTA PERIOD" or "max PERIOD"
        ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us"),  # v1; -1: none
    ):
        try:
            values = Path(quota_file).read_text().split()
            if period_file:
                values.append(Path(period_file).read_text().strip())
            quota, period = int(values[0]), int(values[1])
        except (OSError, ValueError, IndexError):
            continue
        if quota > 0:
            cpus = min(cpus, max(1, math.ceil(quota / period)))
    return cpus


def _planned_parts(
    parts: Iterator[Part], spec: ScrapeJobSpec, tmp: str, processes: int
) -> Generator[PartPlan, None, None]:
    """Each part planned, in file order; at most two parts per process in flight (and _LINES_IN_FLIGHT
    of decompressed ones), so memory and temporary files stay bounded. One part, or one process, is
    planned here without a pool."""
    policy = license_policy(spec)
    head = list(islice(parts, 2))
    numbered = enumerate(chain(head, parts))
    if processes <= 1 or len(head) < 2:
        for index, part in numbered:
            yield plan_part(part, policy, spec.fetch, tmp, index)
        return
    window = 2 * processes
    if head[0].kind == "lines":  # decompressed parts wait in memory until a process takes them
        window = max(2, min(window, _LINES_IN_FLIGHT // max(1, len(head[0].data))))
    # forkserver: safe in a caller with threads, and cheap per process after the first
    with ProcessPoolExecutor(processes, mp_context=get_context("forkserver")) as pool:
        flight: deque[Future[PartPlan]] = deque()
        try:
            for index, part in numbered:
                flight.append(pool.submit(plan_part, part, policy, spec.fetch, tmp, index))
                if len(flight) >= window:
                    yield flight.popleft().result()
            while flight:
                yield flight.popleft().result()
        finally:
            pool.shutdown(cancel_futures=True)


def write_plan(
    spec: ScrapeJobSpec, plan: Storage, processes: int | None = None, part_bytes: int = PART_BYTES
) -> PlanSummary:
    """Plan `spec.source` into `plan` (units/NNNNNN.jsonl, units.json, then summary.json last) with
    `processes` processes (default: the CPUs available); the plan does not depend on either number."""
    summary = PlanSummary(spec_hash=plan_hash(spec))
    stats = ReadStats()
    with (
        _local_metadata(spec.source.uri) as path,
        tempfile.TemporaryDirectory(prefix="commoncanvas-plan-") as tmp,
    ):
        stats.layout = layout_of(path)
        units = _Units(plan, spec.unit_size, summary)
        planned = _planned_parts(
            iter_parts(path, stats.layout, part_bytes), spec, tmp, processes or available_cpus()
        )
        try:
            for part in planned:
                units.add(part)
                stats.add(part.stats)
                summary.excluded.update(part.excluded)
                summary.licenses.update(part.licenses)
                summary.malformed.extend(part.malformed[: MALFORMED_REPORTED - len(summary.malformed)])
            units.finish()
        finally:
            planned.close()  # stop the pool before its temporary folder goes
            units.close()
    summary.rows, summary.layout, summary.warnings = stats.rows, stats.layout, stats.warnings
    plan.write_text(UNITS_FILE, json.dumps(summary.units, indent=0))
    plan.write_text(PLAN_SUMMARY, json.dumps(summary.to_dict(), indent=1))
    return summary


def unit_plan_key(unit: int) -> str:
    return f"units/{unit:06d}.jsonl"


def read_unit_plan(plan: Storage, unit: int) -> list[PlannedSample]:
    # Split on b"\n" only: splitlines() would also cut at U+2028, U+2029 or U+0085 inside a title.
    return [
        PlannedSample.from_json(line)
        for line in plan.read_bytes(unit_plan_key(unit)).split(b"\n")
        if line.strip()
    ]


def read_units(plan: Storage) -> list[dict[str, Any]]:
    units: list[dict[str, Any]] = json.loads(plan.read_text(UNITS_FILE))
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

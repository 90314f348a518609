"""Work units: the one mechanism behind resume, idempotency, progress and exactly-once samples.

Attempt `a` of unit `i` writes only under `{split}/unit-{i:06d}/a{a:03d}/` of its stage's output root
and, once everything else is written, creates the marker `_units/{i:06d}.json` (its stats and which
attempt won) with a conditional create: of two attempts of one unit (a worker presumed dead and the
one that took its claim over), exactly one publishes; the other removes its own files. A unit with a
marker is done. Once all units are done, `summarize` writes `{split}/index.json` over the winning
attempts' MDS shards, so `streaming.StreamingDataset(remote=ROOT/{split})` reads the split directly,
and removes what losing attempts left. Who runs which unit is `workqueue`'s business.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from commoncanvas.storage import Storage, open_storage

MARKERS = "_units"
PLAN_DIR = "_plan"


@dataclass(frozen=True)
class StageLayout:
    """A stage's output root: units' data under `{split}/unit-NNNNNN/`, markers, and its frozen plan."""

    output: Storage

    @property
    def plan(self) -> Storage:
        return self.output.child(PLAN_DIR)

    @classmethod
    def at(cls, uri: str) -> StageLayout:
        return cls(open_storage(uri))


def unit_dir(split: str, unit: int) -> str:
    return f"{split}/unit-{unit:06d}"


def attempt_dir(split: str, unit: int, attempt: int | None) -> str:
    """Where one attempt of a unit writes (None: a unit published before attempts existed)."""
    return unit_dir(split, unit) if attempt is None else f"{unit_dir(split, unit)}/a{attempt:03d}"


def marker_key(unit: int) -> str:
    return f"{MARKERS}/{unit:06d}.json"


def is_done(storage: Storage, unit: int) -> bool:
    return storage.exists(marker_key(unit))


def read_marker(storage: Storage, unit: int) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(storage.read_text(marker_key(unit)))
    return data


def done_units(storage: Storage) -> set[int]:
    return {int(Path(key).stem) for key in storage.list(MARKERS) if key.endswith(".json")}


def read_markers(storage: Storage) -> dict[int, dict[str, Any]]:
    return {unit: read_marker(storage, unit) for unit in sorted(done_units(storage))}


def begin_attempt(storage: Storage, splits: Iterable[str], unit: int, attempt: int | None) -> None:
    """Clear whatever an interrupted earlier run of this very attempt left (its prefix is its own)."""
    for split in splits:
        storage.delete_prefix(attempt_dir(split, unit, attempt))


def staging_dir(storage: Storage, split: str, unit: int, attempt: int | None, scratch: Path) -> Path:
    """Where an attempt writes its MDS: in place when the output is a local directory (nothing to copy:
    without a marker the attempt is invisible), else a scratch dir to upload."""
    in_place = storage.local_path(attempt_dir(split, unit, attempt))
    return in_place if in_place is not None else scratch / split


def upload_attempt(storage: Storage, split: str, unit: int, attempt: int | None, local_mds: Path) -> None:
    """Upload a finished local MDS directory under the attempt's own prefix (no-op when in place)."""
    prefix = attempt_dir(split, unit, attempt)
    if storage.local_path(prefix) == local_mds:
        return  # written in place
    for path in sorted(p for p in local_mds.rglob("*") if p.is_file()):
        storage.upload_file(f"{prefix}/{path.relative_to(local_mds).as_posix()}", path)


def publish_marker(storage: Storage, unit: int, stats: dict[str, Any]) -> bool:
    """Publish a finished attempt: True when its marker was created, False when another attempt of
    the unit had already published (this one's files are then removed: it never becomes visible)."""
    if storage.create(marker_key(unit), json.dumps(stats, indent=1, sort_keys=True).encode()):
        return True
    # A create retried after its response was lost finds its own marker: that is a success.
    existing = read_marker(storage, unit)
    if (existing.get("attempt"), existing.get("worker")) == (stats.get("attempt"), stats.get("worker")):
        return True
    attempt = stats.get("attempt")
    if attempt is not None:
        discard_attempt(storage, str(stats["split"]), unit, int(attempt))
    return False


def discard_attempt(storage: Storage, split: str, unit: int, attempt: int) -> None:
    """Remove what an attempt that will never be published wrote (it lost, or was taken over)."""
    storage.delete_prefix(attempt_dir(split, unit, attempt))


def finish_unit(storage: Storage, unit: int, stats: dict[str, Any]) -> None:
    """Write a marker unconditionally (tests and benchmarks that stand in for a unit)."""
    storage.write_text(marker_key(unit), json.dumps(stats, indent=1, sort_keys=True))


def winning_prefix(split: str, unit: int, marker: dict[str, Any]) -> str:
    attempt = marker.get("attempt")
    return attempt_dir(split, unit, None if attempt is None else int(attempt))


def merge_split_index(storage: Storage, split: str, markers: dict[int, dict[str, Any]]) -> int:
    """Write `{split}/index.json` listing the winning attempts' shards in unit order; returns the
    sample count. Only what the markers point at is read."""
    shards: list[dict[str, Any]] = []
    for unit in sorted(markers):
        prefix = winning_prefix(split, unit, markers[unit])
        key = f"{prefix}/index.json"
        if markers[unit].get("written") == 0 or not storage.exists(key):
            continue  # the unit had no sample of this split
        index = json.loads(storage.read_text(key))
        relative = prefix.removeprefix(f"{split}/")
        for shard in index["shards"]:
            for part in ("raw_data", "zip_data"):
                if shard.get(part):
                    shard[part]["basename"] = f"{relative}/{shard[part]['basename']}"
            shards.append(shard)
    storage.write_text(f"{split}/index.json", json.dumps({"version": 2, "shards": shards}))
    return sum(int(shard["samples"]) for shard in shards)


def remove_losers(storage: Storage, split: str, markers: dict[int, dict[str, Any]]) -> int:
    """Delete what attempts that did not win left under `{split}/` (one listing of the split)."""
    keep = {f"{winning_prefix(split, unit, marker)}/" for unit, marker in markers.items()}
    doomed: set[str] = set()
    for key in storage.list(split):
        parts = key.split("/")
        if len(parts) >= 4 and parts[1].startswith("unit-") and parts[2].startswith("a"):
            prefix = "/".join(parts[:3]) + "/"
            if prefix not in keep:
                doomed.add(prefix)
    return sum(storage.delete_prefix(prefix) for prefix in sorted(doomed))


def summarize(
    layout: StageLayout,
    unit_splits: dict[int, str],
    splits: Iterable[str] = (),
    markers: dict[int, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Once every planned unit has its marker: merge each split's index and add up the markers (read
    here unless the caller has them). Every split in `splits` gets an index, an empty one where no unit
    holds it: a split with no sample (a ScrapeJob allowing only commercial licenses) is an empty
    dataset, not a missing one."""
    markers = read_markers(layout.output) if markers is None else markers
    missing = sorted(set(unit_splits) - set(markers))
    if missing:
        raise RuntimeError(f"{len(missing)} units have no marker yet (first: {missing[:5]}); rerun to finish")
    samples: dict[str, int] = {}
    for split in sorted(set(unit_splits.values()) | set(splits)):
        split_markers = {u: markers[u] for u, s in unit_splits.items() if s == split}
        samples[split] = merge_split_index(layout.output, split, split_markers)
        remove_losers(layout.output, split, split_markers)
    licenses: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    for marker in markers.values():
        licenses.update(marker["licenses"])
        outcomes.update({k: v for k, v in marker["outcomes"].items() if k != "ok"})
    from commoncanvas.workqueue import progress_totals, read_progress

    progress = progress_totals(read_progress(layout.output))
    return {
        "samples": samples,
        "licenses": dict(sorted(licenses.items())),
        "failed": dict(sorted(outcomes.items())),
        "units": len(unit_splits),
        "workers": progress["workers"],
        "modelLoads": progress["modelLoads"],
        "outputs": {split: layout.output.url(split) for split in samples},
    }

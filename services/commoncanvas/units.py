"""Work units: the one mechanism behind resume, idempotency, progress and exactly-once samples.

Unit `i` writes only under `{split}/unit-{i:06d}/` of its stage's output root and, once everything
else is written, the marker `_units/{i:06d}.json` with its stats.  A unit with a marker is done.
Once all units are done, `merge_split_index` writes `{split}/index.json` over the units' MDS shards so
`streaming.StreamingDataset(remote=ROOT/{split})` reads the split directly.
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


def begin_unit(storage: Storage, splits: Iterable[str], unit: int) -> None:
    """Clear whatever an interrupted earlier attempt left, so a rerun never duplicates a sample."""
    for split in splits:
        storage.delete_prefix(unit_dir(split, unit))


def staging_dir(storage: Storage, split: str, unit: int, scratch: Path) -> Path:
    """Where a unit writes its MDS: in place when the output is a local directory (nothing to copy:
    without a marker the unit is invisible, and a rerun clears it), else a scratch dir to upload."""
    in_place = storage.local_path(unit_dir(split, unit))
    return in_place if in_place is not None else scratch / split


def publish_unit(storage: Storage, split: str, unit: int, local_mds: Path) -> None:
    """Upload a finished local MDS directory; index.json last so a unit is never half-visible."""
    if storage.local_path(unit_dir(split, unit)) == local_mds:
        return  # written in place
    files = sorted(p for p in local_mds.rglob("*") if p.is_file())
    index = [p for p in files if p.name == "index.json"]
    for path in [p for p in files if p.name != "index.json"] + index:
        storage.upload_file(f"{unit_dir(split, unit)}/{path.relative_to(local_mds).as_posix()}", path)


def finish_unit(storage: Storage, unit: int, stats: dict[str, Any]) -> None:
    storage.write_text(marker_key(unit), json.dumps(stats, indent=1, sort_keys=True))


def merge_split_index(storage: Storage, split: str, units: Iterable[int]) -> int:
    """Write `{split}/index.json` listing every unit's shards in unit order; returns the sample count."""
    shards: list[dict[str, Any]] = []
    for unit in sorted(units):
        key = f"{unit_dir(split, unit)}/index.json"
        if not storage.exists(key):
            continue  # the unit had no sample of this split
        index = json.loads(storage.read_text(key))
        for shard in index["shards"]:
            for part in ("raw_data", "zip_data"):
                if shard.get(part):
                    shard[part]["basename"] = f"unit-{unit:06d}/{shard[part]['basename']}"
            shards.append(shard)
    storage.write_text(f"{split}/index.json", json.dumps({"version": 2, "shards": shards}))
    return sum(int(shard["samples"]) for shard in shards)


def summarize(layout: StageLayout, unit_splits: dict[int, str]) -> dict[str, Any]:
    """Once every planned unit has its marker: merge each split's index and add up the markers."""
    markers = read_markers(layout.output)
    missing = sorted(set(unit_splits) - set(markers))
    if missing:
        raise RuntimeError(f"{len(missing)} units have no marker yet (first: {missing[:5]}); rerun to finish")
    samples: dict[str, int] = {}
    for split in sorted(set(unit_splits.values())):
        samples[split] = merge_split_index(
            layout.output, split, [u for u, s in unit_splits.items() if s == split]
        )
    licenses: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    for marker in markers.values():
        licenses.update(marker["licenses"])
        outcomes.update({k: v for k, v in marker["outcomes"].items() if k != "ok"})
    return {
        "samples": samples,
        "licenses": dict(sorted(licenses.items())),
        "failed": dict(sorted(outcomes.items())),
        "units": len(unit_splits),
        "outputs": {split: layout.output.url(split) for split, n in samples.items() if n},
    }

"""One work unit of a stage that runs a model over another stage's images (caption, latents).

The loop is the same for both; only the model step differs, and stays in the stage:

    with unit_work(STAGE, layout.output, unit, attempt) as work:  # stages the attempt's output
        for batch in work.batches(to_pixels, batch_size, workers):
            ...                                           # the model; work.write(row), work.record(...)
    return work.finish(**stage_stats)   # uploaded by now; the stats the worker publishes as the marker

The model itself is loaded once per worker, by the stage's `StageWorker` (workqueue), not here.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from commoncanvas import metrics, units
from commoncanvas.mds import UnitShards
from commoncanvas.shardplan import ShardGroupUnit
from commoncanvas.storage import Storage

log = logging.getLogger(__name__)


class ShardImages(Dataset[dict[str, Any]]):
    """Map-style view of a unit's shards: a DataLoader keeps the order and decodes in workers.

    Each item is the sample's row (less `dropped` columns), its pixels from `to_pixels(image bytes)`,
    and an error instead of pixels when the image cannot be decoded."""

    def __init__(
        self,
        dataset: Any,
        to_pixels: Callable[[bytes], torch.Tensor],
        dropped: Collection[str] = (),
        duplicates: Collection[int] = (),
    ) -> None:
        self.dataset = dataset
        self.to_pixels = to_pixels
        self.dropped = frozenset(dropped)
        self.duplicates = frozenset(duplicates)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.dataset[index]
        row = {name: value for name, value in sample.items() if name not in self.dropped}
        # A dropped duplicate is not even decoded: the catalog keeps another copy.
        if self.duplicates and int(sample["photo_id"]) in self.duplicates:
            return {"row": row, "pixels": None, "error": "duplicate: the catalog keeps another copy"}
        try:
            pixels = self.to_pixels(sample["image"])
        except Exception as exc:  # any decoder error means the same thing: this image is unusable
            return {"row": row, "pixels": None, "error": f"corrupt-image: {type(exc).__name__}: {exc}"}
        return {"row": row, "pixels": pixels, "error": ""}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Every item, in order, and the decoded ones' pixels stacked (None when none decoded)."""
    good = [item for item in items if item["pixels"] is not None]
    return {"items": items, "pixels": torch.stack([item["pixels"] for item in good]) if good else None}


@dataclass
class UnitWork:
    """A unit in progress: its input, where its output is staged, and one outcome per input sample."""

    stage: str
    output: Storage
    unit: ShardGroupUnit
    attempt: int
    started: float
    dataset: Any
    staging: Path
    writer: Any = None
    outcomes: Counter[str] = field(default_factory=Counter)
    licenses: Counter[str] = field(default_factory=Counter)
    failures: list[dict[str, Any]] = field(default_factory=list)

    def batches(
        self,
        to_pixels: Callable[[bytes], torch.Tensor],
        batch_size: int,
        workers: int,
        *,
        dropped: Collection[str] = (),
        duplicates: Collection[int] = (),
        pin_memory: bool = False,
    ) -> Iterator[dict[str, Any]]:
        """The unit's samples in order, batched by `collate`; the time the caller spends on a batch
        (until it asks for the next) is the stage's batch time."""
        loader = DataLoader(
            ShardImages(self.dataset, to_pixels, dropped, duplicates),
            batch_size=batch_size,
            shuffle=False,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=pin_memory,
            prefetch_factor=2 if workers else None,
            persistent_workers=False,
        )
        for batch in loader:
            batch_started = time.perf_counter()
            yield batch
            metrics.BATCH_SECONDS.labels(self.stage).observe(time.perf_counter() - batch_started)

    def open_writer(self, columns: dict[str, str]) -> None:
        from streaming import MDSWriter

        self.writer = MDSWriter(out=str(self.staging), columns=columns, size_limit="256mb")

    def write(self, row: dict[str, Any]) -> None:
        self.writer.write(row)

    def record(self, row: dict[str, Any], problem: str) -> None:
        """One input sample's outcome: "ok" without a problem, else the problem's reason (before ":")."""
        outcome = problem.split(":", 1)[0] if problem else "ok"
        self.outcomes[outcome] += 1
        metrics.SAMPLES.labels(self.stage, self.unit.split, outcome).inc()
        if problem:
            self.failures.append({"photo_id": int(row["photo_id"]), "reason": outcome, "detail": problem})
        else:
            self.licenses[str(row.get("license_code", ""))] += 1

    def finish(self, **stage_stats: Any) -> dict[str, Any]:
        """After `unit_work` has uploaded the output: the attempt's stats (plus the stage's own), which
        the worker publishes as the unit's marker."""
        seconds = time.perf_counter() - self.started
        assert sum(self.outcomes.values()) == len(self.dataset), "every input sample must have an outcome"
        stats = {
            "unit": self.unit.unit,
            "split": self.unit.split,
            "input": len(self.dataset),
            "written": self.outcomes["ok"],
            "outcomes": dict(sorted(self.outcomes.items())),
            "licenses": dict(sorted(self.licenses.items())),
            "seconds": round(seconds, 3),
            **stage_stats,
            "failures": self.failures,
        }
        return stats


@contextmanager
def unit_work(stage: str, output: Storage, unit: ShardGroupUnit, attempt: int) -> Iterator[UnitWork]:
    """Open the unit's input shards and stage the attempt's output in a scratch dir (or in place);
    on leaving, finish the writer and upload when any sample was written."""
    units.begin_attempt(output, [unit.split], unit.unit, attempt)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"commoncanvas-{stage}-{unit.unit:06d}-") as tmp:
        dataset = UnitShards(unit.split_root, unit.shards, Path(tmp) / "input")
        staging = units.staging_dir(output, unit.split, unit.unit, attempt, Path(tmp) / "output")
        work = UnitWork(stage, output, unit, attempt, started, dataset, staging)
        yield work
        if work.writer is not None:
            work.writer.finish()
        if work.outcomes["ok"]:
            units.upload_attempt(output, unit.split, unit.unit, attempt, staging)

"""Exact duplicates across the whole catalog: one copy stands (the most restrictive license, first in
plan order), every copy's author is credited, and captioning and the data card follow it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tests.integration.test_caption import caption_job, scrape_to

from commoncanvas.mds import read_split
from commoncanvas.runner import LocalRun
from commoncanvas.sample import Sample, SampleRow, served_files
from commoncanvas.sample.server import LocalHTTPServer

pytestmark = pytest.mark.integration


def served(row: SampleRow) -> str:
    return next(iter(served_files(row)))


def plant_copies(sample: Sample, server_root: Path) -> tuple[SampleRow, list[SampleRow]]:
    """The same bytes served for two commercial photos and one non-commercial one: returns the copy
    that must stand (the NC one) and the two the catalog must drop."""
    commercial = [r for r in sample.expected("commercial") if r.original is not None]
    noncommercial = [r for r in sample.expected("noncommercial") if r.original is not None]
    first, last, nc = commercial[0], commercial[-1], noncommercial[0]
    image = (server_root / served(first).lstrip("/")).read_bytes()
    for row in (last, nc):
        (server_root / served(row).lstrip("/")).write_bytes(image)
    return nc, [first, last]


def test_identical_images_keep_one_copy_with_the_most_restrictive_license_crediting_every_author(
    served_sample: tuple[Sample, LocalHTTPServer], tiny_blip2: Path, tmp_path: Path
) -> None:
    sample, server = served_sample
    assert server.root is not None
    kept, dropped = plant_copies(sample, server.root)
    catalog = tmp_path / "catalog"
    summary = scrape_to(sample, server, str(catalog))  # unitSize 5: the copies sit in different units
    duplicates = json.loads((catalog / "duplicates.json").read_text())
    assert duplicates["dropped"] == {"commercial": sorted(r.photo_id for r in dropped)}
    credited = duplicates["credits"][str(kept.photo_id)]
    assert [c["photo_id"] for c in credited] == sorted(r.photo_id for r in dropped)
    assert {c["license_code"] for c in credited} == {r.license_code for r in dropped}
    assert summary["excluded"]["duplicate"] == 2
    expected_c = len([r for r in sample.expected("commercial")]) - 2
    assert summary["samples"]["commercial"] == expected_c

    captions = tmp_path / "captions"
    result = LocalRun(show_progress=False).caption(caption_job(str(catalog), str(captions), tiny_blip2))
    assert result["excluded"]["duplicate"] == 2
    rows: dict[int, dict[str, Any]] = {}
    for split in ("commercial", "noncommercial"):
        rows.update(
            {int(r["photo_id"]): r for r in read_split(str(captions / split), tmp_path / "c" / split)}
        )
    assert not {r.photo_id for r in dropped} & set(rows), "a dropped copy must never be captioned"
    assert [c["author"] for c in rows[kept.photo_id]["also_credited"]] == [
        r.author for r in sorted(dropped, key=lambda r: r.photo_id)
    ]
    assert all(row["also_credited"] == [] for pid, row in rows.items() if pid != kept.photo_id)


def test_a_rerun_decides_the_same_duplicates_and_counts_them_once(
    served_sample: tuple[Sample, LocalHTTPServer], tmp_path: Path
) -> None:
    sample, server = served_sample
    assert server.root is not None
    plant_copies(sample, server.root)
    catalog = tmp_path / "catalog"
    first = scrape_to(sample, server, str(catalog))
    decided = (catalog / "duplicates.json").read_text()
    again = scrape_to(sample, server, str(catalog))  # every unit done: finalize alone runs again
    assert (catalog / "duplicates.json").read_text() == decided
    same = ("samples", "licenses", "excluded", "transient", "outputs")
    assert {k: again[k] for k in same} == {k: first[k] for k in same}

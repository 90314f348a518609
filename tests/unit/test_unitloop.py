"""The unit loop caption and latents share: decoding in order, one outcome per sample, output and marker."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from streaming import MDSWriter

from commoncanvas import shardplan, units
from commoncanvas.mds import UnitShards, read_split
from commoncanvas.shardplan import ShardGroupUnit, ShardInput, Upstream
from commoncanvas.storage import LocalStorage
from commoncanvas.unitloop import ShardImages, collate, unit_work

COLUMNS = {"image": "bytes", "photo_id": "int", "license_code": "str"}
CORRUPT = b"not an image"


def fake_pixels(data: bytes) -> torch.Tensor:
    """Stands in for a real decoder: fails on CORRUPT, else one value per byte."""
    if data == CORRUPT:
        raise ValueError("cannot identify image file")
    return torch.tensor([float(len(data))])


def a_unit(tmp_path: Path, images: list[bytes]) -> ShardGroupUnit:
    with MDSWriter(out=str(tmp_path / "in" / "commercial"), columns=COLUMNS) as writer:
        for number, image in enumerate(images):
            writer.write({"image": image, "photo_id": 100 + number, "license_code": f"cc{number % 2}"})
    upstream = Upstream("ScrapeJob", "catalog", "input.scrapeJobRef", "input.uris")
    (unit,) = shardplan.plan_units(
        ShardInput(upstream, None, [str(tmp_path / "in")], ["commercial"], 10_000), None
    )
    return unit


def run(output: LocalStorage, unit: ShardGroupUnit, batch_size: int = 2) -> dict:
    """A stage whose model step is the identity: writes each decoded sample's row and pixel value;
    its stats are published as the marker, as a worker does."""
    with unit_work("test", output, unit, 0) as work:
        for batch in work.batches(fake_pixels, batch_size, 0, dropped={"image"}):
            good = [item for item in batch["items"] if item["pixels"] is not None]
            for item, pixels in zip(good, batch["pixels"] if good else [], strict=True):
                if work.writer is None:
                    work.open_writer({"photo_id": "int", "license_code": "str", "value": "float32"})
                work.write({**item["row"], "value": float(pixels[0])})
            for item in batch["items"]:
                work.record(item["row"], item["error"])
    stats = {**work.finish(extra="kept"), "attempt": 0}
    assert units.publish_marker(output, unit.unit, stats)
    return stats


def test_an_undecodable_image_is_an_item_with_its_reason_and_no_pixels(tmp_path: Path) -> None:
    unit = a_unit(tmp_path, [b"abc", CORRUPT])
    images = ShardImages(UnitShards(unit.split_root, unit.shards, tmp_path / "local"), fake_pixels, {"image"})
    good, bad = images[0], images[1]
    assert good["row"] == {"photo_id": 100, "license_code": "cc0"}, "the row, less the dropped columns"
    assert good["pixels"].tolist() == [3.0] and good["error"] == ""
    assert bad["pixels"] is None and bad["error"] == "corrupt-image: ValueError: cannot identify image file"
    assert collate([bad])["pixels"] is None
    assert collate([good, bad, good])["pixels"].tolist() == [[3.0], [3.0]]


def test_every_sample_gets_one_outcome_and_the_marker_adds_them_up(tmp_path: Path) -> None:
    unit = a_unit(tmp_path, [b"a", CORRUPT, b"abc", b"abcd", CORRUPT])
    output = LocalStorage(tmp_path / "out")
    stats = run(output, unit)
    assert stats == units.read_marker(output, 0)
    assert stats["input"] == 5 and stats["written"] == 3
    assert stats["outcomes"] == {"corrupt-image": 2, "ok": 3}
    assert stats["licenses"] == {"cc0": 2, "cc1": 1}, "licenses of the written samples only"
    assert [f["photo_id"] for f in stats["failures"]] == [101, 104]
    assert stats["extra"] == "kept", "the stage's own stats go into the marker"
    written = read_split(tmp_path / "out" / units.attempt_dir("commercial", 0, 0))
    assert [(s["photo_id"], s["value"]) for s in written] == [(100, 1.0), (102, 3.0), (103, 4.0)]


def test_an_attempt_run_again_clears_what_its_interrupted_try_left(tmp_path: Path) -> None:
    unit = a_unit(tmp_path, [b"a", b"ab"])
    output = LocalStorage(tmp_path / "out")
    output.write_bytes(f"{units.attempt_dir('commercial', 0, 0)}/shard.00007.mds", b"debris")
    run(output, unit)
    assert not output.exists(f"{units.attempt_dir('commercial', 0, 0)}/shard.00007.mds")


def test_a_unit_with_nothing_written_publishes_nothing_but_is_done(tmp_path: Path) -> None:
    unit = a_unit(tmp_path, [CORRUPT, CORRUPT])
    output = LocalStorage(tmp_path / "out")
    stats = run(output, unit)
    assert stats["written"] == 0 and units.is_done(output, 0)
    assert not output.exists(f"{units.attempt_dir('commercial', 0, 0)}/index.json")


def test_a_stage_that_loses_a_sample_is_caught_before_its_marker(tmp_path: Path) -> None:
    unit = a_unit(tmp_path, [b"a", b"ab", b"abc"])
    output = LocalStorage(tmp_path / "out")
    with unit_work("test", output, unit, 0) as work:
        for batch in work.batches(fake_pixels, 2, 0):
            work.record(batch["items"][0]["row"], "")
    with pytest.raises(AssertionError, match="every input sample must have an outcome"):
        work.finish()
    assert not units.is_done(output, 0)

"""Our small MDS writer produces exactly what mosaicml-streaming writes, and streaming reads it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from streaming import MDSWriter, StreamingDataset

from commoncanvas.mds import MDSShardWriter, UnitShards
from commoncanvas.scrape.worker import CATALOG_COLUMNS, blank_catalog_row


def catalog_sample(number: int) -> dict[str, object]:
    return {
        **blank_catalog_row(),
        "description": f"line one\u2028line two\rof {number}",
        "machine_tags": [f"geo:zoom={number}"],
        "date_uploaded": 1_200_000_000 + number,
        "image": bytes([number % 256]) * (1000 + 37 * number),
        "photo_id": 10**10 + number,
        "split": "commercial",
        "license_code": "cc-by",
        "license_name": "Attribution License",
        "license_url": "https://creativecommons.org/licenses/by/2.0/",
        "author": f"Ünïcode author {number}",
        "author_nsid": f"{number}@N00",
        "title": "a title with\ttabs & ümlauts",
        "tags": ["a", "b", str(number)],
        "page_url": f"https://www.flickr.com/photos/x/{number}/",
        "fetched_url": f"http://h/{number}.jpg",
        "width": 640 + number,
        "height": -1 if number == 3 else 480,
        "sha256": f"{number:064x}",
    }


def test_shards_and_index_are_byte_identical_to_streamings_writer(tmp_path: Path) -> None:
    samples = [catalog_sample(n) for n in range(40)]
    with MDSWriter(out=str(tmp_path / "theirs"), columns=CATALOG_COLUMNS, size_limit=20_000) as theirs:
        for sample in samples:
            theirs.write(sample)
    with MDSShardWriter(tmp_path / "ours", CATALOG_COLUMNS, size_limit=20_000) as ours:
        for sample in samples:
            ours.write(sample)
    their_shards = sorted(p.name for p in (tmp_path / "theirs").glob("shard.*.mds"))
    assert len(their_shards) > 2, "the size limit must split the data into several shards"
    assert sorted(p.name for p in (tmp_path / "ours").glob("shard.*.mds")) == their_shards
    for name in their_shards:
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "theirs" / name).read_bytes(), name


def test_streaming_reads_every_sample_back(tmp_path: Path) -> None:
    samples = [catalog_sample(n) for n in range(25)]
    with MDSShardWriter(tmp_path / "out", CATALOG_COLUMNS, size_limit=10_000) as writer:
        for sample in samples:
            writer.write(sample)
    dataset = StreamingDataset(local=str(tmp_path / "out"), shuffle=False, batch_size=1)
    assert [dataset[i] for i in range(len(dataset))] == samples


def test_an_unsupported_encoding_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="pkl"):
        MDSShardWriter(Path("/nonexistent"), {"x": "pkl"})


def written_split(root: Path, count: int) -> list[dict[str, object]]:
    with MDSShardWriter(root, CATALOG_COLUMNS, size_limit=10_000) as writer:
        for number in range(count):
            writer.write(catalog_sample(number))
    shards: list[dict[str, object]] = json.loads((root / "index.json").read_text())["shards"]
    return shards


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_units_shards_read_every_sample_in_order_across_shards(tmp_path: Path) -> None:
    shards = written_split(tmp_path / "split", 25)
    assert len(shards) > 2
    samples = UnitShards(str(tmp_path / "split"), shards[1:], tmp_path / "local")
    first = sum(shard["samples"] for shard in shards[:1])  # type: ignore[misc]
    assert [samples[i] for i in range(len(samples))] == [catalog_sample(n) for n in range(first, 25)]
    with pytest.raises(IndexError):
        samples[len(samples)]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts descriptors through /proc")
def test_a_worker_reading_unit_after_unit_holds_no_more_descriptors(tmp_path: Path) -> None:
    """A StreamingDataset per unit would keep its shared memory for the process's life."""
    shards = written_split(tmp_path / "split", 25)
    UnitShards(str(tmp_path / "split"), shards, tmp_path / "local")[0]
    before = open_descriptors()
    for _ in range(200):
        samples = UnitShards(str(tmp_path / "split"), shards, tmp_path / "local")
        assert len([samples[i] for i in range(len(samples))]) == 25
    assert open_descriptors() == before


@pytest.mark.parametrize("basename", ["../other/shard.00000.mds", "/etc/passwd", "a//shard.mds"])
def test_a_shard_path_leaving_the_split_is_refused_in_one_line(tmp_path: Path, basename: str) -> None:
    shards = written_split(tmp_path / "split", 3)
    shards[0]["raw_data"] = {**shards[0]["raw_data"], "basename": basename}  # type: ignore[dict-item]
    with pytest.raises(ValueError, match=r"is not a path inside the split; .* rerun the stage") as error:
        UnitShards(str(tmp_path / "split"), shards, tmp_path / "local")
    assert "\n" not in str(error.value)

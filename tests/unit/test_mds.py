"""Our small MDS writer produces exactly what mosaicml-streaming writes, and streaming reads it."""

from __future__ import annotations

from pathlib import Path

import pytest
from streaming import MDSWriter, StreamingDataset

from commoncanvas.mds import MDSShardWriter
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

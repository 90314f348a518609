"""Work units: markers, clearing an interrupted attempt, publishing, and merging a split's MDS index."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from streaming import MDSWriter, StreamingDataset

from commoncanvas import units
from commoncanvas.storage import LocalStorage

COLUMNS = {"photo_id": "int", "caption": "str"}


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "stage")


def write_unit(
    storage: LocalStorage,
    tmp_path: Path,
    split: str,
    unit: int,
    photo_ids: list[int],
    size_limit: int | str = "64mb",
) -> None:
    """Write `photo_ids` as a unit's MDS shards locally, then upload them under attempt 0's prefix."""
    local = tmp_path / f"local-{split}-{unit}"
    with MDSWriter(out=str(local), columns=COLUMNS, size_limit=size_limit) as writer:
        for photo_id in photo_ids:
            writer.write({"photo_id": photo_id, "caption": f"photo {photo_id}"})
    units.upload_attempt(storage, split, unit, 0, local)


def markers(*unit_numbers: int) -> dict[int, dict]:
    """Markers saying attempt 0 of each unit won."""
    return {unit: {"unit": unit, "attempt": 0} for unit in unit_numbers}


# --- naming -----------------------------------------------------------------------------------------


def test_unit_writes_under_its_own_zero_padded_prefix_and_marker() -> None:
    assert units.unit_dir("commercial", 42) == "commercial/unit-000042"
    assert units.marker_key(42) == "_units/000042.json"


# --- markers ----------------------------------------------------------------------------------------


def test_unit_is_done_once_its_marker_is_written(storage: LocalStorage) -> None:
    assert not units.is_done(storage, 3)
    units.finish_unit(storage, 3, {"written": 5, "outcomes": {"ok": 5}})
    assert units.is_done(storage, 3)
    assert not units.is_done(storage, 4)


def test_marker_keeps_the_units_stats(storage: LocalStorage) -> None:
    stats = {"unit": 7, "written": 5, "outcomes": {"ok": 5, "http-404": 1}, "bytes": 1234, "seconds": 1.5}
    units.finish_unit(storage, 7, stats)
    assert units.read_marker(storage, 7) == stats


def test_done_units_are_those_with_markers(storage: LocalStorage) -> None:
    assert units.done_units(storage) == set()
    for unit in (10, 2, 0):
        units.finish_unit(storage, unit, {"unit": unit})
    storage.write_text("commercial/unit-000005/index.json", "{}")  # output without a marker: not done
    assert units.done_units(storage) == {0, 2, 10}
    assert list(units.read_markers(storage)) == [0, 2, 10]
    assert units.read_markers(storage)[10] == {"unit": 10}


# --- an interrupted attempt -------------------------------------------------------------------------


def test_begin_attempt_clears_only_what_that_attempt_left_earlier(storage: LocalStorage) -> None:
    storage.write_text("commercial/unit-000001/a000/shard.00000.mds", "partial")
    storage.write_text("noncommercial/unit-000001/a000/shard.00000.mds", "partial")
    storage.write_text("commercial/unit-000001/a001/shard.00000.mds", "another attempt's")
    storage.write_text("commercial/unit-000002/a000/index.json", "{}")
    units.finish_unit(storage, 2, {"unit": 2})
    units.begin_attempt(storage, ["commercial", "noncommercial"], 1, 0)
    assert list(storage.list("commercial/unit-000001")) == ["commercial/unit-000001/a001/shard.00000.mds"]
    assert list(storage.list("noncommercial/unit-000001")) == []
    assert storage.exists("commercial/unit-000002/a000/index.json") and units.is_done(storage, 2)


def test_begin_attempt_with_nothing_left_over_is_harmless(storage: LocalStorage) -> None:
    units.begin_attempt(storage, ["commercial"], 9, 0)
    assert list(storage.list("")) == []


def test_of_two_attempts_only_the_first_to_publish_has_the_marker_and_the_other_leaves_nothing(
    storage: LocalStorage,
) -> None:
    storage.write_text("commercial/unit-000003/a000/index.json", "{}")
    storage.write_text("commercial/unit-000003/a001/index.json", "{}")
    assert units.publish_marker(storage, 3, {"unit": 3, "split": "commercial", "attempt": 1})
    assert not units.publish_marker(storage, 3, {"unit": 3, "split": "commercial", "attempt": 0})
    assert units.read_marker(storage, 3)["attempt"] == 1
    assert list(storage.list("commercial/unit-000003")) == ["commercial/unit-000003/a001/index.json"]


def test_upload_puts_every_file_under_the_attempts_own_prefix(storage: LocalStorage, tmp_path: Path) -> None:
    local = tmp_path / "mds"
    with MDSWriter(out=str(local), columns=COLUMNS, size_limit=1 << 10) as writer:
        for photo_id in range(40):
            writer.write({"photo_id": photo_id, "caption": "x" * 50})
    uploaded: list[str] = []
    original_upload = storage.upload_file

    def recording_upload(key: str, path: Path) -> None:
        uploaded.append(key)
        original_upload(key, path)

    storage.upload_file = recording_upload  # type: ignore[method-assign]
    units.upload_attempt(storage, "commercial", 4, 2, local)
    expected = sorted(f"commercial/unit-000004/a002/{p.name}" for p in local.iterdir())
    assert sorted(uploaded) == expected and len(expected) > 2


# --- merging a split --------------------------------------------------------------------------------


def test_merged_index_lists_every_units_shards_in_unit_order(storage: LocalStorage, tmp_path: Path) -> None:
    write_unit(storage, tmp_path, "commercial", 1, [4, 5], size_limit=1 << 8)
    write_unit(storage, tmp_path, "commercial", 0, [1, 2, 3])
    assert units.merge_split_index(storage, "commercial", markers(1, 0)) == 5
    index = json.loads(storage.read_text("commercial/index.json"))
    basenames = [shard["raw_data"]["basename"] for shard in index["shards"]]
    assert basenames[0].startswith("unit-000000/a000/") and basenames[-1].startswith("unit-000001/a000/")
    assert all(storage.exists(f"commercial/{name}") for name in basenames)
    assert sum(shard["samples"] for shard in index["shards"]) == 5


def test_merged_split_reads_as_one_streaming_dataset_in_unit_order(
    storage: LocalStorage, tmp_path: Path
) -> None:
    write_unit(storage, tmp_path, "commercial", 0, [1, 2, 3])
    write_unit(storage, tmp_path, "commercial", 1, [4, 5])
    units.merge_split_index(storage, "commercial", markers(0, 1))
    dataset = StreamingDataset(local=str(tmp_path / "stage" / "commercial"), shuffle=False, batch_size=1)
    assert len(dataset) == 5
    assert [dataset[i]["photo_id"] for i in range(5)] == [1, 2, 3, 4, 5]
    assert [sample["photo_id"] for sample in dataset] == [1, 2, 3, 4, 5]
    assert dataset[3]["caption"] == "photo 4"


def test_unit_without_samples_of_a_split_is_skipped_in_that_splits_index(
    storage: LocalStorage, tmp_path: Path
) -> None:
    write_unit(storage, tmp_path, "noncommercial", 0, [10])
    write_unit(storage, tmp_path, "commercial", 1, [11, 12])
    write_unit(storage, tmp_path, "noncommercial", 2, [13])
    assert units.merge_split_index(storage, "noncommercial", markers(0, 1, 2)) == 2
    assert units.merge_split_index(storage, "commercial", markers(0, 1, 2)) == 2
    index = json.loads(storage.read_text("noncommercial/index.json"))
    assert [s["raw_data"]["basename"].split("/")[0] for s in index["shards"]] == [
        "unit-000000",
        "unit-000002",
    ]


def test_merging_no_units_gives_an_empty_index(storage: LocalStorage) -> None:
    assert units.merge_split_index(storage, "commercial", {}) == 0
    assert json.loads(storage.read_text("commercial/index.json")) == {"version": 2, "shards": []}

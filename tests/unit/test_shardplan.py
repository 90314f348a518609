"""Planning work units over an upstream stage's shards: grouping, what is refused, planning once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from commoncanvas import shardplan
from commoncanvas.shardplan import InputMissing, ShardInput, Upstream
from commoncanvas.units import StageLayout

CATALOG = Upstream("ScrapeJob", "catalog", "input.scrapeJobRef", "input.uris")
CAPTIONED = Upstream("CaptionJob", "captioned dataset", "dataset.captionJobRef", "dataset.uris", ("caption",))


def write_index(root: Path, split: str, samples: list[int], columns: tuple[str, ...] = ("image",)) -> None:
    """A split's index.json with one shard per entry of `samples` (only the index is read to plan)."""
    shards = [
        {
            "column_names": list(columns),
            "column_encodings": ["bytes"] * len(columns),
            "samples": count,
            "raw_data": {"basename": f"shard.{n:05d}.mds"},
        }
        for n, count in enumerate(samples)
    ]
    (root / split).mkdir(parents=True)
    (root / split / "index.json").write_text(json.dumps({"version": 2, "shards": shards}))


def source(root: Path, per_unit: int = 1, upstream: Upstream = CATALOG) -> ShardInput:
    return ShardInput(upstream, None, [str(root)], ["commercial", "noncommercial"], per_unit)


def test_units_are_consecutive_shards_holding_at_least_the_unit_size_numbered_across_splits(
    tmp_path: Path,
) -> None:
    write_index(tmp_path, "commercial", [5, 5, 5, 20, 1])
    write_index(tmp_path, "noncommercial", [4, 4])
    planned = shardplan.plan_units(source(tmp_path, per_unit=10), None)
    assert [(u.unit, u.split, [s["samples"] for s in u.shards]) for u in planned] == [
        (0, "commercial", [5, 5]),
        (1, "commercial", [5, 20]),
        (2, "commercial", [1]),
        (3, "noncommercial", [4, 4]),
    ]
    assert planned[3].split_root == f"{tmp_path}/noncommercial" and planned[3].columns == {"image": "bytes"}


def test_a_shard_without_samples_is_not_planned(tmp_path: Path) -> None:
    write_index(tmp_path, "commercial", [0, 3, 0])
    write_index(tmp_path, "noncommercial", [0])
    planned = shardplan.plan_units(source(tmp_path), None)
    assert [[s["raw_data"]["basename"] for s in u.shards] for u in planned] == [["shard.00001.mds"]]


def test_a_missing_index_names_the_uri_and_the_upstream(tmp_path: Path) -> None:
    write_index(tmp_path, "commercial", [1])
    with pytest.raises(InputMissing) as raised:
        shardplan.plan_units(source(tmp_path), None)
    assert str(raised.value) == (
        f"{tmp_path}/noncommercial/index.json does not exist: the catalog from input.uris is missing or "
        "not finished (a ScrapeJob writes it once all its units are done)"
    )


def test_a_reference_is_resolved_and_named_as_where_the_input_came_from(tmp_path: Path) -> None:
    by_ref = ShardInput(CATALOG, "photos", [], ["commercial"], 1)
    assert shardplan.input_roots(by_ref, {"photos": str(tmp_path)}.__getitem__) == [
        (str(tmp_path), "ScrapeJob 'photos'")
    ]
    with pytest.raises(
        InputMissing, match=r"input\.scrapeJobRef 'photos' cannot be resolved here; give input\.uris"
    ):
        shardplan.input_roots(by_ref, None)


def test_an_input_without_a_required_column_is_refused(tmp_path: Path) -> None:
    write_index(tmp_path, "commercial", [2], columns=("image",))
    write_index(tmp_path, "noncommercial", [2], columns=("image", "caption"))
    with pytest.raises(InputMissing, match=r"commercial is not a captioned dataset: it has no caption$"):
        shardplan.plan_units(source(tmp_path, upstream=CAPTIONED), None)


def test_the_plan_is_made_once_and_kept_though_the_input_grows(tmp_path: Path) -> None:
    write_index(tmp_path / "in", "commercial", [1, 1])
    write_index(tmp_path / "in", "noncommercial", [1])
    layout = StageLayout.at(str(tmp_path / "out"))
    first = shardplan.read_units(shardplan.ensure_plan(layout, source(tmp_path / "in"), None))
    (tmp_path / "in" / "commercial" / "index.json").unlink()
    (tmp_path / "in" / "commercial").rmdir()
    write_index(tmp_path / "in", "commercial", [1, 1, 1, 1])
    again = shardplan.read_units(shardplan.ensure_plan(layout, source(tmp_path / "in"), None))
    assert again == first and len(first) == 3


def test_a_plan_from_other_inputs_or_settings_is_refused(tmp_path: Path) -> None:
    write_index(tmp_path / "in", "commercial", [1])
    write_index(tmp_path / "in", "noncommercial", [1])
    layout = StageLayout.at(str(tmp_path / "out"))
    shardplan.ensure_plan(layout, source(tmp_path / "in"), None, {"spec.resolution": 256}, "TrainRun")
    shardplan.ensure_plan(layout, source(tmp_path / "in"), None, {"spec.resolution": 256}, "TrainRun")
    with pytest.raises(ValueError, match=r"made with spec\.resolution=256, this TrainRun has 512; use a new"):
        shardplan.ensure_plan(layout, source(tmp_path / "in"), None, {"spec.resolution": 512}, "TrainRun")
    with pytest.raises(
        ValueError, match=r"planned from other inputs, splits or unit size; use a new output\.uri"
    ):
        shardplan.ensure_plan(layout, source(tmp_path / "in", per_unit=2), None, {"spec.resolution": 256})


def test_the_plan_hash_depends_on_the_unit_size() -> None:
    caption = ShardInput(CATALOG, None, ["s3://b/catalog"], ["commercial", "noncommercial"], 1)
    bigger = ShardInput(CATALOG, None, ["s3://b/catalog"], ["commercial", "noncommercial"], 8192)
    roots = [("s3://b/catalog", "input.uris")]
    assert shardplan.plan_hash(caption, roots, {}) != shardplan.plan_hash(bigger, roots, {})

"""Training data decisions: caption dropout, stream weighting, batching of attribution records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from commoncanvas.specs.train import TrainRunSpec
from commoncanvas.train.data import TrainingDataMissing, collate, drops_caption, plan_streams


def test_caption_dropout_is_the_same_decision_wherever_it_is_made() -> None:
    first = [drops_caption(17, 0, index, 0.1) for index in range(2000)]
    again = [drops_caption(17, 0, index, 0.1) for index in range(2000)]
    assert first == again


def test_caption_dropout_drops_about_its_share() -> None:
    dropped = sum(drops_caption(17, 0, index, 0.1) for index in range(20_000))
    assert 0.09 < dropped / 20_000 < 0.11


def test_caption_dropout_drops_other_samples_in_other_epochs_and_with_other_seeds() -> None:
    def dropped(seed: int, epoch: int) -> set[int]:
        return {index for index in range(2000) if drops_caption(seed, epoch, index, 0.1)}

    assert dropped(17, 0) != dropped(17, 1)
    assert dropped(17, 0) != dropped(18, 0)


def test_caption_dropout_of_zero_keeps_every_caption_and_of_one_drops_every_caption() -> None:
    assert not any(drops_caption(17, 0, index, 0.0) for index in range(1000))
    assert all(drops_caption(17, 0, index, 1.0) for index in range(1000))


def write_index(root: Path, split: str, samples: list[int]) -> None:
    (root / split).mkdir(parents=True)
    shards = [{"samples": n, "raw_data": {"basename": f"shard.{i:05d}.mds"}} for i, n in enumerate(samples)]
    (root / split / "index.json").write_text(json.dumps({"version": 2, "shards": shards}))


def spec_with(mix: list[dict[str, object]]) -> TrainRunSpec:
    return TrainRunSpec.model_validate(
        {
            "dataset": {"uris": ["/roots-given-below"], "mix": mix},
            "output": {"uri": "/o"},
            "checkpoint": {"uri": "/c"},
        }
    )


def test_one_split_trains_on_each_stream_as_it_is(tmp_path: Path) -> None:
    write_index(tmp_path / "a", "commercial", [10, 5])
    write_index(tmp_path / "b", "commercial", [7])
    planned = plan_streams(
        [str(tmp_path / "a"), str(tmp_path / "b")], spec_with([{"split": "commercial"}]), "test"
    )
    assert [(s.uri, s.samples, p) for s, p in planned] == [
        (f"{tmp_path / 'a'}/commercial", 15, None),
        (f"{tmp_path / 'b'}/commercial", 7, None),
    ]


def test_a_weighted_mix_gives_each_split_its_share_and_roots_of_a_split_their_natural_ratio(
    tmp_path: Path,
) -> None:
    for root, (c, nc) in {"a": (30, 10), "b": (10, 30)}.items():
        write_index(tmp_path / root, "commercial", [c])
        write_index(tmp_path / root, "noncommercial", [nc])
    mix = [{"split": "commercial", "weight": 3}, {"split": "noncommercial", "weight": 1}]
    planned = plan_streams([str(tmp_path / "a"), str(tmp_path / "b")], spec_with(mix), "test")
    proportions = {(Path(s.uri).parent.name, s.split): p for s, p in planned}
    assert proportions == {
        ("a", "commercial"): pytest.approx(3 * 30 / 40),
        ("a", "noncommercial"): pytest.approx(1 * 10 / 40),
        ("b", "commercial"): pytest.approx(3 * 10 / 40),
        ("b", "noncommercial"): pytest.approx(1 * 30 / 40),
    }


def test_a_missing_split_index_names_the_uri_and_where_it_came_from(tmp_path: Path) -> None:
    write_index(tmp_path, "commercial", [4])
    mix = [{"split": "commercial"}, {"split": "noncommercial"}]
    with pytest.raises(TrainingDataMissing, match=r"noncommercial/index.json does not exist.*CaptionJob 'c'"):
        plan_streams([str(tmp_path)], spec_with(mix), "CaptionJob 'c'")


def test_a_split_without_samples_in_the_mix_is_refused_but_an_empty_root_is_skipped(tmp_path: Path) -> None:
    write_index(tmp_path / "a", "commercial", [4])
    write_index(tmp_path / "a", "noncommercial", [])
    write_index(tmp_path / "b", "commercial", [])
    one = plan_streams([str(tmp_path / "a"), str(tmp_path / "b")], spec_with([{"split": "commercial"}]), "x")
    assert [s.uri for s, _ in one] == [f"{tmp_path / 'a'}/commercial"]
    mix = [{"split": "commercial"}, {"split": "noncommercial"}]
    with pytest.raises(TrainingDataMissing, match="noncommercial split from x holds no samples"):
        plan_streams([str(tmp_path / "a")], spec_with(mix), "x")


def test_a_batch_stacks_tensors_first_and_keeps_each_samples_record() -> None:
    samples = [
        {"pixels": torch.zeros(3, 8, 8), "input_ids": torch.arange(4), "record": {"photo_id": 1}},
        {"pixels": torch.ones(3, 8, 8), "input_ids": torch.arange(4), "record": {"photo_id": 2}},
    ]
    batch = collate(samples)
    assert next(iter(batch)) == "pixels"  # streaming's loader counts samples by the first value
    assert batch["pixels"].shape == (2, 3, 8, 8)
    assert batch["records"] == [{"photo_id": 1}, {"photo_id": 2}]

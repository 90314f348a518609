"""Resolution stages of one TrainRun (spec.schedule.stages): which stage a step is in, the spec's rules,
and how the latents phase lays out one latents column per stage resolution."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tests.unit.test_operator_train import NOW, observe

from commoncanvas.sample import synthetic_jpeg
from commoncanvas.specs import KINDS, TrainRun, load_resources
from commoncanvas.specs.common import SpecError
from commoncanvas.specs.train import (
    DEFAULT_MAX_STEPS,
    DEFAULT_RESOLUTION,
    ResolutionStage,
    TrainRunSpec,
    stage_at,
)
from commoncanvas.train.latents import (
    latents_column,
    load_pixels,
    load_stage_pixels,
    split_stage_pixels,
    stage_resolutions,
)
from commoncanvas_operator.reducers import JobView, Upstream, reduce_train

PAPER = [ResolutionStage(resolution=256, steps=550_000), ResolutionStage(resolution=512, steps=850_000)]


def test_a_step_is_in_the_stage_whose_steps_it_falls_in() -> None:
    assert [stage_at(PAPER, step) for step in (0, 549_999, 550_000, 1_399_999)] == [0, 0, 1, 1]


def test_a_step_past_the_last_stage_is_in_the_last_stage() -> None:
    assert stage_at(PAPER, 1_400_000) == 1
    assert stage_at(PAPER[:1], 10**9) == 0


def run_yaml(spec: str) -> str:
    return f"""apiVersion: commoncanvas.dev/v1alpha1
kind: TrainRun
metadata:
  name: staged
spec:
  dataset:
    uris: [s3://b/captions]
  output:
    uri: s3://b/out
  checkpoint:
    uri: s3://b/ckpt
{spec}"""


def load_run(tmp_path: Path, spec: str) -> TrainRun:
    path = tmp_path / "trainrun.yaml"
    path.write_text(run_yaml(spec))
    [run] = load_resources(path, KINDS)
    assert isinstance(run, TrainRun)
    return run


def spec_error(tmp_path: Path, spec: str) -> str:
    with pytest.raises(SpecError) as caught:
        load_run(tmp_path, spec)
    message = str(caught.value)
    assert "\n" not in message and str(tmp_path / "trainrun.yaml") in message
    return message


STAGES = """  schedule:
    stages:
      - {resolution: 256, steps: 550000}
      - {resolution: 512, steps: 850000}
"""


def test_stages_give_the_total_steps_and_the_final_resolution(tmp_path: Path) -> None:
    spec = load_run(tmp_path, STAGES).spec
    assert spec.schedule.max_steps == 1_400_000
    assert spec.resolution == 512  # the model's sample size and the exported pipeline's default
    assert [(s.resolution, s.steps) for s in spec.stages] == [(256, 550_000), (512, 850_000)]


def test_a_run_without_stages_is_one_stage_at_its_resolution(tmp_path: Path) -> None:
    assert [(s.resolution, s.steps) for s in load_run(tmp_path, "  resolution: 256\n").spec.stages] == [
        (256, DEFAULT_MAX_STEPS)
    ]
    assert load_run(tmp_path, "").spec.stages == [
        ResolutionStage(resolution=DEFAULT_RESOLUTION, steps=DEFAULT_MAX_STEPS)
    ]


def test_a_staged_spec_survives_a_dump_and_reload(tmp_path: Path) -> None:
    run = load_run(tmp_path, STAGES)
    again = TrainRun.model_validate(run.model_dump(mode="json", by_alias=True))
    assert again.spec.stages == run.spec.stages and again.spec.schedule.max_steps == 1_400_000


def test_resolution_and_stages_together_are_refused_naming_both_fields(tmp_path: Path) -> None:
    message = spec_error(tmp_path, "  resolution: 512\n" + STAGES)
    assert "spec.resolution" in message and "spec.schedule.stages" in message


def test_max_steps_other_than_the_stages_total_is_refused(tmp_path: Path) -> None:
    message = spec_error(tmp_path, STAGES + "    maxSteps: 1000000\n")
    assert "schedule.maxSteps 1000000" in message and "1400000" in message


def test_max_steps_equal_to_the_stages_total_is_accepted(tmp_path: Path) -> None:
    assert load_run(tmp_path, STAGES + "    maxSteps: 1400000\n").spec.schedule.max_steps == 1_400_000


@pytest.mark.parametrize(
    ("stage", "field"),
    [("{resolution: 260, steps: 10}", "resolution"), ("{resolution: 256, steps: 0}", "steps")],
)
def test_a_stage_off_the_grid_or_without_steps_is_refused_naming_the_field(
    tmp_path: Path, stage: str, field: str
) -> None:
    message = spec_error(tmp_path, f"  schedule:\n    stages:\n      - {stage}\n")
    assert f"spec.schedule.stages.0.{field}" in message


def staged_spec(stages: list[dict[str, Any]]) -> TrainRunSpec:
    body = {
        "dataset": {"uris": ["s3://b/c"]},
        "output": {"uri": "s3://b/o"},
        "checkpoint": {"uri": "s3://b/k"},
        "schedule": {"stages": stages},
    }
    return TrainRunSpec.model_validate(body)


def test_the_final_resolution_keeps_the_plain_latents_column_and_earlier_ones_are_named() -> None:
    spec = staged_spec([{"resolution": 64, "steps": 2}, {"resolution": 96, "steps": 2}])
    assert stage_resolutions(spec) == [64, 96]
    assert [latents_column(spec, r) for r in (64, 96)] == ["latents_64", "latents"]


def test_a_resolution_repeated_by_two_stages_is_encoded_once() -> None:
    spec = staged_spec(
        [{"resolution": 64, "steps": 2}, {"resolution": 96, "steps": 2}, {"resolution": 64, "steps": 1}]
    )
    assert stage_resolutions(spec) == [64, 96]


def test_stage_pixels_split_back_into_each_resolutions_load_pixels() -> None:
    images = [synthetic_jpeg(photo, size) for photo, size in ((1, (96, 72)), (2, (72, 128)))]
    batch = torch.stack([load_stage_pixels(image, [64, 96]) for image in images])
    small, large = split_stage_pixels(batch, [64, 96])
    assert torch.equal(small, torch.stack([load_pixels(image, 64) for image in images]))
    assert torch.equal(large, torch.stack([load_pixels(image, 96) for image in images]))


def test_the_operator_shows_rank_0s_stage_and_resolution_on_the_trainrun() -> None:
    ready = Upstream("CaptionJob", "caps", phase="Succeeded", output_uri="s3://b/caps")
    written = {
        "phase": "Running",
        "step": 600_000,
        "stage": 2,
        "resolution": 512,
        "progress": "600000/1400000",
    }
    status = reduce_train("s3://b/sd", observe(upstream=ready, job=JobView(active=4), train_status=written))
    assert (status["stage"], status["resolution"], status["startTime"]) == (2, 512, NOW)
    # Kept from the previous status while no new status.json is read.
    again = reduce_train("s3://b/sd", observe(previous=status, job=JobView(active=4)))
    assert (again["stage"], again["resolution"]) == (2, 512)

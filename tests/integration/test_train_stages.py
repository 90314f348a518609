"""One TrainRun in two resolution stages (64 px, then 96 px) on CPU with the tiny SD2 model: the step,
the optimizer, the LR schedule and the EMA carry across the boundary, the data is rebuilt at the new
resolution, a resume mid-stage continues in that stage, and precomputed latents hold one set per stage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tests.integration.test_train import COMMERCIAL, EPOCH_SAMPLES, train_run, write_split

from commoncanvas.mds import read_split
from commoncanvas.specs import TrainRun
from commoncanvas.train import latents, loop
from commoncanvas.train.parts import load_encoders

pytestmark = pytest.mark.integration
STAGES = [{"resolution": 64, "steps": 3}, {"resolution": 96, "steps": 3}]


@pytest.fixture(scope="module")
def captions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("captions")
    write_split(root, "commercial", [COMMERCIAL[i % 3] for i in range(EPOCH_SAMPLES)], 1000)
    return root


@pytest.fixture(scope="module", autouse=True)
def _caches(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COMMONCANVAS_MODEL_CACHE", str(tmp_path_factory.getbasetemp() / "models"))
        patch.setenv("COMMONCANVAS_DATA_CACHE", str(tmp_path_factory.mktemp("data-cache")))
        yield


def staged_run(name: str, captions: Path, work: Path, **spec: Any) -> TrainRun:
    staged: dict[str, Any] = {
        "resolution": None,
        "checkpoint": {"intervalSteps": 1, "keep": 10},
        "schedule": {"maxSteps": None, "stages": STAGES, "warmupSteps": 4},
        "optimizations": {"ema": {"startStep": 0}},
    }
    for key, value in spec.items():
        staged[key] = {**staged[key], **value}
    return train_run(name, str(captions), str(work / "out"), str(work / "ckpt"), **staged)


def observe_batch_sides(patch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """The side of every micro-batch the loop encodes (pixels or precomputed latents), in order: the
    real `encode`, observed."""
    sides: list[tuple[str, int]] = []
    encode = loop.encode

    def observed(parts: Any, batch: dict[str, Any], device: torch.device) -> Any:
        key = "latents" if "latents" in batch else "pixels"
        sides.append((key, int(batch[key].shape[-1])))
        return encode(parts, batch, device)

    patch.setattr(loop, "encode", observed)
    return sides


@pytest.fixture
def batch_sides(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    return observe_batch_sides(monkeypatch)


def checkpoint(work: Path, step: int) -> dict[str, Any]:
    folder = work / "ckpt" / f"step-{step:08d}"
    optimizer = torch.load(folder / "optimizer.pt", weights_only=True)
    return {
        "adam_steps": {float(s["step"]) for s in optimizer["state"].values()},
        "exp_avg": next(iter(optimizer["state"].values()))["exp_avg"],
        "trainer": torch.load(folder / "trainer.pt", weights_only=True),
        "state": json.loads((folder / "state.json").read_text()),
    }


@pytest.fixture(scope="module")
def two_stages(captions: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("stages")
    with pytest.MonkeyPatch.context() as patch:
        sides = observe_batch_sides(patch)
        summary = loop.run_training(staged_run("stages", captions, work))
    return {"work": work, "summary": summary, "sides": sides}


def test_the_second_stage_trains_on_images_at_its_resolution(two_stages: dict[str, Any]) -> None:
    assert two_stages["summary"]["step"] == 6
    assert two_stages["sides"] == [("pixels", 64)] * 3 + [("pixels", 96)] * 3


def test_step_optimizer_lr_and_ema_carry_across_the_stage_boundary(two_stages: dict[str, Any]) -> None:
    work = two_stages["work"]
    last_of_first, first_of_second = checkpoint(work, 3), checkpoint(work, 4)
    # Adam's per-parameter step count and moments go on; a fresh optimizer would be back at 1.
    assert last_of_first["adam_steps"] == {3.0} and first_of_second["adam_steps"] == {4.0}
    assert not torch.equal(first_of_second["exp_avg"], torch.zeros_like(first_of_second["exp_avg"]))
    # The warm-up counts global steps (4): the LR schedule is at step 4, not 1, in stage 2.
    assert first_of_second["trainer"]["lr_scheduler"]["last_epoch"] == 4
    assert first_of_second["trainer"]["ema_updates"] == 4
    ema_3 = load_file(str(work / "ckpt" / "step-00000003" / "ema.safetensors"))
    ema_4 = load_file(str(work / "ckpt" / "step-00000004" / "ema.safetensors"))
    unet_4 = load_file(str(work / "ckpt" / "step-00000004" / "unet.safetensors"))
    # The EMA's 4th update mixes in the weights with decay (1 + 3) / (10 + 3) (make_ema); a new EMA's
    # first update would have copied them (decay 0).
    decay = 4 / 13
    for name in ema_4:
        torch.testing.assert_close(ema_4[name], decay * ema_3[name] + (1 - decay) * unet_4[name])
    assert any(not torch.equal(ema_4[n], unet_4[n]) for n in ema_4)


def test_the_second_stage_continues_the_epoch_where_the_first_stopped(two_stages: dict[str, Any]) -> None:
    seen = []
    for part in sorted((two_stages["work"] / "ckpt" / "seen").glob("*.jsonl")):
        seen += [json.loads(line) for line in part.read_text().split("\n") if line]
    photos = [r["photo_id"] for r in seen]
    assert len(photos) == 12 and len(set(photos)) == 12, "6 steps of 2 from a 24-sample epoch: no repeats"


def test_status_shows_the_stage_and_its_resolution(two_stages: dict[str, Any]) -> None:
    status = json.loads((two_stages["work"] / "out" / "status.json").read_text())
    assert (status["phase"], status["step"], status["stage"], status["resolution"]) == ("Succeeded", 6, 2, 96)
    assert status["progress"] == "6/6"


def test_a_resume_in_the_middle_of_the_second_stage_continues_there(
    two_stages: dict[str, Any], captions: Path, tmp_path: Path, batch_sides: list[tuple[str, int]]
) -> None:
    # The checkpoint of step 4 as the newest: as if the run had stopped one step into stage 2.
    shutil.copytree(two_stages["work"] / "ckpt", tmp_path / "ckpt")
    for step in (5, 6):
        shutil.rmtree(tmp_path / "ckpt" / f"step-{step:08d}")
    (tmp_path / "ckpt" / "latest").write_text(json.dumps({"step": 4, "path": "step-00000004"}))

    summary = loop.run_training(staged_run("stages", captions, tmp_path))

    assert summary["step"] == 6
    assert batch_sides == [("pixels", 96)] * 2
    # The same weights as the run that never stopped: same stage, data position, RNG and optimizer.
    resumed = load_file(str(tmp_path / "ckpt" / "step-00000006" / "unet.safetensors"))
    straight = load_file(str(two_stages["work"] / "ckpt" / "step-00000006" / "unet.safetensors"))
    assert all(torch.equal(resumed[name], tensor) for name, tensor in straight.items())


def test_a_resume_at_the_boundary_starts_the_second_stage(
    two_stages: dict[str, Any], captions: Path, tmp_path: Path, batch_sides: list[tuple[str, int]]
) -> None:
    shutil.copytree(two_stages["work"] / "ckpt", tmp_path / "ckpt")
    for step in (4, 5, 6):
        shutil.rmtree(tmp_path / "ckpt" / f"step-{step:08d}")
    (tmp_path / "ckpt" / "latest").write_text(json.dumps({"step": 3, "path": "step-00000003"}))

    assert loop.run_training(staged_run("stages", captions, tmp_path))["step"] == 6
    assert batch_sides == [("pixels", 96)] * 3


def test_precomputed_latents_hold_one_set_per_stage_and_each_stage_trains_on_its_own(
    captions: Path, tmp_path: Path, batch_sides: list[tuple[str, int]]
) -> None:
    run = staged_run(
        "staged-latents",
        captions,
        tmp_path,
        optimizations={"precomputeLatents": True, "latentsSamplesPerUnit": 12},
        checkpoint={"intervalSteps": 6},
    )
    latents.run_latents(run.spec, "test", processes=1, show_progress=False)
    row = read_split(tmp_path / "out" / "latents" / "commercial")[0]
    assert row["latents_64"].shape == (4, 8, 8) and row["latents"].shape == (4, 12, 12)
    # Each set is the one encoding training's on-the-fly path does at that resolution.
    image = next(s["image"] for s in read_split(captions / "commercial") if s["photo_id"] == row["photo_id"])
    vae = load_encoders(run.spec).vae
    for column, side in (("latents_64", 64), ("latents", 96)):
        expected = latents.encode_images(vae, latents.load_pixels(image, side)[None])[0].numpy()
        np.testing.assert_allclose(row[column], expected, rtol=2e-3, atol=2e-3)

    assert loop.run_training(run)["step"] == 6
    assert batch_sides == [("latents", 8)] * 3 + [("latents", 12)] * 3

"""Checkpoints on a local directory: everything a resume needs comes back, written atomically, pruned."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.training_utils import EMAModel
from prometheus_client import REGISTRY

from commoncanvas import metrics
from commoncanvas.train.checkpoint import CheckpointStore, Progress, Trainable
from commoncanvas.train.loop import warmup_factor
from commoncanvas.train.world import World

ONE_PROCESS = World(rank=0, size=1, local_rank=0, local_size=1, device=torch.device("cpu"), restarts=0)


@dataclass
class FakeLoader:
    """Stands in for StreamingDataLoader: a state to save and the state it was given back."""

    state: dict[str, Any] = field(default_factory=lambda: {"epoch": 0, "sample_in_epoch": 0})
    loaded: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return dict(self.state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loaded = state


def trainable(seed: int) -> Trainable:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GroupNorm(2, 8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_factor(step, 10))
    ema = EMAModel(model.parameters(), decay=0.9, foreach=True)
    return Trainable(
        model, optimizer, scheduler, ema, FakeLoader(), torch.amp.GradScaler("cpu", enabled=False)
    )


def train_steps(t: Trainable, steps: int) -> None:
    for _ in range(steps):
        loss = t.unet(torch.randn(3, 4)).pow(2).mean()
        loss.backward()
        t.optimizer.step()
        t.optimizer.zero_grad()
        t.lr_scheduler.step()
        t.ema.step(t.unet.parameters())


def test_a_restored_checkpoint_continues_exactly_where_the_saved_run_was(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path / "ckpt"), keep=2)
    saved = trainable(seed=0)
    train_steps(saved, 3)
    saved.loader.state = {"epoch": 1, "sample_in_epoch": 6}
    progress = Progress(step=3, images_seen=9, epoch=1)
    seen = [{"photo_id": 7, "split": "commercial", "step": 3}]
    store.save(saved, progress, seen, ONE_PROCESS)
    next_noise = torch.rand(4)

    restored = trainable(seed=1)  # other weights, fresh optimizer, fresh EMA
    back = store.restore(restored, ONE_PROCESS)

    assert back == progress
    for a, b in zip(saved.unet.state_dict().values(), restored.unet.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(saved.ema.shadow_params, restored.ema.shadow_params, strict=True):
        assert torch.equal(a, b)
    assert restored.ema.optimization_step == 3
    assert restored.lr_scheduler.last_epoch == 3
    assert restored.optimizer.state_dict()["state"][0]["step"] == 3
    assert restored.loader.loaded == {"epoch": 1, "sample_in_epoch": 6}
    assert torch.equal(torch.rand(4), next_noise)  # the RNG continues where it was at the save
    assert list(store.seen_records(back)) == seen
    # ...and both take the same next step.
    batch = torch.randn(3, 4)
    for t in (saved, restored):
        t.unet(batch).pow(2).mean().backward()
        t.optimizer.step()
    for a, b in zip(saved.unet.parameters(), restored.unet.parameters(), strict=True):
        assert torch.equal(a, b)


def test_no_checkpoint_means_a_fresh_start(tmp_path: Path) -> None:
    assert CheckpointStore(str(tmp_path / "none"), keep=2).restore(trainable(0), ONE_PROCESS) is None


def test_only_the_newest_checkpoints_are_kept_but_every_seen_part_stays(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path), keep=2)
    t = trainable(0)
    progress = Progress()
    for step in (2, 4, 6, 8):
        progress.step = step
        store.save(t, progress, [{"photo_id": step}], ONE_PROCESS)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000006", "step-00000008"]
    assert [r["photo_id"] for r in store.seen_records(progress)] == [2, 4, 6, 8]
    assert json.loads((tmp_path / "latest").read_text()) == {"step": 8, "path": "step-00000008"}


def test_a_half_written_newer_checkpoint_is_ignored_and_removed_by_the_next_save(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path), keep=3)
    t = trainable(0)
    store.save(t, Progress(step=2), [], ONE_PROCESS)
    crashed = tmp_path / "step-00000004"
    crashed.mkdir()
    (crashed / "unet.safetensors").write_bytes(b"half a file")  # no `latest` pointing here

    assert store.latest_step() == 2
    progress = store.restore(trainable(1), ONE_PROCESS)
    assert progress is not None and progress.step == 2
    progress.step = 3
    store.save(t, progress, [], ONE_PROCESS)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000002", "step-00000003"]


def last_checkpoint_metric() -> float | None:
    metrics.export_training()  # as rank 0 does; without it the value depends on which test ran first
    return REGISTRY.get_sample_value("commoncanvas_train_last_checkpoint_timestamp_seconds")


def test_a_published_checkpoint_sets_the_last_checkpoint_timestamp(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path), keep=2)
    metrics.TRAIN_LAST_CHECKPOINT.set(0)
    before = time.time()
    store.save(trainable(0), Progress(step=2), [], ONE_PROCESS)
    value = last_checkpoint_metric()
    assert value is not None and before <= value <= time.time()


def test_a_failed_checkpoint_write_leaves_the_last_checkpoint_timestamp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CheckpointStore(str(tmp_path), keep=2)
    metrics.TRAIN_LAST_CHECKPOINT.set(123.0)

    def fail(*args: object) -> None:
        raise OSError("bucket gone")

    monkeypatch.setattr(store.storage, "write_text", fail)  # `latest` is never written
    with pytest.raises(OSError):
        store.save(trainable(0), Progress(step=2), [], ONE_PROCESS)
    assert last_checkpoint_metric() == 123.0

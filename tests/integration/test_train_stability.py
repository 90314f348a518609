"""The training loop with a non-finite loss injected: the step is skipped and counted, the weights stay as
they were, clipping holds, and too many skips in a row fail the run naming the step and the field; with
two ranks, one rank's NaN makes every rank skip."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.integration.test_train import COMMERCIAL, EPOCH_SAMPLES, seen_records, train_run, write_split

from commoncanvas import metrics
from commoncanvas.train import loop
from commoncanvas.train.loop import TrainingDiverged, run_training

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("captions")
    write_split(root, "commercial", [COMMERCIAL[i % 3] for i in range(EPOCH_SAMPLES)], 1000)
    return root


@pytest.fixture(autouse=True)
def _caches(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMMONCANVAS_MODEL_CACHE", str(tmp_path_factory.getbasetemp() / "models"))
    monkeypatch.setenv("COMMONCANVAS_DATA_CACHE", str(tmp_path_factory.mktemp("data-cache")))


def nan_losses_at(monkeypatch: pytest.MonkeyPatch, bad_calls: set[int] | None) -> list[int]:
    """Make the loss of the given forward calls (1-based; None = all) NaN; returns the call counter."""
    real = loop.prediction_loss
    calls = [0]

    def patched(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls[0] += 1
        loss = real(*args, **kwargs)
        return loss * math.nan if bad_calls is None or calls[0] in bad_calls else loss

    monkeypatch.setattr(loop, "prediction_loss", patched)
    return calls


def test_a_nan_loss_skips_the_step_counts_it_and_leaves_the_weights_as_they_were(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nan_losses_at(monkeypatch, {2})
    real_clip = loop.clip_gradients
    weights: list[list[torch.Tensor]] = []  # the UNet's weights before each step's update
    clipped: list[float] = []

    def watched_clip(unet: torch.nn.Module, *args: Any) -> torch.Tensor:
        weights.append([p.detach().clone() for p in unet.parameters()])
        norm = real_clip(unet, *args)
        clipped.append(float(torch.nn.utils.get_total_norm([p.grad for p in unet.parameters()])))
        return norm

    monkeypatch.setattr(loop, "clip_gradients", watched_clip)
    skipped_before = metrics.TRAIN_SKIPPED_STEPS._value.get()
    run = train_run(
        "nan-once",
        str(data),
        str(tmp_path / "out"),
        str(tmp_path / "ckpt"),
        schedule={"maxSteps": 3, "gradientClipNorm": 0.01, "maxConsecutiveSkippedSteps": 2},
        checkpoint={"intervalSteps": 1},
    )

    summary = run_training(run)

    assert summary["step"] == 3 and math.isfinite(summary["loss"])
    assert metrics.TRAIN_SKIPPED_STEPS._value.get() == skipped_before + 1
    status = json.loads((tmp_path / "out" / "status.json").read_text())
    assert (status["phase"], status["step"], status["skippedSteps"], status["imagesSeen"]) == (
        "Succeeded",
        3,
        1,
        6,
    )
    # Four attempts for three steps: the second (NaN) changed nothing, the first did.
    assert len(weights) == 4
    assert all(torch.equal(a, b) for a, b in zip(weights[1], weights[2], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(weights[0], weights[1], strict=True))
    assert all(torch.isfinite(w).all() for attempt in weights for w in attempt)
    # The clip held on every finite step; the skipped batch is not recorded as trained on.
    assert [c <= 0.01 * (1 + 1e-5) for c in clipped] == [True, False, True, True]
    assert [r["step"] for r in seen_records(tmp_path / "ckpt")] == [1, 1, 2, 2, 3, 3]
    trainer = torch.load(tmp_path / "ckpt" / "step-00000003" / "trainer.pt", weights_only=False)
    assert (trainer["ema_updates"], trainer["lr_scheduler"]["last_epoch"]) == (3, 3)  # no EMA or LR step


def test_too_many_skipped_steps_in_a_row_fail_the_run_naming_the_step_and_the_field(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = nan_losses_at(monkeypatch, None)
    run = train_run(
        "nan-always",
        str(data),
        str(tmp_path / "out"),
        str(tmp_path / "ckpt"),
        schedule={"maxSteps": 10, "maxConsecutiveSkippedSteps": 3},
    )

    with pytest.raises(TrainingDiverged, match=r"^step 1: .*schedule\.maxConsecutiveSkippedSteps = 3"):
        run_training(run)

    assert calls[0] == 3
    status = json.loads((tmp_path / "out" / "status.json").read_text())
    assert (status["phase"], status["step"], status["skippedSteps"]) == ("Failed", 0, 3)
    assert "schedule.maxConsecutiveSkippedSteps" in status["conditions"][0]["message"]
    assert not (tmp_path / "ckpt" / "latest").exists()


TWO_RANKS = """
import json, math, sys, torch, torch.distributed as dist, torch.multiprocessing as mp

def rank_main(rank, port, queue):
    from commoncanvas.train.loop import check_step
    from commoncanvas.train.world import World

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    world = World(rank=rank, size=2, local_rank=rank, local_size=2, device=torch.device("cpu"), restarts=0)
    loss = torch.tensor(math.nan if rank == 1 else 0.5)  # only rank 1's micro-batch went bad
    check = check_step(world, loss, torch.tensor(2.0), out_of_time=False, sigterm=rank == 0)
    queue.put([rank, check.skip, check.sigterm, check.grad_norm])
    dist.destroy_process_group()

if __name__ == "__main__":
    context = mp.get_context("spawn")
    queue = context.Queue()
    procs = [context.Process(target=rank_main, args=(r, int(sys.argv[1]), queue)) for r in range(2)]
    for proc in procs:
        proc.start()
    results = sorted(queue.get(timeout=60) for _ in procs)
    for proc in procs:
        proc.join()
    print(json.dumps(results))
"""


def test_every_rank_skips_when_one_ranks_loss_is_not_finite(tmp_path: Path) -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    services = str(Path(__file__).resolve().parents[2] / "services")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([services, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, str(script), str(port)], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # Both skip (else rank 0 would update and the replicas diverge); the stop flags are OR-ed as before.
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [[0, True, True, 2.0], [1, True, True, 2.0]]

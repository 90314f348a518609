"""Sharded and replicated training on two CPU ranks (gloo): FSDP2 runs of the real trainer
(`run_training`, in processes given torchrun's environment) that checkpoint and resume, also on one
process, and DDP's gradient accumulation skipping the all-reduce on inner micro-batches."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file
from tests.integration.test_latents import write_captions
from tests.integration.test_train_launch import free_port
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from commoncanvas.specs import TrainRun
from commoncanvas.train import parts
from commoncanvas.train.checkpoint import LATEST, step_dir
from commoncanvas.train.loop import run_training
from commoncanvas.train.model import gradient_sync, wrap_for_training
from commoncanvas.train.world import close_world, init_world

pytestmark = pytest.mark.integration
RANKS = 2
MICRO_BATCH = 2
ACCUMULATION = 2
IMAGES_PER_STEP = RANKS * MICRO_BATCH * ACCUMULATION
MAX_STEPS = 3
RESUMED_FROM = 2
RUN_SECONDS = 240  # a bound on one training process; the whole run takes seconds


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The tiny pipeline and a captioned split of one epoch (MAX_STEPS steps); every rank inherits the
    caches through the environment."""
    root = tmp_path_factory.mktemp("fsdp")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COMMONCANVAS_MODEL_CACHE", str(root / "models"))
        patch.setenv("COMMONCANVAS_DATA_CACHE", str(root / "data-cache"))
        patch.setenv("HF_HUB_OFFLINE", "1")
        parts.tiny_sd2_dir()  # written once here, not raced for by the ranks
        write_captions(root / "captions", MAX_STEPS * IMAGES_PER_STEP)
        yield root


def train_run(work: Path, name: str, fsdp: str, checkpoints: Path) -> TrainRun:
    return TrainRun.model_validate(
        {
            "metadata": {"name": name},
            "spec": {
                "dataset": {"uris": [str(work / "captions")], "loaderWorkers": 0},
                "output": {"uri": str(work / name / "out")},
                "checkpoint": {"uri": str(checkpoints), "intervalSteps": RESUMED_FROM, "keep": 2},
                "resolution": 64,
                "model": {"architecture": "tiny"},
                "schedule": {
                    "globalBatchSize": IMAGES_PER_STEP,
                    "microBatchSize": MICRO_BATCH,
                    "warmupSteps": 0,
                    "maxSteps": MAX_STEPS,
                },
                "optimizations": {"fsdp": fsdp, "ema": {"enabled": True}},
                "distributed": {"gpusPerNode": 0},
                "samples": {"prompts": ["a cat"], "intervalSteps": 1000, "inferenceSteps": 2},
            },
        }
    )


def join_rank(rank: int, ranks: int, port: int) -> None:
    """This process as rank `rank` of `ranks`, as torchrun describes one (one process: no group)."""
    torch.set_num_threads(1)
    if ranks > 1:
        os.environ.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(ranks),
            LOCAL_WORLD_SIZE=str(ranks),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )


def run_ranks(body: Callable[..., None], ranks: int, *args: Any) -> None:
    """`body(rank, ranks, port, *args)` in `ranks` processes forked from this one (torch is imported
    already: a fresh interpreter per rank would spend ~15 s importing it), bounded in time."""
    context = mp.start_processes(
        body, (ranks, free_port(), *args), nprocs=ranks, join=False, start_method="fork"
    )
    deadline = time.monotonic() + RUN_SECONDS
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{ranks} ranks did not finish within {RUN_SECONDS}s")


def _train_rank(rank: int, ranks: int, port: int, run: TrainRun, logs: str) -> None:
    join_rank(rank, ranks, port)
    logging.basicConfig(
        level=logging.INFO,
        filename=f"{logs}-rank{rank}.log",
        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    summary = run_training(run)  # the trainer's own entry point: joins the group, trains, leaves it
    if rank == 0:
        Path(f"{logs}-summary.json").write_text(json.dumps(summary))


def train(run: TrainRun, ranks: int, work: Path) -> dict[str, Any]:
    """Train `run` as `ranks` processes of one gloo group; rank 0's summary, with every rank's log."""
    logs = work / run.metadata.name
    run_ranks(_train_rank, ranks, run, str(logs))
    summary: dict[str, Any] = json.loads(Path(f"{logs}-summary.json").read_text())
    summary["logs"] = "\n".join(Path(f"{logs}-rank{r}.log").read_text() for r in range(ranks))
    return summary


def resumable_copy(checkpoints: Path, target: Path, step: int) -> Path:
    """A copy of a run's checkpoints as they were at `step`: what a resumed run writes after it is
    then its own, never a copy of the original run's."""
    later = {step_dir(s) for s in range(step + 1, MAX_STEPS + 1)}
    shutil.copytree(checkpoints, target, ignore=lambda folder, names: [n for n in names if n in later])
    (target / LATEST).write_text(json.dumps({"step": step, "path": step_dir(step)}))
    return target


@pytest.fixture(scope="module")
def runs(work: Path) -> dict[str, Any]:
    """A two-rank FULL_SHARD run of MAX_STEPS steps, checkpointed at RESUMED_FROM and at the end; the
    same run resumed from RESUMED_FROM by two SHARD_GRAD_OP ranks and, separately, by one process."""
    first_checkpoints = work / "first-ckpt"
    first = train(train_run(work, "first", "full", first_checkpoints), RANKS, work)
    regrouped_checkpoints = resumable_copy(first_checkpoints, work / "regrouped-ckpt", RESUMED_FROM)
    regrouped = train(train_run(work, "regrouped", "shard-grad-op", regrouped_checkpoints), RANKS, work)
    alone_checkpoints = resumable_copy(first_checkpoints, work / "alone-ckpt", RESUMED_FROM)
    alone = train(train_run(work, "alone", "full", alone_checkpoints), 1, work)
    return {
        "first": first,
        "regrouped": regrouped,
        "alone": alone,
        "checkpoints": {
            "first": first_checkpoints,
            "regrouped": regrouped_checkpoints,
            "alone": alone_checkpoints,
        },
    }


def test_two_fsdp_ranks_train_with_accumulation_and_ema_and_checkpoint_the_full_state(
    runs: dict[str, Any],
) -> None:
    first = runs["first"]
    assert "2 processes x micro-batch 2 x 2 accumulation = 8 images per step" in first["logs"]
    assert first["step"] == MAX_STEPS and first["imagesSeen"] == MAX_STEPS * IMAGES_PER_STEP
    assert torch.isfinite(torch.tensor(first["loss"]))
    final = runs["checkpoints"]["first"] / step_dir(MAX_STEPS)
    unet, ema = load_file(str(final / "unet.safetensors")), load_file(str(final / "ema.safetensors"))
    # Gathered full tensors (not one rank's shards), the EMA a distinct set of weights.
    reference = parts.load_part(UNet2DConditionModel, None, "tiny", "unet")
    assert {k: v.shape for k, v in unet.items()} == {k: v.shape for k, v in reference.state_dict().items()}
    assert unet.keys() == ema.keys() and any(not torch.equal(unet[k], ema[k]) for k in unet)


def test_a_resume_under_shard_grad_op_continues_the_full_shard_run_step_for_step(
    runs: dict[str, Any],
) -> None:
    first, regrouped = runs["first"], runs["regrouped"]
    assert f"resumed at step {RESUMED_FROM}" in regrouped["logs"]
    assert regrouped["step"] == MAX_STEPS
    # The next step's loss is equal only if the weights, every rank's RNG (noise, timesteps) and the
    # data position came back from the checkpoint and SHARD_GRAD_OP computes what FULL_SHARD does; the
    # weights after its update only if AdamW's moments did too, the EMA's only if the EMA did.
    torch.testing.assert_close(regrouped["loss"], first["loss"], rtol=1e-5, atol=1e-6)
    final = step_dir(MAX_STEPS)
    for name in ("unet.safetensors", "ema.safetensors"):
        ours = load_file(str(runs["checkpoints"]["regrouped"] / final / name))
        theirs = load_file(str(runs["checkpoints"]["first"] / final / name))
        for key, tensor in theirs.items():
            torch.testing.assert_close(ours[key], tensor, rtol=1e-5, atol=1e-6, msg=f"{name} {key}")


def test_one_process_resumes_the_two_rank_sharded_checkpoint_with_its_optimizer_and_ema(
    runs: dict[str, Any],
) -> None:
    alone, first = runs["alone"], runs["first"]
    assert f"resumed at step {RESUMED_FROM}" in alone["logs"]
    assert "world size changed (2 -> 1)" in alone["logs"]
    assert "1 processes x micro-batch 2 x 4 accumulation = 8 images per step" in alone["logs"]
    assert alone["step"] == MAX_STEPS and alone["imagesSeen"] == first["imagesSeen"]
    final = runs["checkpoints"]["alone"] / step_dir(MAX_STEPS)
    # AdamW's step count went on from the sharded run's (a fresh optimizer would count 1).
    optimizer = torch.load(final / "optimizer.pt", map_location="cpu", weights_only=True)
    assert {float(state["step"]) for state in optimizer["state"].values()} == {float(MAX_STEPS)}
    trainer = torch.load(final / "trainer.pt", map_location="cpu", weights_only=True)
    assert trainer["ema_updates"] == MAX_STEPS


# --- DDP: accumulation without all-reduces on inner micro-batches --------------------------------------


def _count_ddp_allreduces(rank: int, ranks: int, port: int, out: str) -> None:
    """One rank: the tiny UNet under DDP (wrap_for_training), three micro-batches of accumulation
    through gradient_sync, each one's all-reduces counted by a DDP communication hook."""
    join_rank(rank, ranks, port)
    world = init_world()
    unet = parts.load_part(UNet2DConditionModel, None, "tiny", "unet")
    model = wrap_for_training(unet, "off", world)
    calls: list[int] = []

    # DDP checks a hook's annotations as objects: this module's are strings, so it has none.
    def counting_allreduce(state, bucket):  # type: ignore[no-untyped-def]
        calls.append(1)
        return allreduce_hook(state, bucket)

    model.register_comm_hook(None, counting_allreduce)
    torch.manual_seed(rank)  # each rank its own batch, so unsynced gradients differ between ranks
    side, width = unet.config.sample_size, unet.config.cross_attention_dim
    per_micro: list[int] = []
    gradients: list[torch.Tensor] = []
    for micro in range(3):
        before = len(calls)
        with gradient_sync(model, enabled=micro == 2):
            latents = torch.randn(2, unet.config.in_channels, side, side)
            text = torch.randn(2, 77, width)
            output = model(latents, torch.tensor([10, 500]), encoder_hidden_states=text, return_dict=False)[0]
            output.square().mean().backward()
        per_micro.append(len(calls) - before)
        gradients.append(torch.cat([p.grad.flatten() for p in unet.parameters() if p.grad is not None]))
    close_world(world)
    torch.save({"calls": per_micro, "gradients": gradients}, Path(out) / f"rank{rank}.pt")


def test_ddp_accumulation_all_reduces_only_on_the_last_micro_batch(tmp_path: Path, work: Path) -> None:
    run_ranks(_count_ddp_allreduces, RANKS, str(tmp_path))
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(RANKS)]
    for rank, result in enumerate(results):
        inner, last = result["calls"][:-1], result["calls"][-1]
        assert inner == [0, 0] and last > 0, f"rank {rank}: all-reduces per micro-batch {result['calls']}"
    # Inner micro-batches accumulate each rank's own gradients; the last averages the sums over ranks.
    assert not torch.allclose(results[0]["gradients"][1], results[1]["gradients"][1])
    torch.testing.assert_close(results[0]["gradients"][2], results[1]["gradients"][2])

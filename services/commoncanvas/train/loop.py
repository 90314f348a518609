"""One TrainRun training process: one rank of torchrun, or the whole run when started alone.

Read `train` top to bottom: the model parts, the speed-up switches, the optimizer, the data, the resume
from the newest checkpoint, then the loop (micro-batches -> noise -> UNet -> loss -> optimizer step ->
EMA -> metrics, samples, checkpoints), then the export (a diffusers pipeline with the EMA weights) and the
data card.  Every speed-up is a switch applied before the loop; the loop is the same with all of them.
Samples and the export live in `export.py`, logs, metrics and status.json in `report.py`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from streaming import StreamingDataLoader
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from commoncanvas import metrics
from commoncanvas.specs.common import Phase, SpecError
from commoncanvas.specs.train import TrainRun, TrainRunSpec, stage_at
from commoncanvas.storage import open_storage
from commoncanvas.train.checkpoint import CheckpointStore, Progress, Trainable
from commoncanvas.train.data import (
    CaptionedImages,
    PrecomputedLatents,
    data_cache_dir,
    dataset_roots,
    epochs_of,
    make_loader,
    make_streams,
    null_text_hidden,
    plan_streams,
    streaming_nodes_are_hosts,
)
from commoncanvas.train.datacard import CARD_JSON, MANIFEST, DatasetStream, write_datacard
from commoncanvas.train.export import export_pipeline, write_samples
from commoncanvas.train.latents import encode_images, latents_column, latents_uri
from commoncanvas.train.model import (
    ModelParts,
    autocast_dtype,
    build_model,
    compiled,
    configure_speedups,
    ema_updates_at,
    gradient_sync,
    make_ema,
    wrap_for_training,
)
from commoncanvas.train.report import Reporter, peak_flops, unet_training_flops
from commoncanvas.train.world import World, close_world, init_world, sum_over_ranks

log = logging.getLogger(__name__)
TERMINATED_EXIT_CODE = 143  # 128 + SIGTERM, as a shell reports a process SIGTERM ended


def warmup_factor(step: int, warmup_steps: int) -> float:
    """The LR multiplier for optimizer step `step` (0-based): linear warmup to 1, then constant."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0


def gradient_accumulation_steps(global_batch: int, micro_batch: int, world_size: int) -> int:
    per_pass = micro_batch * world_size
    if global_batch % per_pass:
        raise SpecError(
            f"schedule.globalBatchSize {global_batch} is not a multiple of schedule.microBatchSize "
            f"{micro_batch} x {world_size} processes = {per_pass}; change one of them"
        )
    return global_batch // per_pass


def run_training(run: TrainRun, resolve_ref: Callable[[str], str] | None = None) -> dict[str, Any]:
    """Join the process group torchrun describes (if any), train, leave it."""
    world = init_world()
    try:
        return train(run.metadata.name, run.spec, world, resolve_ref)
    finally:
        close_world(world)


def train(
    name: str, spec: TrainRunSpec, world: World, resolve_ref: Callable[[str], str] | None = None
) -> dict[str, Any]:
    """Train TrainRun `name` as this rank of `world`; returns a summary (rank 0's has the outputs)."""
    schedule, opts = spec.schedule, spec.optimizations
    output = open_storage(spec.output.uri)
    report = Reporter(name, spec, world, output)
    if os.environ.get("METRICS_PORT"):  # rank 0 has the run's metrics; every rank its GPU memory
        if world.is_main:
            metrics.export_training()
        metrics.serve(int(os.environ["METRICS_PORT"]) + world.local_rank)

    # The training set's streams first: a missing dataset fails before minutes of model loading.
    planned = plan_training_streams(spec, resolve_ref)

    # Model parts, built identically on every rank; the VAE and text encoder stay frozen.
    parts = build_model(spec, world.device)
    sharded = world.distributed and opts.fsdp != "off"
    configure_speedups(parts, opts, sharded)  # attention kernel, norm precision, memory format, recompute
    unet = parts.unet.to(world.device).train()
    train_unet = wrap_for_training(unet, opts.fsdp, world)  # DDP, FSDP2, or the UNet itself
    forward_unet = compiled(train_unet, opts.compile)
    ema = make_ema(unet, opts.ema, sharded)
    amp_dtype = autocast_dtype(opts.mixed_precision, world.device)
    num_timesteps = parts.noise_scheduler.config.num_train_timesteps

    # Optimizer: AdamW, linear LR warmup then constant; loss scaling only for fp16.
    optimizer = torch.optim.AdamW(
        unet.parameters(), lr=schedule.learning_rate, weight_decay=schedule.weight_decay
    )
    lr_scheduler = LambdaLR(optimizer, partial(warmup_factor, warmup_steps=schedule.warmup_steps))
    grad_scaler = torch.amp.GradScaler(world.device.type, enabled=amp_dtype == torch.float16)
    accumulation = gradient_accumulation_steps(
        schedule.global_batch_size, schedule.micro_batch_size, world.size
    )
    images_per_step = schedule.micro_batch_size * accumulation * world.size

    # Data: one stream per (root, split), sharded over ranks by streaming, at the resolution of the stage
    # the run is in (a resumed run's: the step after its newest checkpoint's).
    checkpoints = CheckpointStore(spec.checkpoint.uri, spec.checkpoint.keep)
    stage = stage_at(spec.stages, checkpoints.latest_step() or 0)
    dataset, loader = stage_data(name, spec, planned, parts, world, stage)

    # Resume from the newest checkpoint, if any: weights, optimizer, EMA, LR, RNG, dataloader position.
    trainable = Trainable(unet, optimizer, lr_scheduler, ema, loader, grad_scaler)
    seed_rank(schedule.seed, world.rank)  # each rank its own noise, unless the checkpoint restores it
    progress = checkpoints.restore(trainable, world) or Progress()
    if peak_flops(world.device):  # MFU needs the model's FLOPs per image, counted once
        report.flops_per_image = unet_training_flops(parts, unet, schedule.micro_batch_size, world.device)
    report.started(progress, accumulation, stage)

    seen: list[dict[str, Any]] = []  # this rank's samples since the last checkpoint
    batches = epochs_of(loader, dataset)
    session_start, seconds_before = time.perf_counter(), progress.train_seconds
    stop = "max-steps" if progress.step >= schedule.max_steps else ""
    consecutive_skips, saved_step = 0, progress.step  # the step of the checkpoint resumed from (or 0)
    with StopOnSigterm() as sigterm:
        while not stop:
            if stage_at(spec.stages, progress.step) != stage:
                # A stage boundary: the same samples at the next resolution.  Switched before the step,
                # not after the last one, so a checkpoint at the boundary holds the old loader's position,
                # as a resume (which builds the new stage's loader at once) expects.
                stage = stage_at(spec.stages, progress.step)
                dataset, loader = next_stage_data(loader, batches, name, spec, planned, parts, world, stage)
                trainable.loader, batches = loader, epochs_of(loader, dataset)
                report.stage_started(progress, stage)
            step_start = time.perf_counter()
            step_loss = torch.zeros((), device=world.device)
            step_records: list[dict[str, Any]] = []
            for micro in range(accumulation):
                epoch, batch = next(batches)
                # The frozen encoders run in fp32 outside autocast, as the LATENTS phase does: only the
                # UNet's forward is mixed precision.
                latents, text_hidden = encode(parts, batch, world.device)
                with gradient_sync(train_unet, enabled=micro == accumulation - 1):
                    with torch.autocast(world.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        noise = torch.randn_like(latents)
                        timesteps = torch.randint(0, num_timesteps, (latents.shape[0],), device=world.device)
                        loss = prediction_loss(forward_unet, parts, latents, text_hidden, noise, timesteps)
                    grad_scaler.scale(loss / accumulation).backward()
                step_loss += loss.detach() / accumulation
                step_records += [
                    {**r, "epoch": epoch, "step": progress.step + 1, "rank": world.rank}
                    for r in batch["records"]
                ]
            learning_rate = float(optimizer.param_groups[0]["lr"])
            grad_norm = clip_gradients(unet, optimizer, grad_scaler, schedule.gradient_clip_norm)

            # One collective a step: the mean loss, the gradient norm, whether any rank saw a non-finite
            # loss or gradient (then every rank skips the update), and whether any rank must stop.
            progress.train_seconds = seconds_before + time.perf_counter() - session_start
            out_of_time = bool(schedule.max_duration_seconds) and (
                progress.train_seconds >= schedule.max_duration_seconds
            )
            check = check_step(world, step_loss, grad_norm, out_of_time=out_of_time, sigterm=sigterm.received)
            if check.skip:
                # No update, no EMA, no LR step, no step counted; the batch is dropped (not recorded as
                # trained on).  Under fp16 the loss scale backs off, as it does for an overflow.
                optimizer.zero_grad(set_to_none=True)
                grad_scaler.update()
                consecutive_skips += 1
                report.skipped(progress, check, consecutive_skips)
                if consecutive_skips >= schedule.max_consecutive_skipped_steps:
                    message = diverged_message(progress.step + 1, consecutive_skips)
                    report.finished(progress, Phase.FAILED, {}, message)
                    raise TrainingDiverged(message)
            else:
                consecutive_skips = 0
                grad_scaler.step(optimizer)
                grad_scaler.update()
                optimizer.zero_grad(set_to_none=True)
                lr_scheduler.step()
                progress.step += 1
                progress.epoch = epoch
                progress.images_seen += images_per_step
                seen += step_records
                if ema is not None and ema_updates_at(progress.step, opts.ema):
                    ema.step(unet.parameters())
                report.stepped(
                    progress, check.loss, learning_rate, step_start, images_per_step, check.grad_norm
                )
                if progress.step % spec.samples.interval_steps == 0:
                    write_samples(parts, unet, spec, progress.step, output, world, amp_dtype)

            stop = stop_reason(
                progress.step, schedule.max_steps, out_of_time=check.out_of_time, sigterm=check.sigterm
            )
            # A step is checkpointed once (after skips it may be the one saved last, or 0).
            due = stop or progress.step % spec.checkpoint.interval_steps == 0
            if due and progress.step != saved_step:
                saved_step = progress.step
                progress.train_seconds = seconds_before + time.perf_counter() - session_start
                checkpoints.save(trainable, progress, seen, world)
                seen = []
                report.checkpointed(progress)

    if stop == "terminated":
        report.finished(progress, Phase.RUNNING, {}, f"stopped by SIGTERM at step {progress.step}")
        return {**report.summary(progress), "stopped": stop}
    outputs = {
        "pipeline": export_pipeline(parts, unet, ema, output, world),
        "samples": output.url("samples"),
        "checkpoints": spec.checkpoint.uri,
    }
    if world.is_main:
        from commoncanvas.train.modelcard import MODEL_CARD, write_model_card

        card = write_datacard(
            output,
            checkpoints.seen_records(progress),
            [stream for stream, _ in planned],
            run=name,
            step=progress.step,
            images_seen=progress.images_seen,
        )
        # The pipeline folder's README.md: the model card the Hub renders, from the data card.
        write_model_card(open_storage(outputs["pipeline"]), card)
        outputs |= {
            "datacard": output.url(CARD_JSON),
            "attribution": output.url(MANIFEST),
            "modelCard": f"{outputs['pipeline']}/{MODEL_CARD}",
        }
    report.finished(progress, Phase.SUCCEEDED, outputs, f"trained {progress.step} steps ({stop})")
    return {**report.summary(progress), "stopped": stop, "outputs": outputs}


# --- the pieces the loop calls -----------------------------------------------------------------------


def stop_reason(step: int, max_steps: int, *, out_of_time: bool, sigterm: bool) -> str:
    """Why the loop ends after this step ('' = it goes on); the flags are OR-ed over all ranks."""
    if step >= max_steps:
        return "max-steps"
    if out_of_time:
        return "max-duration"
    return "terminated" if sigterm else ""


class TrainingDiverged(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient: the run fails (its weights,
    never updated from those steps, are still finite)."""


def diverged_message(step: int, skips: int) -> str:
    return (
        f"step {step}: the loss or gradients were NaN or infinite for {skips} optimizer steps in a row "
        f"(schedule.maxConsecutiveSkippedSteps = {skips}); lower schedule.learningRate, set "
        "schedule.gradientClipNorm, or resume from an earlier checkpoint"
    )


def clip_gradients(
    unet: nn.Module,
    optimizer: torch.optim.Optimizer,
    grad_scaler: torch.amp.GradScaler,
    max_norm: float | None,
) -> torch.Tensor:
    """The global L2 norm of the unscaled gradients (before clipping), clipping them to `max_norm` if set.

    Unscales first (fp16's GradScaler; a no-op otherwise), so the norm and the clip are in the gradients'
    true units and `grad_scaler.step` does not unscale again.  The gradients are the accumulated,
    all-reduced ones (DDP), or FSDP2's sharded DTensors: the norm is then reduced over the shards, so it is
    the whole model's on every rank.  (A non-finite norm makes the clipped gradients non-finite too: the
    step is skipped and they are zeroed.)"""
    grad_scaler.unscale_(optimizer)
    params = [p for p in unet.parameters() if p.grad is not None]
    grads = [p.grad for p in params if p.grad is not None]  # (the same list, typed for mypy)
    if not grads:
        return torch.zeros((), device=next(unet.parameters()).device)
    norm = torch.nn.utils.get_total_norm(grads)
    if max_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    full_tensor = getattr(norm, "full_tensor", None)  # a DTensor under FSDP2
    return full_tensor() if callable(full_tensor) else norm


@dataclass(frozen=True)
class StepCheck:
    """One step's numbers, agreed by every rank (one all-reduce)."""

    loss: float  # mean over ranks (NaN if any rank's was)
    grad_norm: float  # the unscaled gradients' global norm, before clipping
    skip: bool  # a rank saw a non-finite loss or gradient: no rank updates
    out_of_time: bool
    sigterm: bool


def check_step(
    world: World, step_loss: torch.Tensor, grad_norm: torch.Tensor, *, out_of_time: bool, sigterm: bool
) -> StepCheck:
    loss, norm = step_loss.detach().float().reshape(()), grad_norm.detach().float().reshape(())
    not_finite = ~(torch.isfinite(loss) & torch.isfinite(norm))
    flags = torch.stack(
        [
            loss,
            norm.to(loss.device),
            not_finite.float().to(loss.device),
            torch.tensor(float(out_of_time), device=loss.device),
            torch.tensor(float(sigterm), device=loss.device),
        ]
    ).to(world.device)
    totals = sum_over_ranks(world, flags).tolist()
    return StepCheck(
        loss=totals[0] / world.size,
        grad_norm=totals[1] / world.size,
        skip=totals[2] > 0,
        out_of_time=totals[3] > 0,
        sigterm=totals[4] > 0,
    )


def seed_rank(seed: int, rank: int) -> None:
    """Different noise and timesteps on every rank, reproducible per (seed, rank)."""
    rank_seed = seed * 1_000_003 + rank
    random.seed(rank_seed)
    np.random.seed(rank_seed % 2**32)
    torch.manual_seed(rank_seed)


def plan_training_streams(
    spec: TrainRunSpec, resolve_ref: Callable[[str], str] | None
) -> list[tuple[DatasetStream, float | None]]:
    """The captioned dataset's streams, or the LATENTS phase's when the encoders are skipped."""
    if spec.optimizations.precompute_latents:
        return plan_streams([latents_uri(spec)], spec, "the LATENTS phase")
    ref = spec.dataset.caption_job_ref
    origin = f"CaptionJob {ref!r}" if ref else "dataset.uris"
    return plan_streams(dataset_roots(spec, resolve_ref), spec, origin)


def stage_data(
    name: str,
    spec: TrainRunSpec,
    planned: list[tuple[DatasetStream, float | None]],
    parts: ModelParts,
    world: World,
    stage: int,
) -> tuple[Any, StreamingDataLoader]:
    """The training set and its loader for resolution stage `stage` (0-based)."""
    resolution = spec.stages[stage].resolution
    # A cache directory per stage: streaming refuses a local directory another live dataset still holds.
    cache = data_cache_dir(name, world) / f"stage-{stage}"
    dataset = training_dataset(spec, planned, parts, world, resolution, cache)
    return dataset, make_loader(dataset, spec.schedule.micro_batch_size, spec.dataset.loader_workers)


def next_stage_data(
    loader: StreamingDataLoader,
    batches: Iterator[Any],
    name: str,
    spec: TrainRunSpec,
    planned: list[tuple[DatasetStream, float | None]],
    parts: ModelParts,
    world: World,
    stage: int,
) -> tuple[Any, StreamingDataLoader]:
    """Stage `stage`'s data, continuing the epoch where the previous stage's loader stopped: the stages
    see one shuffled sequence of samples, not a fresh epoch from its start at every boundary."""
    position = loader.state_dict()
    assert position is not None  # (None only for a dataset that is no StreamingDataset)
    batches_close = getattr(batches, "close", None)
    if callable(batches_close):
        batches_close()  # ends the old loader's pass (and its worker processes)
    dataset, next_loader = stage_data(name, spec, planned, parts, world, stage)
    next_loader.load_state_dict(position)
    return dataset, next_loader


def training_dataset(
    spec: TrainRunSpec,
    planned: list[tuple[DatasetStream, float | None]],
    parts: ModelParts,
    world: World,
    resolution: int,
    cache_dir: Path,
) -> Any:
    """Captioned images at `resolution` (encoded every step), or precomputed latents (encoders skipped)."""
    common: dict[str, Any] = {
        "streams": make_streams(planned, cache_dir),
        "micro_batch": spec.schedule.micro_batch_size,
        "seed": spec.schedule.seed,
        "caption_dropout": spec.dataset.caption_dropout,
    }
    with streaming_nodes_are_hosts(world):
        if spec.optimizations.precompute_latents:
            column = latents_column(spec, resolution)
            return PrecomputedLatents(**common, empty_text_hidden=null_text_hidden(spec), column=column)
        return CaptionedImages(**common, resolution=resolution, tokenizer=parts.tokenizer)


@torch.no_grad()
def encode(
    parts: ModelParts, batch: dict[str, Any], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, text states) in fp32, from the batch's pixels and token ids or its precomputed latents.
    The encoders run in fp32 even when called under autocast, as the LATENTS phase runs them: bf16
    would shift the latents by about 2% and on-the-fly training would see other x0 than precomputed."""
    if "latents" in batch:
        return batch["latents"].to(device, torch.float32), batch["text_hidden"].to(device, torch.float32)
    # The LATENTS phase's encoding (scaled latent means), so both paths train on the same latents; the
    # captions were tokenized in the loader's workers with encode_captions' arguments.
    with torch.autocast(device.type, enabled=False):
        latents = encode_images(parts.vae, batch["pixels"].to(device, non_blocking=True))
        text_hidden = parts.text_encoder(batch["input_ids"].to(device, non_blocking=True), return_dict=False)[
            0
        ]
    # Noise is added in fp32: in bf16 the small noise levels of early timesteps would round away.
    return latents.float(), text_hidden.float()


def prediction_loss(
    unet_forward: Callable[..., Any],
    parts: ModelParts,
    latents: torch.Tensor,
    text_hidden: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """Noise the latents to `timesteps`, predict, and take the MSE to the target of the prediction type:
    the noise itself (epsilon, SD2-base) or the velocity (v-prediction, SD2 768)."""
    scheduler = parts.noise_scheduler
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    prediction = unet_forward(noisy, timesteps, encoder_hidden_states=text_hidden, return_dict=False)[0]
    return F.mse_loss(prediction.float(), target.float())


class StopOnSigterm:
    """SIGTERM (a preemption, a pod eviction) ends the run at the end of the current step, after a
    checkpoint, instead of losing the steps since the last one."""

    def __init__(self) -> None:
        self.received = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        log.warning("SIGTERM: stopping after this step's checkpoint")
        self.received = True

    def __enter__(self) -> StopOnSigterm:
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

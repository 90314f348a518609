"""A training run's progress as its users see it: rank 0's log lines, Prometheus metrics and
`status.json` (which the operator copies into the TrainRun's status), and the model FLOPs utilisation
they report."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from commoncanvas import metrics
from commoncanvas.specs.common import Condition, Phase
from commoncanvas.specs.train import TrainRunSpec, TrainRunStatus
from commoncanvas.storage import Storage
from commoncanvas.train.checkpoint import Progress
from commoncanvas.train.model import ModelParts
from commoncanvas.train.world import World

if TYPE_CHECKING:
    from commoncanvas.train.loop import StepCheck

log = logging.getLogger(__name__)
STATUS = "status.json"
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}  # dense bf16/fp16 per GPU


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Reporter:
    """Rank 0 logs, exports metrics and writes `status.json` (for the operator); other ranks are quiet."""

    name: str
    spec: TrainRunSpec
    world: World
    output: Storage
    status: TrainRunStatus = field(default_factory=TrainRunStatus)
    last_written: float = 0.0
    last_logged: float = 0.0
    loss: float = 0.0
    flops_per_image: float = 0.0

    def started(self, progress: Progress, accumulation: int, stage: int) -> None:
        metrics.TRAIN_RESTARTS.set(self.world.restarts)
        self._set_stage(stage)
        self.status.start_time = _now()
        self.status.restarts = self.world.restarts
        self.status.last_checkpoint = progress.last_checkpoint
        how = f"resumed at step {progress.step}" if progress.step else "starting"
        if self.world.is_main:
            log.info(
                "%s: %s of %d; %d processes x micro-batch %d x %d accumulation = %d images per step",
                self.name,
                how,
                self.spec.schedule.max_steps,
                self.world.size,
                self.spec.schedule.micro_batch_size,
                accumulation,
                self.spec.schedule.global_batch_size,
            )
        self._write(progress, Phase.RUNNING, how)

    def stage_started(self, progress: Progress, stage: int) -> None:
        self._set_stage(stage)
        if self.world.is_main:
            log.info(
                "%s: stage %d of %d at %d px from step %d",
                self.name,
                self.status.stage,
                len(self.spec.stages),
                self.status.resolution,
                progress.step,
            )
        self._write(progress, Phase.RUNNING, f"stage {stage + 1} at {self.status.resolution} px")

    def _set_stage(self, stage: int) -> None:
        """status.stage (1-based) and status.resolution; the gauge has the resolution as its label."""
        self.status.stage, self.status.resolution = stage + 1, self.spec.stages[stage].resolution
        if self.world.is_main:
            metrics.TRAIN_STAGE.clear()  # one series: the stage now
            metrics.TRAIN_STAGE.labels(str(self.status.resolution)).set(self.status.stage)

    def stepped(
        self,
        progress: Progress,
        loss: float,
        lr: float,
        step_start: float,
        images_per_step: int,
        grad_norm: float = 0.0,
    ) -> None:
        seconds = time.perf_counter() - step_start
        images_per_second = images_per_step / seconds if seconds else 0.0
        self.loss = loss
        self.status.images_per_second = round(images_per_second, 3)
        if torch.cuda.is_available():
            metrics.GPU_MEMORY_BYTES.labels("train").set(torch.cuda.max_memory_allocated(self.world.device))
        if not self.world.is_main:
            return
        metrics.TRAIN_STEP.set(progress.step)
        metrics.TRAIN_IMAGES_SEEN.set(progress.images_seen)
        metrics.TRAIN_LOSS.set(loss)
        metrics.TRAIN_LEARNING_RATE.set(lr)
        metrics.TRAIN_STEP_SECONDS.observe(seconds)
        metrics.IMAGES_PER_SECOND.labels("train").set(images_per_second)
        if self.flops_per_image:
            # Model FLOPs actually done per second over what the devices could do at peak.
            mfu = self.flops_per_image * images_per_second / (peak_flops(self.world.device) * self.world.size)
            metrics.TRAIN_MFU.set(mfu)
        now = time.monotonic()
        if progress.step == 1 or now - self.last_logged >= 10:
            self.last_logged = now
            log.info(
                "step %d/%d  loss %.4f  grad norm %.3g  lr %.3g  %.1f images/s  %.2fs/step",
                progress.step,
                self.spec.schedule.max_steps,
                loss,
                grad_norm,
                lr,
                images_per_second,
                seconds,
            )
        if now - self.last_written >= 30:
            self._write(progress, Phase.RUNNING, "")

    def skipped(self, progress: Progress, check: StepCheck, consecutive: int) -> None:
        """A step whose update was skipped (every rank skips it); counted, logged, in status.json."""
        self.status.skipped_steps += 1
        if not self.world.is_main:
            return
        metrics.TRAIN_SKIPPED_STEPS.inc()
        log.warning(
            "step %d: skipped the optimizer step, loss %s, gradient norm %s (%d in a row, %d skipped; "
            "the run fails at schedule.maxConsecutiveSkippedSteps = %d)",
            progress.step + 1,
            check.loss,
            check.grad_norm,
            consecutive,
            self.status.skipped_steps,
            self.spec.schedule.max_consecutive_skipped_steps,
        )
        self._write(progress, Phase.RUNNING, "")

    def checkpointed(self, progress: Progress) -> None:
        self.status.last_checkpoint = progress.last_checkpoint
        self._write(progress, Phase.RUNNING, f"checkpoint at step {progress.step}")

    def finished(self, progress: Progress, phase: Phase, outputs: dict[str, str], message: str) -> None:
        self.status.outputs = outputs
        if phase == Phase.SUCCEEDED:
            self.status.completion_time = _now()
        if self.world.is_main:
            log.info("%s: %s", self.name, message)
        self._write(progress, phase, message)

    def summary(self, progress: Progress) -> dict[str, Any]:
        return {
            "step": progress.step,
            "imagesSeen": progress.images_seen,
            "loss": self.loss,
            "checkpoint": progress.last_checkpoint,
        }

    def _write(self, progress: Progress, phase: Phase, message: str) -> None:
        if not self.world.is_main:
            return
        self.status.phase = phase
        self.status.step = progress.step
        self.status.images_seen = progress.images_seen
        self.status.loss = round(self.loss, 6)
        self.status.progress = f"{progress.step}/{self.spec.schedule.max_steps}"
        if message:
            self.status.conditions = [
                Condition(
                    type="Progressing",
                    status="True",
                    reason=phase.value,
                    message=message,
                    last_transition_time=_now(),
                )
            ]
        self.output.write_text(STATUS, self.status.model_dump_json(by_alias=True, indent=1))
        self.last_written = time.monotonic()


def peak_flops(device: torch.device) -> float:
    """Peak FLOP/s of one device for MFU: $COMMONCANVAS_PEAK_FLOPS, else known GPUs; 0 = unknown."""
    if os.environ.get("COMMONCANVAS_PEAK_FLOPS"):
        return float(os.environ["COMMONCANVAS_PEAK_FLOPS"])
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((flops for gpu, flops in PEAK_FLOPS.items() if gpu in name), 0.0)


def unet_training_flops(parts: ModelParts, unet: nn.Module, micro_batch: int, device: torch.device) -> float:
    """Model FLOPs per trained image: the UNet's forward counted once on a dummy micro-batch, times 3
    (forward + backward), plus nothing for the frozen encoders (they do not train)."""
    from torch.utils.flop_counter import FlopCounterMode

    side = parts.unet.config.sample_size
    latents = torch.zeros(micro_batch, parts.unet.config.in_channels, side, side, device=device)
    text = torch.zeros(
        micro_batch, parts.tokenizer.model_max_length, parts.text_encoder.config.hidden_size, device=device
    )
    timesteps = torch.zeros(micro_batch, dtype=torch.long, device=device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        unet(latents, timesteps, encoder_hidden_states=text, return_dict=False)
    return 3 * counter.get_total_flops() / micro_batch

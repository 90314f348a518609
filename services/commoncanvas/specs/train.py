"""TrainRun: Stable Diffusion 2 training on the captioned CC catalog, with the paper's speed-ups."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from commoncanvas.specs.caption import CAPTION_SAMPLES_PER_UNIT
from commoncanvas.specs.common import (
    DEFAULT_NODE_POOL,
    CommonStatus,
    KubeModel,
    ObjectMeta,
    PriorityClassName,
)

SplitName = Literal["commercial", "noncommercial"]
# A run without schedule.stages trains at one resolution for these many steps.
DEFAULT_RESOLUTION = 512
DEFAULT_MAX_STEPS = 100_000


class StreamMix(KubeModel):
    split: SplitName
    weight: float = Field(1.0, gt=0, description="Relative share of this split in every epoch")

    @field_validator("split", mode="before")
    @classmethod
    def _never_evaluation(cls, split: object) -> object:
        if split == "evaluation":  # the ScrapeJob's NoDerivs split (licenses.evaluationSplit)
            raise ValueError(
                "'evaluation' is the NoDerivs evaluation set: it is never trained on; name commercial or "
                "noncommercial (an EvalRun reads the evaluation set)"
            )
        return split


class TrainDataset(KubeModel):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.captionJobRef) != (has(self.uris) && size(self.uris) > 0)",
                    "message": "give exactly one of dataset.captionJobRef or dataset.uris",
                }
            ]
        }
    )

    caption_job_ref: str | None = Field(None, description="A CaptionJob whose output to train on")
    uris: list[str] = Field(default_factory=list, description="Or: captioned dataset roots holding {split}/")
    mix: list[StreamMix] = Field(
        default_factory=lambda: [StreamMix(split="commercial")],
        min_length=1,
        description="One mosaicml-streaming Stream per split, weighted (C only by default)",
    )
    caption_dropout: float = Field(0.1, ge=0, le=1, description="Share of empty captions (for guidance)")
    loader_workers: int = Field(
        4, ge=0, description="DataLoader processes per rank that decode, resize and tokenize (0 = inline)"
    )

    @model_validator(mode="after")
    def _one_source(self) -> TrainDataset:
        if bool(self.caption_job_ref) == bool(self.uris):
            raise ValueError("give exactly one of dataset.captionJobRef or dataset.uris")
        return self


class TrainModel(KubeModel):
    architecture: Literal["tiny", "sd2-base", "sd2"] = Field(
        "sd2-base", description="tiny (CPU tests), sd2-base (512 px, epsilon), sd2 (768 px, v-prediction)"
    )
    unet: str | None = Field(None, description="UNet weights (local, s3://, hub id); none = from the config")
    vae: str | None = Field(None, description="VAE weights (local, s3://, hub id); none = from the config")
    text_encoder: str | None = Field(None, description="Text encoder + tokenizer (local, s3://, hub id)")
    revision: str | None = None


class EmaSpec(KubeModel):
    enabled: bool = True
    decay: float = Field(0.9999, gt=0, lt=1)
    start_step: int = Field(0, ge=0, description="Steps before EMA starts (it starts late in the paper)")
    every: int = Field(1, ge=1, description="Update the EMA every k steps")


class Optimizations(KubeModel):
    sdpa: bool = Field(True, description="PyTorch scaled-dot-product (flash) attention in the UNet")
    precompute_latents: bool = Field(
        False, description="Run the latents phase first; train skips both encoders"
    )
    latents_samples_per_unit: int = Field(
        CAPTION_SAMPLES_PER_UNIT,
        ge=1,
        le=10_000_000,
        description="Images per unit of the latents phase (whole input shards, at least this many)",
    )
    low_precision_norms: bool = Field(True, description="GroupNorm/LayerNorm in low precision under autocast")
    fsdp: Literal["off", "full", "shard-grad-op", "hybrid"] = Field(
        "off",
        description="off = DDP (every rank holds the whole UNet); FSDP2 sharding each UNet block: full = "
        "over all ranks, re-gathered for the backward (FULL_SHARD); shard-grad-op = over all ranks, kept "
        "gathered from forward to backward (SHARD_GRAD_OP: fewer all-gathers, more memory); hybrid = "
        "within a node, replicated across nodes (HYBRID_SHARD)",
    )
    ema: EmaSpec = Field(default_factory=lambda: EmaSpec())
    channels_last: bool = True
    compile: bool = Field(False, description="torch.compile the UNet")
    gradient_checkpointing: bool = False
    mixed_precision: Literal["auto", "bf16", "fp16", "no"] = Field("auto", description="auto: bf16 on GPU")


class ResolutionStage(KubeModel):
    resolution: int = Field(ge=8, le=2048, multiple_of=8, description="Image side in pixels (multiple of 8)")
    steps: int = Field(ge=1, description="Optimizer steps at this resolution")


def stage_at(stages: Sequence[ResolutionStage], step: int) -> int:
    """The 0-based index of the stage that optimizer step `step` (0-based, the next one to take) trains
    in; a step past the end is the last stage's (a run resumed after its final step)."""
    end = 0
    for index, stage in enumerate(stages):
        end += stage.steps
        if step < end:
            return index
    return len(stages) - 1


class Schedule(KubeModel):
    global_batch_size: int = Field(2048, ge=1)
    micro_batch_size: int = Field(16, ge=1, description="Per device per step; the rest is accumulation")
    learning_rate: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(10_000, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    stages: list[ResolutionStage] = Field(
        default_factory=list,
        description="Resolution stages in order (e.g. 256 px, then 512 px); the step, optimizer, LR warmup "
        "and EMA carry across them. None = one stage at spec.resolution for maxSteps",
    )
    # No CRD default (the API server would fill it in beside stages); `max_steps` is the value to use.
    requested_max_steps: int | None = Field(
        None,
        ge=1,
        alias="maxSteps",
        description=f"Optimizer steps in all (default {DEFAULT_MAX_STEPS}); with stages, their total: "
        "leave it unset or equal to it",
    )
    max_duration_seconds: int = Field(0, ge=0, description="Stop after this wall time too (0 = no limit)")
    seed: int = 17
    gradient_clip_norm: float | None = Field(
        None,
        gt=0,
        description="Clip the gradients' global L2 norm to this before each optimizer step (none = off)",
    )
    max_consecutive_skipped_steps: int = Field(
        20,
        ge=1,
        le=100_000,
        description="Fail the run after this many optimizer steps in a row skipped for a non-finite "
        "loss or gradient",
    )

    @model_validator(mode="after")
    def _steps_agree(self) -> Schedule:
        total = sum(stage.steps for stage in self.stages)
        if self.stages and self.requested_max_steps not in (None, total):
            raise ValueError(
                f"schedule.maxSteps {self.requested_max_steps} differs from the total of schedule.stages' "
                f"steps {total}: leave schedule.maxSteps unset or make it {total}"
            )
        return self

    @property
    def max_steps(self) -> int:
        """Optimizer steps in all: the stages' total, else maxSteps."""
        if self.stages:
            return sum(stage.steps for stage in self.stages)
        return self.requested_max_steps or DEFAULT_MAX_STEPS

    @max_steps.setter
    def max_steps(self, steps: int) -> None:
        if self.stages:
            raise ValueError("with schedule.stages, max steps are their total: change the stages' steps")
        self.requested_max_steps = steps


class Distributed(KubeModel):
    min_nodes: int = Field(1, ge=1)
    max_nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(8, ge=0, description="Processes per node (0 = one CPU process)")
    max_restarts: int = Field(3, ge=0, description="torchrun restarts of the whole group")
    node_pool: str = DEFAULT_NODE_POOL

    @model_validator(mode="after")
    def _ordered(self) -> Distributed:
        if self.max_nodes < self.min_nodes:
            raise ValueError("distributed.maxNodes must be at least distributed.minNodes")
        return self

    @property
    def latents_workers(self) -> int:
        """Workers of the latents phase: one per GPU the run may use (one per node on CPUs)."""
        return self.max_nodes * max(self.gpus_per_node, 1)


class CheckpointSpec(KubeModel):
    uri: str = Field(min_length=1, description="Checkpoints (local or s3://); a start with one here resumes")
    interval_steps: int = Field(1000, ge=1)
    keep: int = Field(3, ge=1, description="Checkpoints kept (the newest N)")
    # SD2's UNet with EMA and AdamW state is ~14 GB: ~140 s for one rank at 100 MB/s to the store.
    termination_grace_period_seconds: int = Field(
        300,
        ge=30,
        le=3600,
        description="Seconds a train pod has after SIGTERM (Kueue preemption, suspend, eviction) to end "
        "its step and write the checkpoint before it is killed; the pods' terminationGracePeriodSeconds",
    )


class SampleSpec(KubeModel):
    prompts: list[str] = Field(default_factory=lambda: ["a photo of a cat on a sofa"])
    interval_steps: int = Field(1000, ge=1)
    inference_steps: int = Field(25, ge=1)
    guidance_scale: float = Field(7.5, ge=1)


class TrainOutput(KubeModel):
    uri: str = Field(min_length=1, description="Final diffusers pipeline, data card, samples, latents")


class TrainRunSpec(KubeModel):
    dataset: TrainDataset
    output: TrainOutput
    checkpoint: CheckpointSpec
    # No CRD default (the API server would fill it in beside schedule.stages); `resolution` is the value.
    requested_resolution: int | None = Field(
        None,
        ge=8,
        le=2048,
        multiple_of=8,
        alias="resolution",
        description=f"Train at this resolution (default {DEFAULT_RESOLUTION}); or give schedule.stages",
    )
    model: TrainModel = Field(default_factory=lambda: TrainModel())
    optimizations: Optimizations = Field(default_factory=lambda: Optimizations())
    schedule: Schedule = Field(default_factory=lambda: Schedule())
    distributed: Distributed = Field(default_factory=lambda: Distributed())
    samples: SampleSpec = Field(default_factory=lambda: SampleSpec())
    suspend: bool = Field(False, description="Pause (on a cluster); resumes from the newest checkpoint")
    priority_class_name: PriorityClassName = None

    @model_validator(mode="after")
    def _one_resolution_source(self) -> TrainRunSpec:
        if self.requested_resolution is not None and self.schedule.stages:
            raise ValueError(
                "give spec.resolution or spec.schedule.stages, not both: a run with stages trains at each "
                "stage's resolution; remove spec.resolution"
            )
        return self

    @property
    def stages(self) -> list[ResolutionStage]:
        """The resolution stages in order: schedule.stages, or one at spec.resolution for maxSteps."""
        if self.schedule.stages:
            return list(self.schedule.stages)
        return [ResolutionStage(resolution=self.resolution, steps=self.schedule.max_steps)]

    @property
    def resolution(self) -> int:
        """The final resolution: the model's sample size and the exported pipeline's default."""
        if self.schedule.stages:
            return self.schedule.stages[-1].resolution
        return self.requested_resolution or DEFAULT_RESOLUTION


class TrainRunStatus(CommonStatus):
    step: int = 0
    stage: int = Field(0, ge=0, description="The resolution stage training is in, 1-based (0 = not started)")
    resolution: int = Field(0, ge=0, description="That stage's resolution in pixels")
    images_seen: int = 0
    last_checkpoint: str = ""
    restarts: int = 0
    images_per_second: float = 0
    loss: float = 0
    skipped_steps: int = Field(
        0, description="Optimizer steps skipped for a non-finite loss or gradient since the process started"
    )
    outputs: dict[str, str] = Field(default_factory=dict)


class TrainRun(KubeModel):
    """A TrainRun custom resource."""

    api_version: Literal["commoncanvas.dev/v1alpha1"] = "commoncanvas.dev/v1alpha1"
    kind: Literal["TrainRun"] = "TrainRun"
    metadata: ObjectMeta
    spec: TrainRunSpec
    status: TrainRunStatus | None = None

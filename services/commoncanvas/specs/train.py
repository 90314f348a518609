"""TrainRun: Stable Diffusion 2 training on the captioned CC catalog, with the paper's speed-ups."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from commoncanvas.specs.caption import CAPTION_SAMPLES_PER_UNIT
from commoncanvas.specs.common import (
    DEFAULT_NODE_POOL,
    CommonStatus,
    KubeModel,
    ObjectMeta,
    PriorityClassName,
)

SplitName = Literal["commercial", "noncommercial"]


class StreamMix(KubeModel):
    split: SplitName
    weight: float = Field(1.0, gt=0, description="Relative share of this split in every epoch")


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
    fsdp: Literal["off", "full", "hybrid"] = Field("off", description="off = DDP")
    ema: EmaSpec = Field(default_factory=lambda: EmaSpec())
    channels_last: bool = True
    compile: bool = Field(False, description="torch.compile the UNet")
    gradient_checkpointing: bool = False
    mixed_precision: Literal["auto", "bf16", "fp16", "no"] = Field("auto", description="auto: bf16 on GPU")


class Schedule(KubeModel):
    global_batch_size: int = Field(2048, ge=1)
    micro_batch_size: int = Field(16, ge=1, description="Per device per step; the rest is accumulation")
    learning_rate: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(10_000, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    max_steps: int = Field(100_000, ge=1)
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
    resolution: int = Field(512, ge=8, le=2048, multiple_of=8)
    model: TrainModel = Field(default_factory=lambda: TrainModel())
    optimizations: Optimizations = Field(default_factory=lambda: Optimizations())
    schedule: Schedule = Field(default_factory=lambda: Schedule())
    distributed: Distributed = Field(default_factory=lambda: Distributed())
    samples: SampleSpec = Field(default_factory=lambda: SampleSpec())
    suspend: bool = Field(False, description="Pause (on a cluster); resumes from the newest checkpoint")
    priority_class_name: PriorityClassName = None


class TrainRunStatus(CommonStatus):
    step: int = 0
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

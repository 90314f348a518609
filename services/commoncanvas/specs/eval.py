"""EvalRun: FID, KID, CLIP-FID and CLIP score of a text-to-image pipeline, its generation sharded on GPUs."""

from __future__ import annotations

from typing import Literal, cast

from pydantic import ConfigDict, Field, field_validator, model_validator

from commoncanvas.specs.common import (
    CommonStatus,
    GpuWorkerPods,
    KubeModel,
    ObjectMeta,
)

MetricName = Literal["fid", "kid", "clipFid", "clipScore"]
ALL_METRICS: tuple[MetricName, ...] = ("fid", "kid", "clipFid", "clipScore")
# Where a TrainRun's output holds its exported diffusers pipeline (train.export.export_pipeline writes it;
# the local end-to-end test evaluates one through this path).
TRAIN_PIPELINE_DIR = "pipeline"
# 30k prompts x 4 guidance scales / 256 = ~470 units of a few minutes each on one GPU (README, EvalRun).
EVAL_PROMPTS_PER_UNIT = 256


def _exactly_one(first: str, second: str) -> ConfigDict:
    """The API server's copy of the `_one_of` validators below (CEL on the CRD)."""
    camel = [name.split(".")[-1] for name in (first, second)]
    return ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": f"has(self.{camel[0]}) != has(self.{camel[1]})",
                    "message": f"give exactly one of {first} or {second}",
                }
            ]
        }
    )


class EvalModel(KubeModel):
    model_config = _exactly_one("model.trainRunRef", "model.pipelineUri")

    train_run_ref: str | None = Field(
        None,
        min_length=1,
        description="Name of a TrainRun in the same namespace whose exported pipeline to evaluate",
    )
    pipeline_uri: str | None = Field(
        None, min_length=1, description="A diffusers StableDiffusionPipeline folder: local path or s3://"
    )

    @model_validator(mode="after")
    def _one_source(self) -> EvalModel:
        if bool(self.train_run_ref) == bool(self.pipeline_uri):
            raise ValueError("give exactly one of model.trainRunRef or model.pipelineUri")
        return self


class EvalPrompts(KubeModel):
    model_config = _exactly_one("prompts.uri", "prompts.captionJobRef")

    uri: str | None = Field(
        None,
        min_length=1,
        description="Captions file (local or s3://): JSONL with a `caption` field per line, or TSV with a "
        "header naming a `caption` column",
    )
    caption_job_ref: str | None = Field(
        None,
        min_length=1,
        description="Name of a CaptionJob whose evaluation split's captions (the NoDerivs photos) to use",
    )
    format: Literal["auto", "jsonl", "tsv"] = Field(
        "auto", description="auto: by the file's extension (.tsv is TSV, anything else JSONL)"
    )
    limit: int = Field(30_000, ge=2, le=1_000_000, description="At most this many prompts, sampled")
    seed: int = Field(0, ge=0, description="Seed of the sample of prompts (when the file has more)")

    @model_validator(mode="after")
    def _one_source(self) -> EvalPrompts:
        if bool(self.uri) == bool(self.caption_job_ref):
            raise ValueError("give exactly one of prompts.uri or prompts.captionJobRef")
        return self


class EvalReferences(KubeModel):
    uri: str = Field(
        min_length=1,
        description="Real images: an MDS dataset (a ScrapeJob or CaptionJob split, {uri}/index.json) or a "
        "folder of image files, local or s3://",
    )
    limit: int = Field(
        30_000, ge=2, le=1_000_000, description="At most this many reference images (the first)"
    )


class EvalExtractors(KubeModel):
    inception: str = Field(
        min_length=1,
        description="clean-fid's InceptionV3 TorchScript file (inception-2015-12-05.pt): local path or s3://",
    )
    clip: str = Field(
        "openai/clip-vit-base-patch32",
        min_length=1,
        description="A transformers CLIPModel: hub id, local folder or s3:// prefix (CLIP score, CLIP-FID)",
    )


class EvalOutput(KubeModel):
    uri: str = Field(min_length=1, description="Generated images, features and results: local path or s3://")


class EvalRunSpec(GpuWorkerPods):
    model: EvalModel
    prompts: EvalPrompts
    references: EvalReferences
    extractors: EvalExtractors
    output: EvalOutput
    metrics: list[MetricName] = Field(
        default_factory=lambda: cast(list[MetricName], list(ALL_METRICS)), min_length=1
    )
    resolution: int = Field(
        512,
        ge=32,
        le=2048,
        multiple_of=8,
        description="Side of the generated images; reference images are center-cropped and resized to it "
        "(clean-fid's bicubic resizer) before the extractors see either",
    )
    guidance_scales: list[float] = Field(
        default_factory=lambda: [1.5, 3.0, 5.0, 7.5],
        min_length=1,
        max_length=32,
        description="Classifier-free guidance scales: one row of results each",
    )
    seeds: list[int] = Field(
        default_factory=lambda: [0], min_length=1, max_length=16, description="One image per prompt per seed"
    )
    inference_steps: int = Field(50, ge=1, le=1000)
    batch_size: int = Field(8, ge=1, le=1024, description="Images per pipeline call")
    samples_per_unit: int = Field(
        EVAL_PROMPTS_PER_UNIT,
        ge=1,
        le=1_000_000,
        description="Prompts (or reference images) per work unit: the unit of resume",
    )

    @field_validator("guidance_scales")
    @classmethod
    def _scales(cls, scales: list[float]) -> list[float]:
        if any(not 0 <= scale <= 50 for scale in scales):
            raise ValueError("each guidance scale is between 0 and 50 (1 = no guidance)")
        if len(set(scales)) != len(scales):
            raise ValueError("guidance scales repeat; give each once")
        return scales

    @field_validator("seeds", "metrics")
    @classmethod
    def _no_repeats(cls, values: list[object]) -> list[object]:
        if len(set(values)) != len(values):
            raise ValueError("values repeat; give each once")
        return values


class EvalResult(KubeModel):
    """One guidance scale's numbers (a metric not asked for is absent)."""

    guidance_scale: float
    fid: float | None = None
    kid: float | None = None
    clip_fid: float | None = None
    clip_score: float | None = None


class EvalRunStatus(CommonStatus):
    results: list[EvalResult] = Field(default_factory=list)
    prompts: int = Field(0, description="Prompts generated from (per guidance scale and seed)")
    references: int = Field(0, description="Reference images the features were computed from")
    outputs: dict[str, str] = Field(default_factory=dict, description="results (JSON) and plot (PNG) URIs")


class EvalRun(KubeModel):
    """An EvalRun custom resource."""

    api_version: Literal["commoncanvas.dev/v1alpha1"] = "commoncanvas.dev/v1alpha1"
    kind: Literal["EvalRun"] = "EvalRun"
    metadata: ObjectMeta
    spec: EvalRunSpec
    status: EvalRunStatus | None = None

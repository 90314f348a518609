"""CaptionJob: BLIP-2 synthetic captions for every image of a ScrapeJob's catalog, sharded on GPUs."""

from __future__ import annotations

from typing import Literal, cast

from pydantic import ConfigDict, Field, model_validator

from commoncanvas.specs.common import (
    CommonStatus,
    GpuWorkerPods,
    KubeModel,
    ObjectMeta,
)

# "evaluation" (a ScrapeJob with licenses.evaluationSplit): captions and attribution only, no images.
SplitName = Literal["commercial", "noncommercial", "evaluation"]
# 70M images / 8,192 = ~8.5k units: a few minutes each at the ~100 images/s a BLIP-2 GPU worker aims
# for (README, "Workers and units").
CAPTION_SAMPLES_PER_UNIT = 8192
# The ND evaluation split's captions and attribution (no image bytes), under a CaptionJob's output.
EVALUATION_CAPTIONS_FILE = "evaluation/captions.jsonl"


class CaptionInput(KubeModel):
    # The API server enforces what the model validator below enforces locally.
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.scrapeJobRef) != (has(self.uris) && size(self.uris) > 0)",
                    "message": "give exactly one of input.scrapeJobRef or input.uris",
                }
            ]
        }
    )

    scrape_job_ref: str | None = Field(
        None, description="Name of a ScrapeJob in the same namespace whose catalog to caption"
    )
    uris: list[str] = Field(
        default_factory=list, description="Catalog roots (local or s3://) holding {split}/index.json"
    )
    splits: list[SplitName] = Field(
        default_factory=lambda: cast(list[SplitName], ["commercial", "noncommercial"]),
        min_length=1,
        description="Splits to caption; 'evaluation' (the NoDerivs split) is written as "
        f"{EVALUATION_CAPTIONS_FILE} (captions and attribution, no image bytes), never as a training split",
    )

    @model_validator(mode="after")
    def _one_source(self) -> CaptionInput:
        if bool(self.scrape_job_ref) == bool(self.uris):
            raise ValueError("give exactly one of input.scrapeJobRef or input.uris")
        return self


class CaptionModel(KubeModel):
    source: str = Field(
        "Salesforce/blip2-opt-2.7b",
        min_length=1,
        description="Local directory, s3:// prefix, or hub id of a Blip2ForConditionalGeneration",
    )
    revision: str | None = Field(None, description="Hub revision (ignored for local and s3 sources)")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto: bfloat16 on GPU, float32 on CPU"
    )


class Decoding(KubeModel):
    num_beams: int = Field(1, ge=1, le=16, description="1 = greedy")
    max_new_tokens: int = Field(30, ge=1, le=512)
    min_new_tokens: int = Field(0, ge=0, le=512)
    repetition_penalty: float = Field(1.0, ge=1.0, le=10.0)
    no_repeat_ngram_size: int = Field(0, ge=0, le=16, description="0 = off")


class CaptionOutput(KubeModel):
    uri: str = Field(min_length=1, description="Output root: a local path or s3://bucket/prefix")


class CaptionJobSpec(GpuWorkerPods):
    input: CaptionInput
    output: CaptionOutput
    model: CaptionModel = Field(default_factory=lambda: CaptionModel())
    prompt: str = Field("", description="Text prompt before the caption; removed from the output caption")
    decoding: Decoding = Field(default_factory=lambda: Decoding())
    image_size: int = Field(512, ge=16, le=2048, description="Captioner input: center crop resized to this")
    batch_size: int = Field(32, ge=1, le=4096, description="Images per generate() call (halved on OOM)")
    loader_workers: int = Field(4, ge=0, le=64, description="DataLoader processes decoding images")
    samples_per_unit: int = Field(
        CAPTION_SAMPLES_PER_UNIT,
        ge=1,
        le=10_000_000,
        description="Images per work unit (whole input shards, at least this many): the unit of resume",
    )


class CaptionJobStatus(CommonStatus):
    captions: dict[str, int] = Field(default_factory=dict, description="Captioned samples per split")
    excluded: dict[str, int] = Field(default_factory=dict, description="Samples dropped, by reason")
    images_per_second: float = 0
    outputs: dict[str, str] = Field(default_factory=dict, description="Split -> dataset URI")


class CaptionJob(KubeModel):
    """A CaptionJob custom resource."""

    api_version: Literal["commoncanvas.dev/v1alpha1"] = "commoncanvas.dev/v1alpha1"
    kind: Literal["CaptionJob"] = "CaptionJob"
    metadata: ObjectMeta
    spec: CaptionJobSpec
    status: CaptionJobStatus | None = None

"""ScrapeJob: YFCC100M metadata -> licensed, attributed image shards split into C and NC."""

from __future__ import annotations

from typing import Literal, cast, get_args

from pydantic import Field

from commoncanvas.licenses import DEFAULT_ALLOWED
from commoncanvas.specs.common import CommonStatus, KubeModel, ObjectMeta

# Only licenses that allow derivatives can be named: a NoDerivs or ARR code is rejected by the schema.
AllowedLicense = Literal[
    "cc-by",
    "cc-by-sa",
    "cc-by-nc",
    "cc-by-nc-sa",
    "no-known-copyright",
    "us-government-work",
    "cc0",
    "public-domain-mark",
]
assert set(get_args(AllowedLicense)) == set(DEFAULT_ALLOWED), "licenses.py and the ScrapeJob schema disagree"

FLICKR_ORIGINAL = "https://farm{farm}.staticflickr.com/{server}/{id}_{secret_original}_o.{ext}"
FLICKR_LARGE = "https://farm{farm}.staticflickr.com/{server}/{id}_{secret}_b.jpg"


class MetadataSource(KubeModel):
    uri: str = Field(
        min_length=1,
        description="YFCC100M metadata: TSV (plain, .bz2, .gz) or the SQLite "
        "release; a local path or s3://bucket/key",
    )


class LicensePolicySpec(KubeModel):
    allow: list[AllowedLicense] = Field(
        default_factory=lambda: cast(list[AllowedLicense], list(DEFAULT_ALLOWED)),
        min_length=1,
        description="License codes to keep; commercial-use licenses form the C split, the rest NC",
    )


class Filters(KubeModel):
    min_side: int = Field(256, ge=1, description="Drop images whose shorter side is below this (pixels)")
    max_pixels: int = Field(178_956_970, ge=1, description="Decompression-bomb guard: refuse larger images")
    check: Literal["header", "decode"] = Field(
        "header",
        description="Integrity check: header (structure + end marker, fast) or decode (every pixel)",
    )


class FetchPolicy(KubeModel):
    concurrency: int = Field(64, ge=1, le=4096, description="Requests in flight per unit")
    per_host_rate: float = Field(0, ge=0, description="Requests per second per host; 0 = unlimited")
    retries: int = Field(4, ge=0, le=20, description="Retries on 429, 5xx and timeouts")
    backoff_seconds: float = Field(0.5, ge=0, description="First retry delay; doubles, with jitter")
    timeout_seconds: float = Field(30, gt=0, description="Whole-request timeout per attempt")
    max_bytes: int = Field(50 * 1024 * 1024, ge=1024, description="Larger bodies are refused")
    original_url_template: str = Field(FLICKR_ORIGINAL, description="First candidate URL (native resolution)")
    sized_url_template: str = Field(FLICKR_LARGE, description="Second candidate (the 1024 px '_b' size)")
    use_download_url: bool = Field(True, description="Third candidate: the metadata's download URL")
    user_agent: str = "commoncanvas/0.1 (+https://commoncanvas.dev)"


class ScrapeOutput(KubeModel):
    uri: str = Field(min_length=1, description="Output root: a local path or s3://bucket/prefix")


class ScrapeJobSpec(KubeModel):
    source: MetadataSource
    output: ScrapeOutput
    licenses: LicensePolicySpec = Field(default_factory=LicensePolicySpec)
    filters: Filters = Field(default_factory=Filters)
    fetch: FetchPolicy = Field(default_factory=FetchPolicy)
    unit_size: int = Field(1000, ge=1, le=1_000_000, description="Planned samples per work unit")
    parallelism: int = Field(4, ge=1, le=10_000, description="Units running at once")


class ScrapeJobStatus(CommonStatus):
    samples: dict[str, int] = Field(default_factory=dict, description="Samples written per split")
    licenses: dict[str, int] = Field(default_factory=dict, description="Samples written per license code")
    excluded: dict[str, int] = Field(default_factory=dict, description="Rows or samples dropped, by reason")
    images_per_second: float = 0
    outputs: dict[str, str] = Field(default_factory=dict, description="Split -> dataset URI")


class ScrapeJob(KubeModel):
    """A ScrapeJob custom resource."""

    api_version: Literal["commoncanvas.dev/v1alpha1"] = "commoncanvas.dev/v1alpha1"
    kind: Literal["ScrapeJob"] = "ScrapeJob"
    metadata: ObjectMeta
    spec: ScrapeJobSpec
    status: ScrapeJobStatus | None = None

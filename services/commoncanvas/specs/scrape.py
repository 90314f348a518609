"""ScrapeJob: YFCC100M metadata -> licensed, attributed image shards split into C and NC (and, on
request, the NoDerivs evaluation split)."""

from __future__ import annotations

from typing import Annotated, Literal, cast, get_args

from pydantic import Field, StringConstraints

from commoncanvas.licenses import DEFAULT_ALLOWED
from commoncanvas.specs.common import CommonStatus, KubeModel, ObjectMeta, PriorityClassName, StageSuspend

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
# Where Flickr serves photos (farmN.staticflickr.com, live.staticflickr.com, farmN.static.flickr.com).
FLICKR_HOSTS = ("*.staticflickr.com", "*.flickr.com")
PlaceholderFingerprint = Annotated[
    str, StringConstraints(pattern=r"^(sha256:[0-9a-f]{64}|dhash:[0-9a-f]{16})$")
]


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
    evaluation_split: bool = Field(
        False,
        description="Also keep NoDerivs photos (cc-by-nd, cc-by-nc-nd), in a separate 'evaluation' split "
        "with full attribution: for evaluation prompts and reference images, never trained on",
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
    per_host_rate: float = Field(
        0, ge=0, description="Requests per second per host and worker process (fractions work); 0 = unlimited"
    )
    retries: int = Field(
        4, ge=0, le=20, description="Retries on 429, 5xx, timeouts, resets, truncated bodies"
    )
    backoff_seconds: float = Field(0.5, ge=0, description="First retry delay; doubles, with jitter")
    max_backoff_seconds: float = Field(30, ge=0, description="Cap on one retry delay, however many retries")
    timeout_seconds: float = Field(30, gt=0, description="Whole-request timeout per attempt")
    max_seconds_per_sample: float = Field(
        120, gt=0, description="Cap on all of a sample's attempts, retry waits and Retry-After waits together"
    )
    max_bytes: int = Field(50 * 1024 * 1024, ge=1024, description="Larger bodies are refused")
    original_url_template: str = Field(FLICKR_ORIGINAL, description="First candidate URL (native resolution)")
    sized_url_template: str = Field(FLICKR_LARGE, description="Second candidate (the 1024 px '_b' size)")
    use_download_url: bool = Field(True, description="Third candidate: the metadata's download URL")
    user_agent: str = "commoncanvas/0.1 (+https://commoncanvas.dev)"
    allowed_hosts: list[str] = Field(
        default=list(FLICKR_HOSTS),
        description="Hosts a request (and every redirect hop) may go to: a name, '*.domain' (any "
        "subdomain) or '*' (any host)",
    )
    allow_private_networks: bool = Field(
        False,
        description="Fetch from loopback, private, link-local, CGNAT and multicast addresses (checked on "
        "the resolved address); cloud metadata addresses are refused regardless",
    )
    max_redirects: int = Field(5, ge=0, le=20, description="Redirect hops followed per request")
    honor_robots_tags: bool = Field(
        True, description="Exclude images served with X-Robots-Tag noai, noimageai, noindex or noimageindex"
    )
    unavailable_url_markers: list[str] = Field(
        default=["photo_unavailable"],
        description="A redirect to a URL containing one of these is Flickr's 'photo unavailable' placeholder",
    )
    placeholder_fingerprints: list[PlaceholderFingerprint] = Field(
        default=[],
        description="Images that are placeholders, not photos: 'sha256:<64 hex>' (exact bytes) or "
        "'dhash:<16 hex>' (a 64-bit difference hash, matched within 4 bits)",
    )
    max_transient_failures: float = Field(
        0.01,
        ge=0,
        le=1,
        description="Share of a unit's samples that may fail transiently (timeouts, resets, 429, 5xx, "
        "truncated bodies) before the unit fails unpublished",
    )


class ScrapeOutput(KubeModel):
    uri: str = Field(min_length=1, description="Output root: a local path or s3://bucket/prefix")


class ScrapeJobSpec(KubeModel):
    source: MetadataSource
    output: ScrapeOutput
    licenses: LicensePolicySpec = Field(default_factory=LicensePolicySpec)
    filters: Filters = Field(default_factory=Filters)
    fetch: FetchPolicy = Field(default_factory=FetchPolicy)
    # 100M rows (~70M planned) / 10,000 = ~7k units of about a minute each at ~200 images/s a worker.
    unit_size: int = Field(10_000, ge=1, le=1_000_000, description="Planned samples per work unit")
    parallelism: int = Field(4, ge=1, le=10_000, description="Worker pods (not units); changes in place")
    suspend: StageSuspend = False
    priority_class_name: PriorityClassName = None


class ScrapeJobStatus(CommonStatus):
    samples: dict[str, int] = Field(default_factory=dict, description="Samples written per split")
    licenses: dict[str, int] = Field(default_factory=dict, description="Samples written per license code")
    excluded: dict[str, int] = Field(default_factory=dict, description="Rows or samples dropped, by reason")
    transient: dict[str, int] = Field(
        default_factory=dict,
        description="Samples that failed transiently, by outcome: not dropped, a rerun fetches them",
    )
    warnings: dict[str, int] = Field(
        default_factory=dict, description="Rows kept with an unreadable informational field, by field"
    )
    images_per_second: float = 0
    outputs: dict[str, str] = Field(default_factory=dict, description="Split -> dataset URI")


class ScrapeJob(KubeModel):
    """A ScrapeJob custom resource."""

    api_version: Literal["commoncanvas.dev/v1alpha1"] = "commoncanvas.dev/v1alpha1"
    kind: Literal["ScrapeJob"] = "ScrapeJob"
    metadata: ObjectMeta
    spec: ScrapeJobSpec
    status: ScrapeJobStatus | None = None

"""The custom resources as pydantic models: one source for the local runner, the workers, the CRDs."""

from commoncanvas.specs.caption import CaptionJob, CaptionJobSpec, CaptionJobStatus
from commoncanvas.specs.common import GROUP, VERSION, Condition, ObjectMeta, Phase, load_resources
from commoncanvas.specs.scrape import ScrapeJob, ScrapeJobSpec, ScrapeJobStatus

KINDS = {"ScrapeJob": ScrapeJob, "CaptionJob": CaptionJob}

__all__ = [
    "GROUP",
    "KINDS",
    "VERSION",
    "CaptionJob",
    "CaptionJobSpec",
    "CaptionJobStatus",
    "Condition",
    "ObjectMeta",
    "Phase",
    "ScrapeJob",
    "ScrapeJobSpec",
    "ScrapeJobStatus",
    "load_resources",
]

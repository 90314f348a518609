"""The custom resources as pydantic models: one source for the local runner, the workers, the CRDs."""

from commoncanvas.specs.caption import CaptionJob, CaptionJobSpec, CaptionJobStatus
from commoncanvas.specs.common import GROUP, VERSION, Condition, ObjectMeta, Phase, load_resources
from commoncanvas.specs.eval import EvalRun, EvalRunSpec, EvalRunStatus
from commoncanvas.specs.scrape import ScrapeJob, ScrapeJobSpec, ScrapeJobStatus
from commoncanvas.specs.train import TrainRun, TrainRunSpec, TrainRunStatus

KINDS = {"ScrapeJob": ScrapeJob, "CaptionJob": CaptionJob, "TrainRun": TrainRun, "EvalRun": EvalRun}

__all__ = [
    "GROUP",
    "KINDS",
    "VERSION",
    "CaptionJob",
    "CaptionJobSpec",
    "CaptionJobStatus",
    "Condition",
    "EvalRun",
    "EvalRunSpec",
    "EvalRunStatus",
    "ObjectMeta",
    "Phase",
    "ScrapeJob",
    "ScrapeJobSpec",
    "ScrapeJobStatus",
    "TrainRun",
    "TrainRunSpec",
    "TrainRunStatus",
    "load_resources",
]

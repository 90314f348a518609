"""What the operator reads from an output root: the plan's unit count, the workers' progress, summary.json of
sharded work (a stage, a TrainRun's latents phase), and a TrainRun's status.json.

Every read is best-effort: an unreachable or empty store yields None and the Job status decides alone.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from commoncanvas import units, workqueue
from commoncanvas.storage import open_storage

log = logging.getLogger(__name__)


def _read_json(uri: str, key: str) -> Any:
    storage = open_storage(uri)
    if not storage.exists(key):
        return None
    return json.loads(storage.read_text(key))


def planned_units(kind: str, output_uri: str) -> int | None:
    """The unit count a finished plan pod left under ``{output}/{plan dir}``: a ScrapeJob's in its
    plan's summary.json, the others' (a CaptionJob's, a TrainRun's latents phase's) in units.json."""
    try:
        plan = units.StageLayout.at(output_uri).plan
        if kind == "ScrapeJob":
            summary = json.loads(plan.read_text("summary.json")) if plan.exists("summary.json") else None
            return int(summary["units"]) if summary else None
        planned = json.loads(plan.read_text("units.json")) if plan.exists("units.json") else None
        return len(planned["units"]) if planned else None
    except Exception as error:  # a store problem must not stop reconciling
        log.warning("reading the plan under %s: %s", output_uri, error)
        return None


def worker_progress(output_uri: str) -> dict[str, Any] | None:
    """The workers' progress totals (workqueue.progress_totals): W small objects, not U markers."""
    try:
        return workqueue.progress_totals(workqueue.read_progress(open_storage(output_uri)))
    except Exception as error:
        log.warning("reading worker progress under %s: %s", output_uri, error)
        return None


def read_summary(output_uri: str) -> dict[str, Any] | None:
    try:
        summary = _read_json(output_uri, "summary.json")
        return summary if isinstance(summary, dict) else None
    except Exception as error:
        log.warning("reading %s/summary.json: %s", output_uri, error)
        return None


def read_train_status(output_uri: str) -> dict[str, Any] | None:
    """What training rank 0 last wrote to ``{output}/status.json`` (step, loss, checkpoint...)."""
    try:
        status = _read_json(output_uri, "status.json")
        return status if isinstance(status, dict) else None
    except Exception as error:
        log.warning("reading %s/status.json: %s", output_uri, error)
        return None

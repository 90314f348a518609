"""Pure reducers: what the operator observed (children's status, unit markers, summary) -> CR status.

``reduce_stage`` is the whole life of a sharded stage, read top to bottom: wait for the upstream,
plan, run the units, finalize. ``next_steps`` says which children should exist now, and
``transition_events`` which Kubernetes Events a status change deserves.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

Obj = dict[str, Any]

TERMINAL = ("Succeeded", "Failed")


@dataclass(frozen=True)
class JobView:
    """The parts of a batch/v1 Job status the operator decides on."""

    complete: bool = False
    failed: bool = False
    reason: str = ""
    message: str = ""
    active: int = 0
    completed_indexes: str = ""
    failed_indexes: str = ""
    start_time: str = ""
    completion_time: str = ""

    @classmethod
    def of(cls, job: Obj | None) -> JobView | None:
        if job is None:
            return None
        status = job.get("status") or {}
        conditions = {c["type"]: c for c in status.get("conditions") or [] if c.get("status") == "True"}
        failed = conditions.get("Failed") or {}
        return cls(
            complete="Complete" in conditions,
            failed=bool(failed),
            reason=failed.get("reason", ""),
            message=failed.get("message", ""),
            active=int(status.get("active") or 0),
            completed_indexes=status.get("completedIndexes") or "",
            failed_indexes=status.get("failedIndexes") or "",
            start_time=status.get("startTime") or "",
            completion_time=status.get("completionTime") or "",
        )


@dataclass(frozen=True)
class Upstream:
    """The resource a stage reads from, as last seen (``found`` False: it does not exist)."""

    kind: str
    name: str
    found: bool = True
    phase: str = ""
    message: str = ""
    output_uri: str | None = None

    @property
    def title(self) -> str:
        return f"{self.kind} {self.name}"


@dataclass(frozen=True)
class Observed:
    generation: int
    now: str
    previous: Obj = field(default_factory=dict)
    upstream: Upstream | None = None
    # A spec the operator cannot run (unknown pool), or a change it cannot apply (refused).
    invalid: str = ""
    refused_change: str = ""
    plan: JobView | None = None
    plan_units: int | None = None
    plan_message: str = ""
    units: JobView | None = None
    finalize: JobView | None = None
    markers: int | None = None
    summary: Obj | None = None


def count_indexes(text: str) -> int:
    """Number of indexes in a Job's interval list, e.g. ``"1,3-5"`` -> 4."""
    total = 0
    for part in filter(None, (p.strip() for p in text.split(","))):
        first, _, last = part.partition("-")
        total += int(last or first) - int(first) + 1
    return total


def parse_unit_count(message: str) -> int | None:
    """The plan pod's termination message (``{"units": N}``, maybe after log lines) -> N."""
    for line in reversed(message.strip().splitlines()):
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, dict) and isinstance(data.get("units"), int) and data["units"] >= 0:
            return int(data["units"])
    return None


def upstream_ready(observed: Observed | TrainObserved) -> bool:
    return observed.upstream is None or observed.upstream.phase == "Succeeded"


def next_steps(observed: Observed) -> list[str]:
    """The children that should exist now (applying an existing one again is a no-op)."""
    if observed.invalid or observed.refused_change or not upstream_ready(observed):
        return []
    steps = ["job", "plan"]
    if observed.plan is None or not observed.plan.complete or observed.plan_units is None:
        return steps
    if observed.plan_units > 0:
        steps.append("units")
        if observed.units is None or not observed.units.complete:
            return steps
    return [*steps, "finalize"]


def _condition(type_: str, status: bool, reason: str, message: str = "") -> Obj:
    return {"type": type_, "status": "True" if status else "False", "reason": reason, "message": message}


def merge_conditions(previous: Iterable[Obj], current: Iterable[Obj], now: str) -> list[Obj]:
    """Conditions with ``lastTransitionTime`` kept while their status stays the same."""
    before = {c["type"]: c for c in previous}
    merged = []
    for condition in current:
        old = before.get(condition["type"])
        same = old is not None and old.get("status") == condition["status"] and old.get("lastTransitionTime")
        merged.append({**condition, "lastTransitionTime": old["lastTransitionTime"] if same else now})  # type: ignore[index]
    return merged


def _counts_from_summary(kind: str, summary: Obj | None, output_uri: str) -> Obj:
    if not summary:
        return {}
    counts: Obj = {"excluded": dict(summary.get("excluded") or {})}
    samples = dict(summary.get("samples") or {})
    if kind == "ScrapeJob":
        counts["samples"] = samples
        counts["licenses"] = dict(summary.get("licenses") or {})
    else:
        counts["captions"] = dict(summary.get("captions") or samples)
    outputs = summary.get("outputs")
    counts["outputs"] = (
        dict(outputs)
        if isinstance(outputs, dict)
        else {split: f"{output_uri.rstrip('/')}/{split}" for split, n in samples.items() if n}
    )
    return counts


def _gate_on_upstream(upstream: Any, refused: list[Obj]) -> tuple[str | None, list[Obj]]:
    """Waiting or Failed (with its conditions) until the referenced resource has succeeded; after
    that no phase and the conditions to carry on with."""
    if upstream is not None:
        if not upstream.found:
            message = f"waiting for {upstream.title}: it does not exist yet"
            return "Waiting", [_condition("UpstreamReady", False, "UpstreamMissing", message), *refused]
        if upstream.phase == "Failed":
            message = f"{upstream.title} failed" + (f": {upstream.message}" if upstream.message else "")
            return "Failed", [
                _condition("UpstreamReady", False, "UpstreamFailed", message),
                _condition("Failed", True, "UpstreamFailed", message),
            ]
        if upstream.phase != "Succeeded":
            message = f"waiting for {upstream.title} to succeed (phase {upstream.phase or 'Pending'})"
            return "Waiting", [_condition("UpstreamReady", False, "UpstreamNotReady", message), *refused]
    return None, [*([_condition("UpstreamReady", True, "UpstreamSucceeded")] if upstream else []), *refused]


def reduce_stage(kind: str, output_uri: str, observed: Observed) -> Obj:
    """The status of a ScrapeJob or CaptionJob from what was observed (see the module docstring)."""
    previous = observed.previous
    phase, conditions = _phase_and_conditions(observed)
    total = (
        observed.plan_units
        if observed.plan_units is not None
        else (previous.get("units") or {}).get("total", 0)
    )
    units = observed.units
    succeeded = count_indexes(units.completed_indexes) if units else 0
    if observed.markers is not None:
        succeeded = max(succeeded, observed.markers)
    succeeded = min(succeeded, total) if total else succeeded
    failed = count_indexes(units.failed_indexes) if units else 0
    status: Obj = {
        "phase": phase,
        "conditions": merge_conditions(previous.get("conditions") or [], conditions, observed.now),
        "units": {"total": total, "succeeded": succeeded, "failed": failed},
        "progress": f"{succeeded}/{total}",
        "observedGeneration": observed.generation,
    }
    start = previous.get("startTime") or ""
    if not start and phase in ("Running", *TERMINAL):
        start = observed.now
    if start:
        status["startTime"] = start
    if phase in TERMINAL:
        status["completionTime"] = previous.get("completionTime") or observed.now
    status.update(_counts_from_summary(kind, observed.summary, output_uri))
    rate = _images_per_second(observed.summary, start, status.get("completionTime", ""))
    if rate is not None:
        status["imagesPerSecond"] = rate
    return status


def _images_per_second(summary: Obj | None, start: str, end: str) -> float | None:
    """Samples written over the stage's wall time, once it is done (Prometheus has the live rate)."""
    if not summary or not start or not end:
        return None
    seconds = (_parse_time(end) - _parse_time(start)).total_seconds()
    written = sum(int(n) for n in (summary.get("samples") or {}).values())
    return round(written / seconds, 2) if seconds > 0 else None


def _parse_time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def _phase_and_conditions(observed: Observed) -> tuple[str, list[Obj]]:
    previous_phase = observed.previous.get("phase") or "Pending"
    refused: list[Obj] = []
    if observed.refused_change:
        refused = [_condition("SpecChangeRefused", True, "SpecImmutable", observed.refused_change)]
    # Terminal phases stay: a finished stage is not rerun by a later observation.
    if previous_phase in TERMINAL and not observed.refused_change:
        return previous_phase, [
            c for c in observed.previous.get("conditions") or [] if c["type"] != "SpecChangeRefused"
        ]
    if previous_phase in TERMINAL:
        return previous_phase, [*(observed.previous.get("conditions") or []), *refused]
    if observed.invalid:
        return "Failed", [_condition("Failed", True, "InvalidSpec", observed.invalid)]
    blocked, conditions = _gate_on_upstream(observed.upstream, refused)
    if blocked is not None:
        return blocked, conditions
    plan = observed.plan
    if plan is None:
        return "Pending", conditions
    if plan.failed:
        message = "planning failed" + (f": {observed.plan_message.strip()}" if observed.plan_message else "")
        return "Failed", [*conditions, _condition("Failed", True, "PlanFailed", message)]
    if not plan.complete or observed.plan_units is None:
        reason = "Planning" if not plan.complete else "UnitCountUnknown"
        return "Running", [*conditions, _condition("Planned", False, reason)]
    conditions.append(_condition("Planned", True, "Planned", f"{observed.plan_units} units"))
    units = observed.units
    if observed.plan_units > 0:
        if units is None or (not units.complete and not units.failed):
            return "Running", [*conditions, _condition("UnitsComplete", False, "Running")]
        if units.failed:
            failed = count_indexes(units.failed_indexes)
            message = (
                f"{failed} of {observed.plan_units} units failed"
                + (f" (indexes {units.failed_indexes})" if units.failed_indexes else "")
                + (f": {units.message}" if units.message else "")
            )
            reason = units.reason or "UnitsFailed"
            return "Failed", [
                *conditions,
                _condition("UnitsComplete", False, reason, message),
                _condition("Failed", True, reason, message),
            ]
    conditions.append(_condition("UnitsComplete", True, "Complete"))
    final = observed.finalize
    if final is None or (not final.complete and not final.failed):
        return "Running", [*conditions, _condition("Finalized", False, "Finalizing")]
    if final.failed:
        message = "finalize failed" + (f": {final.message}" if final.message else "")
        return "Failed", [*conditions, _condition("Failed", True, "FinalizeFailed", message)]
    return "Succeeded", [*conditions, _condition("Finalized", True, "Finalized")]


def transition_events(previous: Obj, current: Obj) -> list[tuple[str, str, str]]:
    """(type, reason, message) for each Event a status change deserves: phase changes and refusals."""
    events: list[tuple[str, str, str]] = []
    before, after = previous.get("phase") or "", current.get("phase") or ""
    if before != after:
        failed = next((c for c in current.get("conditions") or [] if c["type"] == "Failed"), None)
        waiting = next(
            (
                c
                for c in current.get("conditions") or []
                if c["type"] == "UpstreamReady" and c["status"] != "True"
            ),
            None,
        )
        detail = (failed or waiting or {}).get("message", "")
        message = f"{before or 'New'} -> {after}" + (f": {detail}" if detail else "")
        events.append(("Warning" if after == "Failed" else "Normal", after, message))
    was_refused = any(c["type"] == "SpecChangeRefused" for c in previous.get("conditions") or [])
    for condition in current.get("conditions") or []:
        if condition["type"] == "SpecChangeRefused" and not was_refused:
            events.append(("Warning", "SpecChangeRefused", condition["message"]))
    return events


# --- TrainRun ------------------------------------------------------------------------------------

TRAIN_STATUS_FIELDS = ("step", "imagesSeen", "loss", "lastCheckpoint", "imagesPerSecond", "progress")


@dataclass(frozen=True)
class TrainObserved:
    """What the operator saw of a TrainRun: its upstream, the train Job, pods and rank 0's status.json."""

    generation: int
    now: str
    previous: Obj = field(default_factory=dict)
    upstream: Upstream | None = None
    invalid: str = ""
    refused_change: str = ""
    suspended: bool = False
    job: JobView | None = None
    job_failed_pods: int = 0
    pod_restarts: int = 0
    train_status: Obj | None = None


def train_steps(observed: TrainObserved) -> list[str]:
    """The TrainRun children that should exist now: job file, rendezvous Service, train Job."""
    if observed.invalid or observed.refused_change or not upstream_ready(observed):
        return []
    if (observed.previous.get("phase") or "") in TERMINAL and observed.job is None:
        return []
    return ["job", "rdzv", "train"]


def reduce_train(output_uri: str, observed: TrainObserved) -> Obj:
    """The status of a TrainRun from what was observed."""
    previous = observed.previous
    phase, conditions = _train_phase_and_conditions(observed)
    status: Obj = {
        "phase": phase,
        "conditions": merge_conditions(previous.get("conditions") or [], conditions, observed.now),
        "observedGeneration": observed.generation,
    }
    for key in TRAIN_STATUS_FIELDS:
        if key in previous:
            status[key] = previous[key]
    written = observed.train_status or {}
    for key in TRAIN_STATUS_FIELDS:
        if key in written and written[key] not in (None, ""):
            status[key] = written[key]
    status["restarts"] = max(
        int(previous.get("restarts") or 0),
        int(written.get("restarts") or 0),
        observed.pod_restarts,
        observed.job_failed_pods,
    )
    outputs = written.get("outputs")
    if isinstance(outputs, dict) and outputs:
        status["outputs"] = dict(outputs)
    elif previous.get("outputs"):
        status["outputs"] = dict(previous["outputs"])
    elif phase == "Succeeded":
        status["outputs"] = {"pipeline": output_uri}
    start = previous.get("startTime") or ""
    if not start and phase in ("Running", *TERMINAL):
        start = observed.now
    if start:
        status["startTime"] = start
    if phase in TERMINAL:
        status["completionTime"] = previous.get("completionTime") or observed.now
    return status


def _train_phase_and_conditions(observed: TrainObserved) -> tuple[str, list[Obj]]:
    previous_phase = observed.previous.get("phase") or "Pending"
    refused: list[Obj] = []
    if observed.refused_change:
        refused = [_condition("SpecChangeRefused", True, "SpecImmutable", observed.refused_change)]
    if previous_phase in TERMINAL:
        kept = [c for c in observed.previous.get("conditions") or [] if c["type"] != "SpecChangeRefused"]
        return previous_phase, [*kept, *refused]
    if observed.invalid:
        return "Failed", [_condition("Failed", True, "InvalidSpec", observed.invalid)]
    blocked, conditions = _gate_on_upstream(observed.upstream, refused)
    if blocked is not None:
        return blocked, conditions
    job = observed.job
    if job is None:
        return "Pending", conditions
    if job.failed:
        message = "training failed" + (f" ({job.reason})" if job.reason else "")
        message += f": {job.message}" if job.message else ""
        return "Failed", [*conditions, _condition("Failed", True, job.reason or "TrainingFailed", message)]
    if job.complete:
        return "Succeeded", [*conditions, _condition("Trained", True, "Complete")]
    if observed.suspended:
        return "Suspended", [*conditions, _condition("Trained", False, "Suspended", "spec.suspend is true")]
    return "Running", [*conditions, _condition("Trained", False, "Running")]

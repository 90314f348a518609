"""Pure reducers: what the operator observed (children's status, unit markers, summary) -> CR status.

``reduce_stage`` is the whole life of a sharded stage, read top to bottom: wait for the upstream, then
its sharded work (``sharded_phase``: plan, run the units, finalize). ``reduce_train`` is a TrainRun's:
wait for the upstream, its latents phase (the same sharded work) when it has one, then training.
``next_steps`` and ``train_steps`` say which children should exist now, and ``transition_events``
which Kubernetes Events a status change deserves.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from commoncanvas_operator.builders import APPLIED_SPEC_ANNOTATION, LATENTS_PREFIX, applied_output_uri

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
    suspended: bool = False  # spec.suspend: by the owner's spec.suspend, or by a queue (Kueue)
    suspended_reason: str = ""
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
        suspended = conditions.get("Suspended") or {}
        return cls(
            suspended=bool((job.get("spec") or {}).get("suspend")),
            suspended_reason=suspended.get("reason", ""),
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
class ShardedView:
    """What was seen of sharded work (builders.ShardedWork): its plan, units (workers) and finalize
    Jobs, the plan's unit count (``plan_units``, None: not known yet) and the workers' progress totals
    (``commoncanvas.workqueue.progress_totals``; None: not read)."""

    plan: JobView | None = None
    plan_units: int | None = None
    plan_message: str = ""
    units: JobView | None = None
    finalize: JobView | None = None
    progress: Obj | None = None

    @property
    def done(self) -> bool:
        return self.finalize is not None and self.finalize.complete


@dataclass(frozen=True)
class Observed:
    generation: int
    now: str
    previous: Obj = field(default_factory=dict)
    upstream: Upstream | None = None
    # A spec the operator cannot run (unknown pool), or a change it cannot apply (refused).
    invalid: str = ""
    refused_change: str = ""
    suspended: bool = False  # spec.suspend
    work: ShardedView = field(default_factory=ShardedView)
    summary: Obj | None = None


# --- the spec-change policy: what a started resource's work can take ---------------------------

# Spec fields whose change reaches running work whole (a Job's parallelism and suspend are mutable).
MUTABLE_SPEC_FIELDS = frozenset({"parallelism", "suspend"})


def spec_differences(applied: Any, wanted: Any, path: str = "spec") -> list[str]:
    """Dotted paths of the fields that differ between two specs (a list counts as one field)."""
    if isinstance(applied, dict) and isinstance(wanted, dict):
        return [
            difference
            for key in sorted(set(applied) | set(wanted))
            for difference in spec_differences(applied.get(key), wanted.get(key), f"{path}.{key}")
        ]
    return [] if applied == wanted else [path]


def refused_change(job_file: Obj | None, spec: Obj) -> str:
    """Why ``spec`` cannot be applied to the work already made from the job file (empty: it can).

    Pods read the job file when they start, so changing it under running work would mix settings
    within one output; only the Jobs' ``parallelism`` and ``suspend`` can change in place."""
    if not job_file:
        return ""
    recorded = ((job_file.get("metadata") or {}).get("annotations") or {}).get(APPLIED_SPEC_ANNOTATION)
    if recorded is None:  # made before the spec was recorded: only its output URI is known
        applied: Obj = {"output": {"uri": applied_output_uri(job_file)}}
        wanted: Obj = {"output": {"uri": (spec.get("output") or {}).get("uri")}}
    else:
        applied, wanted = json.loads(recorded), spec
    changed = [
        path for path in spec_differences(applied, wanted) if path.split(".")[1] not in MUTABLE_SPEC_FIELDS
    ]
    if not changed:
        return ""
    if changed == ["spec.output.uri"]:
        before, after = applied["output"]["uri"], wanted["output"]["uri"]
        return (
            f"spec.output.uri changed from {before} to {after}, but this resource's work already "
            f"writes to {before}; set it back, or create a new resource for a new output"
        )
    return (
        f"{', '.join(changed)} changed after this resource's work started; its Jobs and pods were made "
        "from the earlier spec and cannot take the change. Set it back, or create a new resource "
        "with the new settings (only parallelism and suspend change in place)"
    )


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


def sharded_steps(view: ShardedView) -> list[str]:
    """The Jobs of sharded work that should exist now: plan; units once the plan says how many (none
    for no units); finalize once they are all done."""
    steps = ["plan"]
    if view.plan is None or not view.plan.complete or view.plan_units is None:
        return steps
    if view.plan_units > 0:
        steps.append("units")
        if view.units is None or not view.units.complete:
            return steps
    return [*steps, "finalize"]


def next_steps(observed: Observed) -> list[str]:
    """The children that should exist now (applying an existing one again is a no-op); none once
    the resource has finished, so an upgrade that changes the Jobs' templates never touches it."""
    if is_terminal(observed.previous) or observed.invalid or observed.refused_change:
        return []
    if not upstream_ready(observed):
        return []
    return ["job", *sharded_steps(observed.work)]


def _condition(type_: str, status: bool, reason: str, message: str = "") -> Obj:
    return {"type": type_, "status": "True" if status else "False", "reason": reason, "message": message}


def merge_conditions(
    previous: Iterable[Obj], current: Iterable[Obj], now: str, generation: int | None = None
) -> list[Obj]:
    """Conditions, one per type (the last given wins), with ``lastTransitionTime`` kept while their
    status stays the same and ``observedGeneration`` set where a generation is given."""
    before = {c["type"]: c for c in previous}
    by_type = {c["type"]: c for c in current}
    merged = []
    for condition in by_type.values():
        old = before.get(condition["type"])
        same = old is not None and old.get("status") == condition["status"] and old.get("lastTransitionTime")
        merged.append({**condition, "lastTransitionTime": old["lastTransitionTime"] if same else now})  # type: ignore[index]
        if generation is not None:
            merged[-1]["observedGeneration"] = generation
    return merged


def is_terminal(status: Obj) -> bool:
    """Whether a resource has finished: one that has applies nothing and keeps its status."""
    return (status.get("phase") or "") in TERMINAL


def terminal_conditions(observed: Observed | TrainObserved) -> list[Obj]:
    """A finished resource's conditions as they were, with a refused spec change stated once."""
    kept = [c for c in observed.previous.get("conditions") or [] if c["type"] != "SpecChangeRefused"]
    if observed.refused_change:
        kept.append(_condition("SpecChangeRefused", True, "SpecImmutable", observed.refused_change))
    return kept


def outcome_conditions(phase: str, conditions: list[Obj]) -> list[Obj]:
    """``Succeeded`` and ``Failed`` on every kind, so ``kubectl wait --for=condition=Succeeded``
    works; a failure's own ``Failed`` condition (with its reason) is kept."""
    failed = next((c for c in conditions if c["type"] == "Failed" and c["status"] == "True"), None)
    rest = [c for c in conditions if c["type"] not in ("Succeeded", "Failed")]
    return [
        *rest,
        _condition("Succeeded", phase == "Succeeded", "Complete" if phase == "Succeeded" else phase),
        failed or _condition("Failed", False, phase),
    ]


def _counts_from_summary(kind: str, summary: Obj | None, output_uri: str) -> Obj:
    if not summary:
        return {}
    if kind == "EvalRun":  # commoncanvas.eval.score's summary: the numbers, not samples per split
        return {
            "results": [dict(row) for row in summary.get("results") or []],
            "prompts": int(summary.get("prompts") or 0),
            "references": int(summary.get("references") or 0),
            "outputs": dict(summary.get("outputs") or {}),
        }
    counts: Obj = {"excluded": dict(summary.get("excluded") or {})}
    samples = dict(summary.get("samples") or {})
    if kind == "ScrapeJob":
        counts["samples"] = samples
        counts["licenses"] = dict(summary.get("licenses") or {})
        counts["transient"] = dict(summary.get("transient") or {})
        counts["warnings"] = dict(summary.get("warnings") or {})
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


def unit_counts(view: ShardedView, previous: Obj) -> Obj:
    """``{total, succeeded, failed}`` units of sharded work from its workers' progress (``previous``:
    the counts last reported, kept while nothing newer was read). ``failed``: units whose last attempt
    failed and that no attempt has published yet."""
    previous = previous or {}
    total = view.plan_units if view.plan_units is not None else previous.get("total", 0)
    progress = view.progress
    if progress is None:
        succeeded, failed = int(previous.get("succeeded") or 0), int(previous.get("failed") or 0)
    else:
        succeeded, failed = int(progress["unitsDone"]), len(progress.get("failedUnits") or {})
    if view.done:
        succeeded, failed = total, 0
    succeeded = min(succeeded, total) if total else succeeded
    return {"total": total, "succeeded": succeeded, "failed": failed}


def worker_counts(view: ShardedView, previous: Obj, summary: Obj | None = None) -> Obj:
    """``workers`` and ``modelLoads`` (model loads equal workers, not units) and the live rate."""
    source = summary if summary and "workers" in summary else view.progress
    counts: Obj = {k: previous[k] for k in ("workers", "modelLoads") if k in previous}
    if source:
        counts.update(workers=int(source.get("workers") or 0), modelLoads=int(source.get("modelLoads") or 0))
    return counts


def reduce_stage(kind: str, output_uri: str, observed: Observed) -> Obj:
    """The status of a ScrapeJob or CaptionJob from what was observed (see the module docstring)."""
    previous = observed.previous
    counts = unit_counts(observed.work, previous.get("units") or {})
    phase, conditions = _phase_and_conditions(observed, counts)
    status: Obj = {
        "phase": phase,
        "conditions": merge_conditions(
            previous.get("conditions") or [],
            outcome_conditions(phase, conditions),
            observed.now,
            observed.generation,
        ),
        "units": counts,
        "progress": f"{counts['succeeded']}/{counts['total']}",
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
    status.update(worker_counts(observed.work, previous, observed.summary))
    rate = _images_per_second(observed.summary, start, status.get("completionTime", ""))
    live = (observed.work.progress or {}).get("imagesPerSecond")
    if rate is not None:
        status["imagesPerSecond"] = rate
    elif live:
        status["imagesPerSecond"] = live
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


def _phase_and_conditions(observed: Observed, counts: Obj) -> tuple[str, list[Obj]]:
    previous_phase = observed.previous.get("phase") or "Pending"
    refused: list[Obj] = []
    if observed.refused_change:
        refused = [_condition("SpecChangeRefused", True, "SpecImmutable", observed.refused_change)]
    # Terminal phases stay: a finished stage is not rerun by a later observation.
    if previous_phase in TERMINAL:
        return previous_phase, terminal_conditions(observed)
    if observed.invalid:
        return "Failed", [_condition("Failed", True, "InvalidSpec", observed.invalid)]
    blocked, conditions = _gate_on_upstream(observed.upstream, refused)
    if blocked is not None:
        return blocked, conditions
    phase, work = sharded_phase(observed.work, counts)
    view = observed.work
    current = next((job for job in (view.finalize, view.units, view.plan) if job is not None), None)
    return held(phase, current, observed.suspended, [*conditions, *work])


def held(phase: str, job: JobView | None, suspended: bool, conditions: list[Obj]) -> tuple[str, list[Obj]]:
    """A running resource whose Job is suspended: ``Suspended`` by its own spec.suspend, else
    ``Queued`` (a queue such as Kueue has not admitted it yet; Kueue's reason where the Job has one)."""
    if phase not in ("Pending", "Running") or job is None or job.complete or not job.suspended:
        return phase, conditions
    if suspended:
        return "Suspended", [*conditions, _condition("Admitted", False, "Suspended", "spec.suspend is true")]
    reason = job.suspended_reason or "WaitingForAdmission"
    message = "the Job waits for its queue to admit it (kueue.x-k8s.io/queue-name)"
    return "Queued", [*conditions, _condition("Admitted", False, reason, message)]


def sharded_phase(view: ShardedView, counts: Obj, prefix: str = "") -> tuple[str, list[Obj]]:
    """The phase of sharded work (Pending until its plan Job exists, Running, Succeeded or Failed) and
    its conditions ``{prefix}Planned``, ``{prefix}UnitsComplete`` (``"3/8 units"`` while they run) and
    ``{prefix}Finalized``, with ``Failed`` when it failed. A prefix also starts the failure reasons,
    and its lower case the failure messages (``Latents`` -> ``latents phase: 2 of 8 units failed...``)."""
    what = f"{prefix.lower()} phase: " if prefix else ""

    def failed(reason: str, message: str, *before: Obj) -> tuple[str, list[Obj]]:
        return "Failed", [*before, _condition("Failed", True, f"{prefix}{reason}", f"{what}{message}")]

    conditions: list[Obj] = []
    plan = view.plan
    if plan is None:
        return "Pending", conditions
    if plan.failed:
        return failed(
            "PlanFailed", "planning failed" + (f": {view.plan_message.strip()}" if view.plan_message else "")
        )
    if not plan.complete or view.plan_units is None:
        reason = "Planning" if not plan.complete else "UnitCountUnknown"
        return "Running", [_condition(f"{prefix}Planned", False, reason)]
    conditions.append(_condition(f"{prefix}Planned", True, "Planned", f"{view.plan_units} units"))
    units = view.units
    if view.plan_units > 0:
        if units is None or (not units.complete and not units.failed):
            progress = f"{counts['succeeded']}/{counts['total']} units"
            return "Running", [*conditions, _condition(f"{prefix}UnitsComplete", False, "Running", progress)]
        if units.failed:
            given_up = (view.progress or {}).get("failedUnits") or {}
            first = next(iter(given_up.items()), None)
            workers = count_indexes(units.failed_indexes)
            parts = [f"{len(given_up)} of {view.plan_units} units failed"] if given_up else []
            if first:
                parts[0] += f" (units {','.join(list(given_up)[:20])}; unit {first[0]}: {first[1]})"
            parts.append(
                f"{workers} worker{'' if workers == 1 else 's'} failed"
                + (f" (indexes {units.failed_indexes})" if units.failed_indexes else "")
            )
            message = "; ".join(parts) + (f": {units.message}" if units.message else "")
            reason = units.reason or "UnitsFailed"
            complete = _condition(f"{prefix}UnitsComplete", False, reason, f"{what}{message}")
            return failed(reason, message, *conditions, complete)
    conditions.append(_condition(f"{prefix}UnitsComplete", True, "Complete"))
    final = view.finalize
    if final is None or (not final.complete and not final.failed):
        return "Running", [*conditions, _condition(f"{prefix}Finalized", False, "Finalizing")]
    if final.failed:
        return failed(
            "FinalizeFailed", "finalize failed" + (f": {final.message}" if final.message else ""), *conditions
        )
    return "Succeeded", [*conditions, _condition(f"{prefix}Finalized", True, "Finalized")]


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
    before_true = {c["type"] for c in previous.get("conditions") or [] if c.get("status") == "True"}
    for condition in current.get("conditions") or []:
        kind, became_true = condition["type"], condition["status"] == "True"
        if kind in WARNED_CONDITIONS and became_true and kind not in before_true:
            events.append(("Warning", kind, condition["message"]))
    return events


# Conditions that get a Warning Event when they become true.
WARNED_CONDITIONS = ("SpecChangeRefused", "TemplateDrift")


def apply_refused_condition(status_code: int, message: str) -> Obj:
    """The API server refused what the operator sent (not a conflict, throttling or outage)."""
    return _condition("ApplyRefused", True, f"HTTP{status_code}", message[:1000])


def drift_condition(drifted: list[str]) -> Obj:
    """An upgrade changed what a running Job's template would be: the Job is kept as it runs (a pod
    template is immutable), and Jobs created from now on get the new template."""
    if drifted:
        return _condition("TemplateDrift", True, "ImmutableFields", "; ".join(drifted))
    return _condition("TemplateDrift", False, "InSync")


# --- TrainRun ------------------------------------------------------------------------------------

TRAIN_STATUS_FIELDS = (
    "step",
    "stage",
    "resolution",
    "imagesSeen",
    "loss",
    "lastCheckpoint",
    "imagesPerSecond",
    "progress",
    "skippedSteps",
)


@dataclass(frozen=True)
class TrainObserved:
    """What the operator saw of a TrainRun: its upstream, its latents phase (None: it has none), the
    train Job, pods and rank 0's status.json."""

    generation: int
    now: str
    previous: Obj = field(default_factory=dict)
    upstream: Upstream | None = None
    invalid: str = ""
    refused_change: str = ""
    suspended: bool = False
    latents: ShardedView | None = None
    job: JobView | None = None
    job_failed_pods: int = 0
    pod_restarts: int = 0
    train_status: Obj | None = None


def train_steps(observed: TrainObserved) -> list[str]:
    """The TrainRun children that should exist now: job file, the latents phase's Jobs
    (``latents-plan``...) when it has one, and once that has finished the rendezvous Service and
    the train Job."""
    if is_terminal(observed.previous) or observed.invalid or observed.refused_change:
        return []
    if not upstream_ready(observed):
        return []
    steps = ["job"]
    latents = observed.latents
    if latents is not None and observed.job is None:
        steps += [f"{LATENTS_PREFIX}{step}" for step in sharded_steps(latents)]
        if not latents.done:
            return steps
    return [*steps, "rdzv", "train"]


def reduce_train(output_uri: str, observed: TrainObserved) -> Obj:
    """The status of a TrainRun from what was observed."""
    previous = observed.previous
    latents = observed.latents
    counts = unit_counts(latents, previous.get("units") or {}) if latents is not None else None
    phase, conditions = _train_phase_and_conditions(observed, counts)
    status: Obj = {
        "phase": phase,
        "conditions": merge_conditions(
            previous.get("conditions") or [],
            outcome_conditions(phase, conditions),
            observed.now,
            observed.generation,
        ),
        "observedGeneration": observed.generation,
    }
    for key in TRAIN_STATUS_FIELDS:
        if key in previous:
            status[key] = previous[key]
    if latents is not None and counts is not None:
        # The latents phase's units; until it is done, they are the run's progress too.
        status["units"] = counts
        status.update(worker_counts(latents, previous))
        if not latents.done and observed.job is None:
            status["progress"] = f"latents {counts['succeeded']}/{counts['total']}"
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


def _train_phase_and_conditions(observed: TrainObserved, latents_counts: Obj | None) -> tuple[str, list[Obj]]:
    previous_phase = observed.previous.get("phase") or "Pending"
    refused: list[Obj] = []
    if observed.refused_change:
        refused = [_condition("SpecChangeRefused", True, "SpecImmutable", observed.refused_change)]
    if previous_phase in TERMINAL:
        return previous_phase, terminal_conditions(observed)
    if observed.invalid:
        return "Failed", [_condition("Failed", True, "InvalidSpec", observed.invalid)]
    blocked, conditions = _gate_on_upstream(observed.upstream, refused)
    if blocked is not None:
        return blocked, conditions
    job = observed.job
    if observed.latents is not None and latents_counts is not None:
        phase, latents = sharded_phase(observed.latents, latents_counts, "Latents")
        conditions += latents
        # Training starts once the latents phase has finished (train_steps); a train Job already
        # there is not held back by latents Jobs gone since.
        if phase != "Succeeded" and job is None:
            return "Suspended" if observed.suspended and phase == "Running" else phase, conditions
    if job is None:
        return "Pending", conditions
    if job.failed:
        message = "training failed" + (f" ({job.reason})" if job.reason else "")
        message += f": {job.message}" if job.message else ""
        return "Failed", [*conditions, _condition("Failed", True, job.reason or "TrainingFailed", message)]
    if job.complete:
        return "Succeeded", [*conditions, _condition("Trained", True, "Complete")]
    if job.suspended and not observed.suspended:
        return held("Running", job, False, [*conditions, _condition("Trained", False, "Queued")])
    if observed.suspended:
        return "Suspended", [*conditions, _condition("Trained", False, "Suspended", "spec.suspend is true")]
    return "Running", [*conditions, _condition("Trained", False, "Running")]

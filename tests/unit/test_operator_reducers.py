"""The operator's reducers: observed children and store -> a stage's status, steps and Events."""

from __future__ import annotations

import dataclasses
from typing import Any

from commoncanvas_operator.reducers import (
    JobView,
    Observed,
    ShardedView,
    Upstream,
    count_indexes,
    merge_conditions,
    next_steps,
    parse_unit_count,
    reduce_stage,
    transition_events,
)

NOW = "2026-01-01T00:00:00Z"
DONE = JobView(complete=True)
RUNNING = JobView(active=1)


WORK_FIELDS = {f.name for f in dataclasses.fields(ShardedView)}


def observe(**kwargs: Any) -> Observed:
    """An observation; the sharded work's fields (plan, plan_units, units...) go to its ``work``."""
    work = ShardedView(**{k: kwargs.pop(k) for k in list(kwargs) if k in WORK_FIELDS})
    return Observed(generation=3, now=NOW, work=work, **kwargs)


def conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status["conditions"]}


def test_index_lists_are_counted() -> None:
    assert count_indexes("") == 0
    assert count_indexes("1,3-5") == 4
    assert count_indexes("0-9") == 10


def test_unit_count_is_read_from_the_last_json_line() -> None:
    assert parse_unit_count('INFO planning\n{"units": 7}\n') == 7
    assert parse_unit_count("Traceback ...") is None
    assert parse_unit_count('{"units": -1}') is None


def test_a_stage_waits_for_its_upstream_and_names_it() -> None:
    observed = observe(upstream=Upstream("ScrapeJob", "yfcc", phase="Running"))

    status = reduce_stage("CaptionJob", "s3://b/c", observed)

    assert status["phase"] == "Waiting"
    assert "ScrapeJob yfcc" in conditions(status)["UpstreamReady"]["message"]
    assert next_steps(observed) == []


def test_a_missing_upstream_is_waited_for() -> None:
    status = reduce_stage("CaptionJob", "s3://b/c", observe(upstream=Upstream("ScrapeJob", "x", found=False)))
    assert status["phase"] == "Waiting"
    assert conditions(status)["UpstreamReady"]["reason"] == "UpstreamMissing"


def test_a_failed_upstream_fails_the_stage_with_its_name() -> None:
    observed = observe(upstream=Upstream("ScrapeJob", "yfcc", phase="Failed", message="3 of 4 units failed"))

    status = reduce_stage("CaptionJob", "s3://b/c", observed)

    assert status["phase"] == "Failed"
    failed = conditions(status)["Failed"]
    assert failed["reason"] == "UpstreamFailed"
    assert failed["message"] == "ScrapeJob yfcc failed: 3 of 4 units failed"
    assert status["completionTime"] == NOW


def test_steps_follow_the_plan_then_units_then_finalize() -> None:
    assert next_steps(observe()) == ["job", "plan"]
    assert next_steps(observe(plan=RUNNING)) == ["job", "plan"]
    assert next_steps(observe(plan=DONE, plan_units=4)) == ["job", "plan", "units"]
    assert next_steps(observe(plan=DONE, plan_units=4, units=RUNNING)) == ["job", "plan", "units"]
    assert next_steps(observe(plan=DONE, plan_units=4, units=DONE)) == ["job", "plan", "units", "finalize"]
    # Nothing to do: straight to finalize (it writes an empty summary).
    assert next_steps(observe(plan=DONE, plan_units=0)) == ["job", "plan", "finalize"]
    assert next_steps(observe(upstream=Upstream("ScrapeJob", "s", phase="Succeeded"))) == ["job", "plan"]


def test_running_units_and_workers_are_counted_from_the_workers_progress() -> None:
    units = JobView(active=2, completed_indexes="0")
    progress = {
        "unitsDone": 3,
        "workers": 2,
        "modelLoads": 2,
        "failedUnits": {"4": "ValueError: broken"},
        "imagesPerSecond": 12.5,
    }

    status = reduce_stage(
        "ScrapeJob", "s3://b/c", observe(plan=DONE, plan_units=5, units=units, progress=progress)
    )

    assert status["phase"] == "Running"
    assert status["units"] == {"total": 5, "succeeded": 3, "failed": 1}
    assert (status["workers"], status["modelLoads"], status["imagesPerSecond"]) == (2, 2, 12.5)
    assert status["progress"] == "3/5"
    assert status["startTime"] == NOW
    assert status["observedGeneration"] == 3


def test_units_failing_beyond_the_limit_fail_the_stage_with_the_jobs_reason() -> None:
    units = JobView(
        failed=True, reason="FailedIndexes", message="Job has failed indexes", failed_indexes="0-1"
    )
    progress = {"unitsDone": 0, "failedUnits": {"0": "ValueError: a", "1": "ValueError: b"}}

    status = reduce_stage(
        "ScrapeJob", "s3://b/c", observe(plan=DONE, plan_units=2, units=units, progress=progress)
    )

    assert status["phase"] == "Failed"
    failed = conditions(status)["Failed"]
    assert failed["reason"] == "FailedIndexes"
    assert failed["message"] == (
        "2 of 2 units failed (units 0,1; unit 0: ValueError: a); 2 workers failed (indexes 0-1): "
        "Job has failed indexes"
    )
    assert status["units"]["failed"] == 2


def test_a_failed_plan_says_why() -> None:
    observed = observe(plan=JobView(failed=True), plan_message="metadata.tsv: no such key\n")
    status = reduce_stage("ScrapeJob", "s3://b/c", observed)
    assert status["phase"] == "Failed"
    assert conditions(status)["Failed"]["message"] == "planning failed: metadata.tsv: no such key"


def test_finalized_stage_succeeds_with_counts_from_its_summary() -> None:
    summary = {
        "samples": {"commercial": 7, "noncommercial": 0},
        "licenses": {"CC-BY": 7},
        "excluded": {"fetch:http_404": 1},
        "outputs": {"commercial": "s3://b/c/commercial"},
    }
    units = JobView(complete=True, completed_indexes="0-1")
    observed = observe(plan=DONE, plan_units=2, units=units, finalize=DONE, summary=summary)

    status = reduce_stage("ScrapeJob", "s3://b/c", observed)

    assert status["phase"] == "Succeeded"
    assert status["units"] == {"total": 2, "succeeded": 2, "failed": 0}
    assert status["samples"] == {"commercial": 7, "noncommercial": 0}
    assert status["licenses"] == {"CC-BY": 7}
    assert status["outputs"] == {"commercial": "s3://b/c/commercial"}
    assert status["completionTime"] == NOW
    assert "imagesPerSecond" not in status  # started and finished in the same observation


def test_a_finished_stage_reports_samples_per_second_of_wall_time() -> None:
    summary = {"samples": {"commercial": 700, "noncommercial": 300}}
    units = JobView(complete=True, completed_indexes="0-1")
    previous = {"phase": "Running", "startTime": "2025-12-31T23:58:20Z"}
    observed = observe(
        previous=previous, plan=DONE, plan_units=2, units=units, finalize=DONE, summary=summary
    )

    status = reduce_stage("ScrapeJob", "s3://b/c", observed)

    assert status["imagesPerSecond"] == 10.0  # 1,000 samples in 100 s


def test_a_finalized_stage_without_summary_still_succeeds() -> None:
    observed = observe(
        plan=DONE, plan_units=1, units=JobView(complete=True, completed_indexes="0"), finalize=DONE
    )
    status = reduce_stage("CaptionJob", "s3://b/c", observed)
    assert status["phase"] == "Succeeded"
    assert "captions" not in status


def test_terminal_phases_stay_and_a_refused_change_is_reported() -> None:
    previous = {"phase": "Succeeded", "conditions": [], "completionTime": "then", "units": {"total": 2}}
    observed = observe(previous=previous, refused_change="spec.output.uri changed", plan=DONE, plan_units=2)

    status = reduce_stage("ScrapeJob", "s3://b/c", observed)

    assert status["phase"] == "Succeeded"
    assert status["completionTime"] == "then"
    assert conditions(status)["SpecChangeRefused"]["message"] == "spec.output.uri changed"
    assert next_steps(observed) == []


def test_an_invalid_spec_fails_without_children() -> None:
    observed = observe(invalid="spec.nodePool: 'h100' is not a pool")
    assert reduce_stage("CaptionJob", "u", observed)["phase"] == "Failed"
    assert next_steps(observed) == []


def test_transition_time_is_kept_while_a_condition_holds() -> None:
    before = [{"type": "Planned", "status": "True", "reason": "Planned", "lastTransitionTime": "t0"}]
    same = merge_conditions(before, [{"type": "Planned", "status": "True", "reason": "Planned"}], NOW)
    flipped = merge_conditions(before, [{"type": "Planned", "status": "False", "reason": "Planning"}], NOW)
    assert same[0]["lastTransitionTime"] == "t0"
    assert flipped[0]["lastTransitionTime"] == NOW


def test_events_on_phase_changes_only() -> None:
    failed = reduce_stage(
        "CaptionJob", "u", observe(upstream=Upstream("ScrapeJob", "yfcc", phase="Failed", message="boom"))
    )
    assert transition_events({"phase": "Waiting"}, failed) == [
        ("Warning", "Failed", "Waiting -> Failed: ScrapeJob yfcc failed: boom")
    ]
    assert transition_events(failed, failed) == []


def test_fifty_passes_over_a_finished_stage_with_a_refused_change_leave_its_status_byte_identical() -> None:
    import json

    summary = {"samples": {"commercial": 3}, "licenses": {"cc-by": 3}, "excluded": {}, "transient": {}}
    finished = observe(plan=DONE, plan_units=2, units=DONE, finalize=DONE, summary=summary)
    status = reduce_stage("ScrapeJob", "s3://b/o", finished)
    assert status["phase"] == "Succeeded"
    for _ in range(50):
        again = dataclasses.replace(finished, previous=status, refused_change="spec.source.uri changed")
        assert next_steps(again) == [], "a finished resource applies nothing"
        status_after = reduce_stage("ScrapeJob", "s3://b/o", again)
        if _ == 0:
            status = status_after  # the refusal is stated once
            continue
        assert json.dumps(status_after, sort_keys=True) == json.dumps(status, sort_keys=True)
    assert [c["type"] for c in status["conditions"]].count("SpecChangeRefused") == 1


def test_every_status_the_reducers_write_validates_against_the_resources_status_models() -> None:
    from commoncanvas.specs import CaptionJobStatus, ScrapeJobStatus, TrainRunStatus
    from commoncanvas_operator.reducers import TrainObserved, reduce_train

    summary = {
        "samples": {"commercial": 3},
        "licenses": {"cc-by": 3},
        "excluded": {"duplicate": 1},
        "transient": {"timeout": 1},
        "warnings": {"date_taken": 2},
        "workers": 2,
        "modelLoads": 0,
    }
    passes = [
        observe(),
        observe(
            plan=DONE,
            plan_units=2,
            units=RUNNING,
            progress={"unitsDone": 1, "imagesPerSecond": 3.5, "workers": 2, "modelLoads": 2},
        ),
        observe(plan=DONE, plan_units=2, units=JobView(failed=True, failed_indexes="0")),
        observe(plan=DONE, plan_units=2, units=DONE, finalize=DONE, summary=summary),
        observe(upstream=Upstream("ScrapeJob", "x", found=False)),
        observe(plan=DONE, plan_units=2, units=JobView(suspended=True), suspended=True),
    ]
    for observed in passes:
        # KubeModel forbids unknown fields: a misspelt status key fails here, not pruned by the API server.
        ScrapeJobStatus.model_validate(reduce_stage("ScrapeJob", "s3://b/o", observed))
        CaptionJobStatus.model_validate(reduce_stage("CaptionJob", "s3://b/o", observed))
    for job in (None, RUNNING, DONE, JobView(failed=True), JobView(suspended=True)):
        TrainRunStatus.model_validate(reduce_train("s3://b/t", TrainObserved(generation=1, now=NOW, job=job)))


def test_a_suspended_job_is_queued_unless_the_resource_asked_for_it() -> None:
    queued = reduce_stage("ScrapeJob", "s3://b/o", observe(plan=JobView(suspended=True)))
    assert queued["phase"] == "Queued"
    assert conditions(queued)["Admitted"]["reason"] == "WaitingForAdmission"
    paused = observe(plan=DONE, plan_units=2, units=JobView(suspended=True), suspended=True)
    assert reduce_stage("ScrapeJob", "s3://b/o", paused)["phase"] == "Suspended"

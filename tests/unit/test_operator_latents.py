"""A TrainRun's latents phase on a cluster (optimizations.precomputeLatents): three Jobs run as a stage's
are (plan, an Indexed Job of units, finalize) before the rendezvous Service and the train Job."""

from __future__ import annotations

import dataclasses
from typing import Any

from tests.unit.test_operator_train import train_run

from commoncanvas_operator import builders
from commoncanvas_operator.reducers import (
    JobView,
    ShardedView,
    TrainObserved,
    Upstream,
    reduce_train,
    train_steps,
)
from commoncanvas_operator.settings import Settings

SETTINGS = Settings.from_dict(
    {
        "pools": {"a100": {"nodeSelector": {"gpu": "a100"}}, "ctl": {"nodeSelector": {"pool": "ctl"}}},
        "controlPool": "ctl",
        "backoffLimitPerIndex": 3,
    }
)
NOW = "2026-01-01T00:00:00Z"
DONE = JobView(complete=True)
READY = Upstream("CaptionJob", "caps", phase="Succeeded", output_uri="s3://b/caps")


def latents_run(distributed: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    return train_run(distributed, optimizations={"precomputeLatents": True}, **spec)


def latents_jobs(body: dict[str, Any] | None = None, units: int = 5) -> dict[str, dict[str, Any]]:
    work = builders.latents_work(body or latents_run())
    return {step: builders.build_sharded_job(work, step, SETTINGS, units=units) for step in builders.STEPS}


def container_of(job: dict[str, Any]) -> dict[str, Any]:
    [container] = job["spec"]["template"]["spec"]["containers"]
    return container


def test_latents_jobs_run_the_latents_cli_on_the_job_file() -> None:
    jobs = latents_jobs()

    assert {step: job["metadata"]["name"] for step, job in jobs.items()} == {
        "plan": "sd-latents-plan",
        "units": "sd-latents-units",
        "finalize": "sd-latents-finalize",
    }
    args = {step: container_of(job)["command"] + container_of(job)["args"] for step, job in jobs.items()}
    assert args == {
        "plan": [
            "commoncanvas",
            "latents",
            "prepare",
            builders.JOB_FILE,
            "--termination-log",
            builders.TERMINATION_LOG,
        ],
        "units": ["commoncanvas", "latents", "work", builders.JOB_FILE],
        "finalize": ["commoncanvas", "latents", "finalize", builders.JOB_FILE],
    }
    for step, job in jobs.items():
        pod = job["spec"]["template"]["spec"]
        # The TrainRun's one job file, the same the train Job reads.
        assert pod["volumes"][0]["configMap"]["name"] == "sd-job", step
        assert job["metadata"]["labels"]["commoncanvas.dev/step"] == f"latents-{step}", step
        assert job["metadata"]["labels"]["commoncanvas.dev/kind"] == "trainrun", step
        # Every step's command imports commoncanvas.train.latents, which imports torch (and finalize
        # runs the text encoder): the GPU image, the one with the ML stack, with or without a GPU.
        assert container_of(job)["image"] == SETTINGS.gpu_image, step


def test_latents_workers_are_an_indexed_job_of_one_gpu_pods_on_the_runs_pool() -> None:
    jobs = latents_jobs(units=50)
    units = jobs["units"]["spec"]

    assert units["completionMode"] == "Indexed"
    # One worker per GPU of the run's nodes (4 nodes x 8 GPUs), each pulling units until none is left.
    assert units["completions"] == units["parallelism"] == 32
    assert units["backoffLimitPerIndex"] == 3
    assert units["podFailurePolicy"]["rules"] == [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}
    ]
    assert units["suspend"] is False
    pod = units["template"]["spec"]
    assert container_of(jobs["units"])["resources"] == {"limits": {builders.GPU_RESOURCE: "1"}}
    assert pod["nodeSelector"] == {"gpu": "a100"}
    assert units["template"]["metadata"]["annotations"] == {"commoncanvas.dev/x": "1"}
    # Planning and finalizing are one pod each on the control pool, without a GPU.
    for step in ("plan", "finalize"):
        spec = jobs[step]["spec"]
        assert spec["completions"] == spec["parallelism"] == 1, step
        assert "completionMode" not in spec, step
        assert spec["template"]["spec"]["nodeSelector"] == {"pool": "ctl"}, step
        assert "resources" not in container_of(jobs[step]), step
        assert "annotations" not in spec["template"]["metadata"], step


def test_latents_parallelism_is_capped_at_the_units_and_a_cpu_run_asks_no_gpu() -> None:
    assert latents_jobs(units=5)["units"]["spec"]["parallelism"] == 5
    cpu = latents_run({"maxNodes": 3, "gpusPerNode": 0}, suspend=True)
    units = latents_jobs(cpu, units=10)["units"]

    assert units["spec"]["parallelism"] == 3  # one process per node, as training has
    assert "resources" not in container_of(units)
    assert units["spec"]["suspend"] is True  # spec.suspend pauses the latents phase too


def test_latents_output_is_where_the_workers_write_it() -> None:
    from commoncanvas.specs.train import TrainRunSpec
    from commoncanvas.train import latents

    body = latents_run()
    spec = TrainRunSpec.model_validate(body["spec"])
    assert builders.LATENTS_DIR == latents.LATENTS_DIR
    assert builders.latents_work(body).output_uri == latents.latents_uri(spec) == "s3://b/sd/latents"
    # The output the running Jobs write to wins over a changed spec (refused anyway).
    assert builders.latents_work(body, "s3://b/before/").output_uri == "s3://b/before/latents"
    assert builders.precompute_latents(body["spec"])
    assert not builders.precompute_latents(train_run()["spec"])


NOTHING_YET = ShardedView()


def observe(latents: ShardedView | None = NOTHING_YET, **kwargs: Any) -> TrainObserved:
    """A TrainRun with a latents phase (None: without), its CaptionJob done."""
    kwargs.setdefault("upstream", READY)
    return TrainObserved(generation=2, now=NOW, latents=latents, **kwargs)


def conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status["conditions"]}


def test_the_train_job_comes_only_after_the_latents_phase_is_finalized() -> None:
    planned = ShardedView(plan=DONE, plan_units=3)
    units_done = dataclasses.replace(planned, units=JobView(complete=True, completed_indexes="0-2"))
    finalizing = dataclasses.replace(units_done, finalize=JobView(active=1))
    finalized = dataclasses.replace(units_done, finalize=DONE)

    assert train_steps(observe()) == ["job", "latents-plan"]
    assert train_steps(observe(ShardedView(plan=JobView(active=1)))) == ["job", "latents-plan"]
    assert train_steps(observe(planned)) == ["job", "latents-plan", "latents-units"]
    assert train_steps(observe(finalizing)) == ["job", "latents-plan", "latents-units", "latents-finalize"]
    assert train_steps(observe(finalized)) == [
        "job",
        "latents-plan",
        "latents-units",
        "latents-finalize",
        "rdzv",
        "train",
    ]
    # Without the phase, or with a train Job already there, nothing of it is applied.
    assert train_steps(observe(None)) == ["job", "rdzv", "train"]
    assert train_steps(observe(finalized, job=JobView(active=1))) == ["job", "rdzv", "train"]
    # Waiting for the CaptionJob: nothing at all.
    assert train_steps(observe(upstream=Upstream("CaptionJob", "caps", phase="Running"))) == []


def test_a_run_in_its_latents_phase_is_running_with_the_units_counted() -> None:
    assert reduce_train("s3://b/sd", observe())["phase"] == "Pending"
    planning = reduce_train("s3://b/sd", observe(ShardedView(plan=JobView(active=1))))
    assert planning["phase"] == "Running"
    assert conditions(planning)["LatentsPlanned"]["reason"] == "Planning"

    units = JobView(active=2, completed_indexes="0")
    progress = {"unitsDone": 3, "workers": 2, "modelLoads": 2, "failedUnits": {}}
    status = reduce_train(
        "s3://b/sd", observe(ShardedView(plan=DONE, plan_units=8, units=units, progress=progress))
    )

    assert status["phase"] == "Running"
    assert status["startTime"] == NOW
    assert status["units"] == {"total": 8, "succeeded": 3, "failed": 0}
    assert (status["workers"], status["modelLoads"]) == (2, 2)
    assert status["progress"] == "latents 3/8"
    found = conditions(status)
    assert found["UpstreamReady"]["status"] == "True"
    assert found["LatentsPlanned"]["message"] == "8 units"
    assert found["LatentsUnitsComplete"] == {
        "type": "LatentsUnitsComplete",
        "status": "False",
        "reason": "Running",
        "message": "3/8 units",
        "lastTransitionTime": NOW,
        "observedGeneration": 2,
    }
    assert "Trained" not in found
    suspended = reduce_train(
        "s3://b/sd", observe(ShardedView(plan=DONE, plan_units=8, units=JobView()), suspended=True)
    )
    assert suspended["phase"] == "Suspended"


def test_failed_latents_units_fail_the_run_naming_them_and_no_training_starts() -> None:
    units = JobView(
        failed=True,
        reason="FailedIndexes",
        message="Job has failed indexes",
        failed_indexes="0",
    )
    progress = {"unitsDone": 3, "failedUnits": {"0": "OSError: x", "2": "OSError: y"}}
    observed = observe(ShardedView(plan=DONE, plan_units=5, units=units, progress=progress))

    status = reduce_train("s3://b/sd", observed)

    assert status["phase"] == "Failed"
    failed = conditions(status)["Failed"]
    assert failed["reason"] == "LatentsFailedIndexes"
    assert failed["message"] == (
        "latents phase: 2 of 5 units failed (units 0,2; unit 0: OSError: x); 1 worker failed (indexes 0): "
        "Job has failed indexes"
    )
    assert conditions(status)["LatentsUnitsComplete"]["status"] == "False"
    assert status["units"] == {"total": 5, "succeeded": 3, "failed": 2}
    assert status["completionTime"] == NOW
    # Failed stays Failed, and the train Job never comes.
    later = observe(ShardedView(plan=DONE, plan_units=5, units=units, progress=progress), previous=status)
    assert train_steps(later) == []
    assert reduce_train("s3://b/sd", later)["phase"] == "Failed"


def test_a_failed_latents_plan_or_finalize_says_which() -> None:
    plan = observe(ShardedView(plan=JobView(failed=True), plan_message="captions/index.json missing\n"))
    failed = conditions(reduce_train("s3://b/sd", plan))["Failed"]
    assert (failed["reason"], failed["message"]) == (
        "LatentsPlanFailed",
        "latents phase: planning failed: captions/index.json missing",
    )
    final = observe(
        ShardedView(plan=DONE, plan_units=0, finalize=JobView(failed=True, message="BackoffLimitExceeded"))
    )
    failed = conditions(reduce_train("s3://b/sd", final))["Failed"]
    assert failed["message"] == "latents phase: finalize failed: BackoffLimitExceeded"


def test_after_the_latents_phase_the_run_trains_and_keeps_its_latents_conditions() -> None:
    finalized = ShardedView(
        plan=DONE, plan_units=2, units=JobView(complete=True, completed_indexes="0-1"), finalize=DONE
    )
    previous = {"phase": "Running", "progress": "latents 2/2", "units": {"total": 2, "succeeded": 2}}

    waiting = reduce_train("s3://b/sd", observe(finalized, previous=previous))
    assert waiting["phase"] == "Pending"  # the train Job is applied in this same pass
    running = reduce_train(
        "s3://b/sd",
        observe(finalized, previous=previous, job=JobView(active=1), train_status={"progress": "1/8"}),
    )
    assert running["phase"] == "Running"
    assert running["progress"] == "1/8"
    assert running["units"] == {"total": 2, "succeeded": 2, "failed": 0}
    found = conditions(running)
    assert [found[t]["status"] for t in ("LatentsPlanned", "LatentsUnitsComplete", "LatentsFinalized")] == [
        "True",
        "True",
        "True",
    ]
    assert found["Trained"]["status"] == "False"
    done = reduce_train("s3://b/sd", observe(finalized, previous=running, job=DONE))
    assert done["phase"] == "Succeeded"
    assert conditions(done)["Trained"]["status"] == "True"


def test_the_operator_applies_the_latents_jobs_with_the_planned_unit_count() -> None:
    from commoncanvas_operator import handlers

    body = latents_run()
    work = builders.latents_work(body)
    observed = observe(ShardedView(plan=DONE, plan_units=7, units=JobView(active=2)))

    children = handlers.train_children(body, observed, work)

    assert [c["metadata"]["name"] for c in children] == ["sd-job", "sd-latents-plan", "sd-latents-units"]
    assert children[2]["spec"]["completions"] == 7  # 7 units, fewer than the run's 32 GPUs
    finalized = ShardedView(plan=DONE, plan_units=7, units=DONE, finalize=DONE)
    names = [c["metadata"]["name"] for c in handlers.train_children(body, observe(finalized), work)]
    assert names[-2:] == ["sd-rdzv", "sd-train"]

"""The operator's TrainRun support: the rendezvous Service and Indexed Job it builds, and its status."""

from __future__ import annotations

import shlex
from typing import Any

import pytest
import yaml

from commoncanvas_operator import builders
from commoncanvas_operator.reducers import (
    JobView,
    TrainObserved,
    Upstream,
    reduce_train,
    train_steps,
)
from commoncanvas_operator.settings import NodePool, Settings

SETTINGS = Settings()
NOW = "2026-01-01T00:00:00Z"


def train_run(distributed: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "commoncanvas.dev/v1alpha1",
        "kind": "TrainRun",
        "metadata": {"name": "sd", "namespace": "ml", "annotations": {"commoncanvas.dev/x": "1"}},
        "spec": {
            "dataset": {"captionJobRef": "caps"},
            "output": {"uri": "s3://b/sd"},
            "checkpoint": {"uri": "s3://b/sd-ckpt"},
            "distributed": distributed or {"minNodes": 2, "maxNodes": 4, "gpusPerNode": 8, "maxRestarts": 5},
            **spec,
        },
    }


def train_job(body: dict[str, Any] | None = None, settings: Settings = SETTINGS) -> dict[str, Any]:
    return builders.build_train_job(body or train_run(), settings, "s3://b/caps")


def torchrun(job: dict[str, Any]) -> list[str]:
    [container] = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["bash"] and container["args"][0] == "-c"
    return shlex.split(container["args"][1])


def test_rdzv_service_is_headless_selects_the_train_pods_and_publishes_unready_ones() -> None:
    service = builders.build_rdzv_service("sd")
    pod_labels = train_job()["spec"]["template"]["metadata"]["labels"]

    assert service["metadata"]["name"] == "sd-rdzv"
    spec = service["spec"]
    assert spec["clusterIP"] == "None"
    assert spec["publishNotReadyAddresses"] is True
    assert spec["ports"] == [{"name": "c10d", "port": 29500, "targetPort": 29500, "protocol": "TCP"}]
    assert spec["selector"].items() <= pod_labels.items()


def test_train_job_is_indexed_one_pod_per_node_under_the_service_subdomain() -> None:
    job = train_job()
    spec = job["spec"]

    assert job["metadata"]["name"] == "sd-train"
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 4
    assert spec["backoffLimit"] == 5
    assert spec["suspend"] is False
    assert spec["podFailurePolicy"]["rules"] == [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}
    ]
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == "sd-rdzv"
    assert pod["restartPolicy"] == "Never"
    assert spec["template"]["metadata"]["annotations"] == {"commoncanvas.dev/x": "1"}


def test_train_pods_run_torchrun_with_the_elastic_c10d_rendezvous_on_rank_0() -> None:
    argv = torchrun(train_job())

    assert argv[0] == "torchrun"
    assert argv[argv.index("--nnodes") + 1] == "2:4"
    assert argv[argv.index("--nproc_per_node") + 1] == "8"
    assert argv[argv.index("--rdzv_backend") + 1] == "c10d"
    assert argv[argv.index("--max-restarts") + 1] == "5"
    assert argv[argv.index("--rdzv_id") + 1] == "sd"
    assert argv[argv.index("--rdzv_endpoint") + 1].endswith(":29500")
    assert argv[-4:] == ["commoncanvas.train", builders.JOB_FILE, "--name", "sd"]


def test_train_pods_get_gpus_the_pool_env_and_the_job_file() -> None:
    pod = train_job()["spec"]["template"]["spec"]
    [container] = pod["containers"]

    assert container["image"] == SETTINGS.gpu_image
    assert container["resources"]["requests"][builders.GPU_RESOURCE] == "8"
    assert container["resources"]["limits"] == {builders.GPU_RESOURCE: "8"}
    assert pod["nodeSelector"] == SETTINGS.pool("a100").node_selector
    assert pod["tolerations"] == SETTINGS.pool("a100").tolerations
    env = {e["name"]: e for e in container["env"]}
    assert env["TORCHX_RANK0_HOST"]["value"] == "sd-train-0.sd-rdzv"
    assert env["METRICS_PORT"]["value"] == str(SETTINGS.metrics_port)
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == SETTINGS.object_store_secret
    assert env["S3_ENDPOINT_URL"]["valueFrom"]["configMapKeyRef"]["optional"] is True
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "metrics": SETTINGS.metrics_port,
        "c10d": 29500,
    }
    assert pod["volumes"][0]["configMap"]["name"] == "sd-job"


def test_train_pods_have_the_checkpoints_grace_period_to_save_after_sigterm() -> None:
    """Kueue preemption and suspend delete the pods: the default 30 s would kill a checkpoint mid-write."""
    assert train_job()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 300
    body = train_run()
    body["spec"]["checkpoint"]["terminationGracePeriodSeconds"] = 900
    assert train_job(body)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 900


def test_train_pods_are_hardened_keep_their_shared_memory_and_write_under_tmp() -> None:
    pod = train_job()["spec"]["template"]["spec"]
    [container] = pod["containers"]

    assert pod["securityContext"] == SETTINGS.worker_pod_security_context
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"] == {"name": "dshm", "emptyDir": {"medium": "Memory"}}
    assert volumes["tmp"] == {"name": "tmp", "emptyDir": {}}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts == {builders.JOB_FILE_DIR: "job-file", "/dev/shm": "dshm", "/tmp": "tmp"}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["HOME"] == "/tmp/home" and env["TMPDIR"] == "/tmp"
    assert env["HF_HOME"] == "/tmp/home/.cache/huggingface"
    # Its resources come from the TrainRun, never from the stages' workerResources.
    settings = Settings.from_dict(
        {
            "workerPodSecurityContext": {"runAsUser": 4242, "runAsNonRoot": True},
            "workerSecurityContext": {"readOnlyRootFilesystem": False},
            "workerResources": {"requests": {"cpu": "1"}},
        }
    )
    pod = train_job(settings=settings)["spec"]["template"]["spec"]
    assert pod["securityContext"] == {"runAsUser": 4242, "runAsNonRoot": True}
    assert pod["containers"][0]["securityContext"] == {"readOnlyRootFilesystem": False}
    assert pod["containers"][0]["resources"]["requests"]["cpu"] == "64"


def test_train_job_follows_the_named_pool_suspend_and_cpu_only_runs() -> None:
    settings = Settings(pools={"h100": NodePool(node_selector={"gpu": "h100"}), "cpu": NodePool()})
    body = train_run({"maxNodes": 1, "gpusPerNode": 0, "nodePool": "h100"}, suspend=True)
    job = train_job(body, settings)

    pod = job["spec"]["template"]["spec"]
    assert job["spec"]["suspend"] is True
    assert job["spec"]["completions"] == 1
    assert pod["nodeSelector"] == {"gpu": "h100"} and "tolerations" not in pod
    [container] = pod["containers"]
    assert container["image"] == settings.gpu_image  # torch is there, not in the CPU image
    assert builders.GPU_RESOURCE not in container["resources"]["requests"]
    with pytest.raises(KeyError, match="a100"):
        train_job(train_run({"nodePool": "a100"}), settings)


def test_job_file_trains_on_the_caption_jobs_output() -> None:
    resource = builders.resolve_resource(train_run(), "s3://b/caps")
    config_map = builders.build_job_file(resource, train_run()["spec"])
    job_file = yaml.safe_load(config_map["data"][builders.JOB_FILE_KEY])

    assert job_file["spec"]["dataset"]["uris"] == ["s3://b/caps"]
    assert "captionJobRef" not in job_file["spec"]["dataset"]


def observe(**kwargs: Any) -> TrainObserved:
    return TrainObserved(generation=2, now=NOW, **kwargs)


def conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status["conditions"]}


def test_train_waits_for_its_caption_job_and_fails_naming_it() -> None:
    running = observe(upstream=Upstream("CaptionJob", "caps", phase="Running"))
    assert train_steps(running) == []
    status = reduce_train("s3://b/sd", running)
    assert status["phase"] == "Waiting"
    assert "CaptionJob caps" in conditions(status)["UpstreamReady"]["message"]

    failed = observe(upstream=Upstream("CaptionJob", "caps", phase="Failed", message="2 of 2 units failed"))
    status = reduce_train("s3://b/sd", failed)
    assert status["phase"] == "Failed"
    assert conditions(status)["Failed"]["message"] == "CaptionJob caps failed: 2 of 2 units failed"


def test_train_runs_while_its_job_runs_and_reports_rank_0s_status() -> None:
    ready = Upstream("CaptionJob", "caps", phase="Succeeded", output_uri="s3://b/caps")
    assert train_steps(observe(upstream=ready)) == ["job", "rdzv", "train"]
    assert reduce_train("s3://b/sd", observe(upstream=ready))["phase"] == "Pending"
    written = {
        "phase": "Running",
        "step": 120,
        "imagesSeen": 245760,
        "loss": 0.11,
        "lastCheckpoint": "s3://b/sd-ckpt/step-100",
        "restarts": 1,
        "imagesPerSecond": 812.5,
        "progress": "120/1000",
    }
    status = reduce_train(
        "s3://b/sd", observe(upstream=ready, job=JobView(active=4), train_status=written, pod_restarts=0)
    )

    assert status["phase"] == "Running"
    assert status["startTime"] == NOW
    assert {k: status[k] for k in ("step", "imagesSeen", "loss", "lastCheckpoint", "progress")} == {
        "step": 120,
        "imagesSeen": 245760,
        "loss": 0.11,
        "lastCheckpoint": "s3://b/sd-ckpt/step-100",
        "progress": "120/1000",
    }
    assert status["restarts"] == 1
    # Restarts also count from the Job's failed pods (a lost node), and never go down.
    again = reduce_train("s3://b/sd", observe(previous=status, job=JobView(active=4), job_failed_pods=3))
    assert again["restarts"] == 3 and again["step"] == 120
    assert reduce_train("s3://b/sd", observe(suspended=True, job=JobView()))["phase"] == "Suspended"


def test_train_succeeds_or_fails_with_its_job_and_stays_there() -> None:
    done = reduce_train("s3://b/sd", observe(job=JobView(complete=True)))
    assert done["phase"] == "Succeeded"
    assert done["completionTime"] == NOW
    assert done["outputs"] == {"pipeline": "s3://b/sd"}

    failed = reduce_train(
        "s3://b/sd", observe(job=JobView(failed=True, reason="BackoffLimitExceeded", message="too many"))
    )
    assert failed["phase"] == "Failed"
    assert conditions(failed)["Failed"]["reason"] == "BackoffLimitExceeded"
    assert "too many" in conditions(failed)["Failed"]["message"]
    later = reduce_train("s3://b/sd", observe(previous=failed, job=JobView(active=1)))
    assert later["phase"] == "Failed"


def test_invalid_train_spec_fails_without_children() -> None:
    observed = observe(
        invalid="spec.distributed.nodePool: node pool 'h100' is not one of the operator's pools"
    )
    assert train_steps(observed) == []
    status = reduce_train("s3://b/sd", observed)
    assert status["phase"] == "Failed"
    assert conditions(status)["Failed"]["reason"] == "InvalidSpec"


def test_kopfs_own_annotations_never_reach_the_pod_template() -> None:
    # kopf writes them after the Job exists, and a Job's pod template is immutable.
    body = train_run()
    body["metadata"]["annotations"].update(
        {
            "commoncanvas.dev/last-handled-configuration": "{}",
            "commoncanvas.dev/kopf-managed": "yes",
            "other.io/x": "2",
        }
    )
    assert train_job(body)["spec"]["template"]["metadata"]["annotations"] == {"commoncanvas.dev/x": "1"}


def test_train_pods_take_the_runs_priority_class_else_their_pools() -> None:
    from commoncanvas_operator.settings import NodePool

    pooled = Settings(pools={"a100": NodePool(priority_class_name="gpu-batch"), "cpu": NodePool()})
    assert train_job(settings=pooled)["spec"]["template"]["spec"]["priorityClassName"] == "gpu-batch"
    body = train_run()
    body["spec"]["priorityClassName"] = "urgent"
    assert train_job(body, pooled)["spec"]["template"]["spec"]["priorityClassName"] == "urgent"

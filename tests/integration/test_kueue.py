"""The operator under a real Kueue (v0.17.0, built with the control plane): a ClusterQueue of 16 A100
GPUs decides what runs; the operator creates queued Jobs suspended and never undoes what Kueue sets."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.cluster.harness import KUEUE_MANAGED_LABEL, LocalCluster
from tests.cluster.kubeapi import Obj
from tests.cluster.kwok_stages import RUN_DURATION_ANNOTATION
from tests.cluster.minio import MinioServer
from tests.cluster.operator import OperatorProcess
from tests.integration.test_operator import caption_job, phase, seed_plans, train_run, wait_status

pytestmark = pytest.mark.integration
KUEUE = "/apis/kueue.x-k8s.io/v1beta2"
QUEUE = "kueue.x-k8s.io/queue-name"
PRIORITY = "kueue.x-k8s.io/priority-class"


@pytest.fixture
def gpu_queue(cluster: LocalCluster, namespace: str) -> Iterator[str]:
    """A ClusterQueue of 16 A100 GPUs (preempting lower priorities) and a LocalQueue in the namespace."""
    flavor, queue = f"a100-{namespace}", f"gpus-{namespace}"
    cluster.api.patch(
        f"/api/v1/namespaces/{namespace}", {"metadata": {"labels": {KUEUE_MANAGED_LABEL: "true"}}}
    )
    cluster.apply(
        [
            {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor", "metadata": {"name": flavor}},
            {
                "apiVersion": "kueue.x-k8s.io/v1beta2",
                "kind": "ClusterQueue",
                "metadata": {"name": queue},
                "spec": {
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                    "preemption": {"withinClusterQueue": "LowerPriority"},
                    "resourceGroups": [
                        {
                            "coveredResources": ["nvidia.com/gpu", "cpu", "memory"],
                            "flavors": [
                                {
                                    "name": flavor,
                                    "resources": [
                                        {"name": "nvidia.com/gpu", "nominalQuota": 16},
                                        {"name": "cpu", "nominalQuota": 1000},
                                        {"name": "memory", "nominalQuota": "10Ti"},
                                    ],
                                }
                            ],
                        }
                    ],
                },
            },
        ],
        None,
    )
    cluster.apply(
        {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "LocalQueue",
            "metadata": {"name": "gpu-queue"},
            "spec": {"clusterQueue": queue},
        },
        namespace,
    )
    yield "gpu-queue"
    for path in (f"{KUEUE}/clusterqueues/{queue}", f"{KUEUE}/resourceflavors/{flavor}"):
        with contextlib.suppress(Exception):
            cluster.api.delete(path)


def queued_run(name: str, bucket: str, queue: str, seconds: int, priority: str = "") -> Obj:
    body = train_run(name, bucket, max_nodes=2, **{RUN_DURATION_ANNOTATION: f"{seconds}s"})
    body["metadata"]["labels"] = {QUEUE: queue, **({PRIORITY: priority} if priority else {})}
    return body


def train_phase(cluster: LocalCluster, namespace: str, name: str) -> str:
    status = cluster.api.get(f"/apis/commoncanvas.dev/v1alpha1/namespaces/{namespace}/trainruns/{name}")
    return str((status.get("status") or {}).get("phase") or "")


def test_two_train_runs_of_sixteen_gpus_run_one_after_the_other_under_a_sixteen_gpu_queue(
    cluster: LocalCluster, namespace: str, bucket: str, operator: OperatorProcess, gpu_queue: str
) -> None:
    cluster.apply(queued_run("first", bucket, gpu_queue, 12), namespace)
    wait_status(cluster, namespace, "trainruns", "first", phase("Running"), "first admitted and Running", 90)
    cluster.apply(queued_run("second", bucket, gpu_queue, 2), namespace)
    queued = wait_status(cluster, namespace, "trainruns", "second", phase("Queued"), "second Queued", 60)
    admitted = {c["type"]: c for c in queued["status"]["conditions"]}["Admitted"]
    assert admitted["status"] == "False"
    job = cluster.api.get(f"/apis/batch/v1/namespaces/{namespace}/jobs/second-train")
    assert job["spec"]["suspend"] is True and job["metadata"]["labels"][QUEUE] == gpu_queue
    assert train_phase(cluster, namespace, "first") == "Running", "the first must not be held back"
    wait_status(cluster, namespace, "trainruns", "first", phase("Succeeded"), "first Succeeded", 120)
    wait_status(
        cluster, namespace, "trainruns", "second", phase("Succeeded"), "second admitted, Succeeded", 120
    )


def test_a_higher_priority_run_preempts_a_running_one_which_is_queued_then_finishes(
    cluster: LocalCluster, namespace: str, bucket: str, operator: OperatorProcess, gpu_queue: str
) -> None:
    cluster.apply(
        [
            {
                "apiVersion": "kueue.x-k8s.io/v1beta2",
                "kind": "WorkloadPriorityClass",
                "metadata": {"name": f"low-{namespace}"},
                "value": 10,
            },
            {
                "apiVersion": "kueue.x-k8s.io/v1beta2",
                "kind": "WorkloadPriorityClass",
                "metadata": {"name": f"high-{namespace}"},
                "value": 1000,
            },
        ],
        None,
    )
    cluster.apply(queued_run("low", bucket, gpu_queue, 25, f"low-{namespace}"), namespace)
    wait_status(cluster, namespace, "trainruns", "low", phase("Running"), "low Running", 90)
    cluster.apply(queued_run("high", bucket, gpu_queue, 2, f"high-{namespace}"), namespace)
    wait_status(cluster, namespace, "trainruns", "low", phase("Queued"), "low preempted: Queued", 90)
    wait_status(cluster, namespace, "trainruns", "high", phase("Succeeded"), "high Succeeded", 120)
    wait_status(cluster, namespace, "trainruns", "low", phase("Succeeded"), "low re-admitted, Succeeded", 180)
    for name in (f"low-{namespace}", f"high-{namespace}"):
        cluster.api.delete(f"{KUEUE}/workloadpriorityclasses/{name}")


def test_a_caption_jobs_workers_are_admitted_within_quota(
    cluster: LocalCluster,
    namespace: str,
    minio: MinioServer,
    bucket: str,
    operator: OperatorProcess,
    gpu_queue: str,
    tmp_path: Path,
) -> None:
    seed_plans(minio, bucket, ("unused", 1), ("caps", 2))
    body = caption_job("caps", bucket, "unused")
    body["spec"]["input"] = {"uris": [f"s3://{bucket}/catalog"]}
    body["metadata"]["labels"] = {QUEUE: gpu_queue}
    cluster.apply(body, namespace)
    done = wait_status(
        cluster, namespace, "captionjobs", "caps", phase("Succeeded"), "CaptionJob Succeeded", 120
    )
    assert done["status"]["units"]["succeeded"] == 2
    workloads = cluster.api.get(f"{KUEUE}/namespaces/{namespace}/workloads")["items"]
    units = [w for w in workloads if w["metadata"]["ownerReferences"][0]["name"] == "caps-units"]
    assert units, "the units Job went through Kueue"
    admitted = {c["type"]: c["status"] for c in units[0]["status"]["conditions"]}
    assert admitted.get("Admitted") == "True" or admitted.get("Finished") == "True"

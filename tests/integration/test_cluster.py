"""The test control plane itself: real scheduling onto fake GPU nodes, real processes on the local
node, CRD validation by the real API server, and MinIO."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from botocore.exceptions import EndpointConnectionError
from prometheus_client import CollectorRegistry, Counter, start_http_server
from tests.cluster.harness import A100_POOL, GPU_RESOURCE, LOCAL_POOL, LocalCluster
from tests.cluster.kubeapi import ApiError, Obj, condition
from tests.cluster.kwok_stages import EXIT_CODE_ANNOTATION, FAIL_ANNOTATION, RUN_DURATION_ANNOTATION
from tests.cluster.minio import MinioServer
from tests.cluster.processes import free_port
from tests.cluster.prometheus import PrometheusServer

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = REPO_ROOT / "manifests" / "crds"
EXAMPLES_DIR = REPO_ROOT / "manifests" / "examples"


def indexed_job(name: str, *, completions: int, tolerate_gpu_taint: bool = True) -> Obj:
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "nodeSelector": A100_POOL.node_selector,
        "containers": [
            {
                "name": "worker",
                "image": "commoncanvas/worker-gpu:test",
                "command": ["commoncanvas", "caption"],
                "resources": {"limits": {GPU_RESOURCE: "1"}},
            }
        ],
    }
    if tolerate_gpu_taint:
        pod_spec["tolerations"] = A100_POOL.tolerations
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "completions": completions,
            "parallelism": completions,
            "completionMode": "Indexed",
            "backoffLimitPerIndex": 0,
            "template": {"spec": pod_spec},
        },
    }


def job_pods(cluster: LocalCluster, namespace: str, job: str) -> list[Obj]:
    pods = cluster.api.get(
        f"/api/v1/namespaces/{namespace}/pods",
        params={"labelSelector": f"batch.kubernetes.io/job-name={job}"},
    )
    items: list[Obj] = pods["items"]
    return items


def condition_true(condition_type: str) -> Any:
    return lambda obj: (condition(obj, condition_type) or {}).get("status") == "True"


def test_indexed_gpu_job_is_scheduled_on_a100_nodes_and_completes(
    cluster: LocalCluster, namespace: str
) -> None:
    cluster.api.create(f"/apis/batch/v1/namespaces/{namespace}/jobs", indexed_job("caption", completions=3))

    cluster.api.wait_for(
        f"/apis/batch/v1/namespaces/{namespace}/jobs/caption", condition_true("Complete"), 60, "Job Complete"
    )

    pods = job_pods(cluster, namespace, "caption")
    a100_nodes = set(cluster.node_names(A100_POOL))
    assert {pod["spec"]["nodeName"] for pod in pods} <= a100_nodes
    assert {pod["status"]["phase"] for pod in pods} == {"Succeeded"}
    indexes = {pod["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] for pod in pods}
    assert indexes == {"0", "1", "2"}


def test_gpu_job_without_the_toleration_stays_unschedulable(cluster: LocalCluster, namespace: str) -> None:
    job = indexed_job("untolerated", completions=1, tolerate_gpu_taint=False)
    cluster.api.create(f"/apis/batch/v1/namespaces/{namespace}/jobs", job)

    def unschedulable(pod_list: Obj) -> bool:
        return any(
            (condition(pod, "PodScheduled") or {}).get("reason") == "Unschedulable"
            for pod in pod_list["items"]
        )

    pod_list = cluster.api.wait_for(
        f"/api/v1/namespaces/{namespace}/pods?labelSelector=batch.kubernetes.io/job-name=untolerated",
        unschedulable,
        60,
        "the pod marked Unschedulable",
    )
    [pod] = pod_list["items"]
    scheduled = condition(pod, "PodScheduled")
    assert scheduled is not None and scheduled["status"] == "False"
    # Since Kubernetes 1.37 the scheduler no longer names the taint's key, only "untolerated taint(s)";
    # the A100 nodes are the ones that match the selector, so the taint is theirs.
    assert "untolerated taint" in scheduled["message"]
    assert "nodeName" not in pod["spec"]


def test_annotated_pod_fails_with_the_exit_code_it_asks_for(cluster: LocalCluster, namespace: str) -> None:
    job = indexed_job("fails", completions=1)
    job["spec"]["template"]["metadata"] = {
        "annotations": {FAIL_ANNOTATION: "true", EXIT_CODE_ANNOTATION: "42"}
    }
    cluster.api.create(f"/apis/batch/v1/namespaces/{namespace}/jobs", job)

    cluster.api.wait_for(
        f"/apis/batch/v1/namespaces/{namespace}/jobs/fails", condition_true("Failed"), 60, "Job Failed"
    )
    [pod] = job_pods(cluster, namespace, "fails")
    assert pod["status"]["phase"] == "Failed"
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 42


def test_lost_node_pod_is_replaced_when_disruptions_are_ignored(
    cluster: LocalCluster, namespace: str
) -> None:
    job = indexed_job("survivor", completions=1)
    job["spec"]["template"]["metadata"] = {"annotations": {RUN_DURATION_ANNOTATION: "600s"}}
    job["spec"]["podFailurePolicy"] = {
        "rules": [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}]
    }
    spare = cluster.create_node(f"a100-spare-{namespace}", A100_POOL)["metadata"]["name"]
    jobs_path = f"/apis/batch/v1/namespaces/{namespace}/jobs"
    pods_path = f"/api/v1/namespaces/{namespace}/pods?labelSelector=batch.kubernetes.io/job-name%3Dsurvivor"
    lost: str | None = None
    try:
        cluster.api.create(jobs_path, job)
        running = cluster.api.wait_for(
            pods_path,
            lambda pods: any(p.get("status", {}).get("phase") == "Running" for p in pods["items"]),
            60,
            "the first pod Running",
        )["items"][0]
        lost = running["spec"]["nodeName"]

        cluster.delete_node(running["spec"]["nodeName"], gc_pods_now=True)

        def replaced(pods: Obj) -> bool:
            return any(
                p["metadata"]["uid"] != running["metadata"]["uid"]
                and p.get("status", {}).get("phase") == "Running"
                for p in pods["items"]
            )

        cluster.api.wait_for(pods_path, replaced, 60, "a replacement pod Running on another node")
        survivor = cluster.api.get(f"{jobs_path}/survivor")
        assert survivor["status"].get("failed", 0) == 0
        assert condition(survivor, "Failed") is None
    finally:
        # Leave the A100 pool as the other tests expect it: no pods left, the spare gone, the lost back.
        cluster.api.delete(f"{jobs_path}/survivor", body={"propagationPolicy": "Background"})
        cluster.api.wait_for(pods_path, lambda pods: not pods["items"], 60, "the Job's pods gone")
        cluster.delete_node(spare)
        if lost is not None and lost != spare:
            cluster.create_node(lost, A100_POOL)


def local_pod(name: str, script: str, env: list[Obj]) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "podrunner-test"}},
        "spec": {
            "restartPolicy": "Never",
            "nodeSelector": LOCAL_POOL.node_selector,
            "tolerations": LOCAL_POOL.tolerations,
            "containers": [
                {"name": "main", "image": "local", "command": ["python", "-c"], "args": [script], "env": env}
            ],
        },
    }


def test_local_pool_pod_runs_its_command_and_reports_the_exit_code(
    cluster: LocalCluster, namespace: str
) -> None:
    cluster.api.create(
        f"/api/v1/namespaces/{namespace}/secrets",
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "creds"},
            "stringData": {"key": "s3cr3t"},
        },
    )
    script = (
        "import os, pathlib\n"
        "pathlib.Path('out.txt').write_text(os.environ['GREETING'] + ' ' + os.environ['SECRET'])\n"
        "print('hello from', os.environ['POD_NAME'], os.environ['ARGS_SEEN'])\n"
        "raise SystemExit(3)\n"
    )
    env: list[Obj] = [
        {"name": "GREETING", "value": "hi"},
        {"name": "ARGS_SEEN", "value": "$(GREETING)-expanded"},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "SECRET", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "key"}}},
    ]
    cluster.api.create(f"/api/v1/namespaces/{namespace}/pods", local_pod("exit3", script, env))

    pod = cluster.api.wait_for(
        f"/api/v1/namespaces/{namespace}/pods/exit3",
        lambda p: p.get("status", {}).get("phase") in ("Succeeded", "Failed"),
        60,
        "the local pod to finish",
    )

    assert pod["status"]["phase"] == "Failed"
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 3
    assert "hello from exit3 hi-expanded" in terminated["message"]
    assert "hello from exit3" in cluster.pod_log(namespace, "exit3")
    [written] = list(cluster.pods_dir.glob(f"*/{namespace}_exit3_*/work/out.txt"))
    assert written.read_text() == "hi s3cr3t"


def test_local_pod_acts_as_its_service_account(cluster: LocalCluster, namespace: str) -> None:
    kubectl = str(cluster.bin_dir / "kubectl")
    pod = local_pod("whoami", "", [])
    pod["spec"]["containers"][0]["command"] = [
        kubectl,
        "auth",
        "whoami",
        "-o=jsonpath={.status.userInfo.username}",
    ]
    pod["spec"]["containers"][0]["args"] = []
    cluster.api.create(f"/api/v1/namespaces/{namespace}/pods", pod)

    finished = cluster.api.wait_for(
        f"/api/v1/namespaces/{namespace}/pods/whoami",
        lambda p: p.get("status", {}).get("phase") in ("Succeeded", "Failed"),
        60,
        "the local pod to finish",
    )

    assert finished["status"]["phase"] == "Succeeded", cluster.pod_log(namespace, "whoami")
    assert cluster.pod_log(namespace, "whoami").strip() == f"system:serviceaccount:{namespace}:default"


def test_indexed_job_on_the_local_pool_runs_each_index(cluster: LocalCluster, namespace: str) -> None:
    marker_dir = cluster.state_dir / "markers" / namespace
    marker_dir.mkdir(parents=True)
    script = (
        f"import os, pathlib; pathlib.Path({str(marker_dir)!r}, os.environ['JOB_COMPLETION_INDEX']).touch()"
    )
    pod = local_pod("unused", script, [])
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "local-units"},
        "spec": {
            "completions": 3,
            "parallelism": 2,
            "completionMode": "Indexed",
            "template": {"spec": pod["spec"]},
        },
    }
    cluster.api.create(f"/apis/batch/v1/namespaces/{namespace}/jobs", job)

    cluster.api.wait_for(
        f"/apis/batch/v1/namespaces/{namespace}/jobs/local-units",
        condition_true("Complete"),
        90,
        "Job Complete",
    )
    assert sorted(path.name for path in marker_dir.iterdir()) == ["0", "1", "2"]


def _crd_documents() -> list[Obj]:
    documents: list[Obj] = []
    for path in sorted(CRD_DIR.glob("*.yaml")):
        documents += [
            d for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] == "CustomResourceDefinition"
        ]
    return documents


def test_crds_are_accepted_and_invalid_instances_rejected(cluster: LocalCluster, namespace: str) -> None:
    crds = _crd_documents()
    assert crds, f"no CustomResourceDefinition in {CRD_DIR}"
    for path in sorted(CRD_DIR.glob("*.yaml")):
        cluster.kubectl("apply", "--server-side", "-f", str(path))
    for crd in crds:
        cluster.api.wait_for(
            f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd['metadata']['name']}",
            condition_true("Established"),
            30,
            f"CRD {crd['metadata']['name']} Established",
        )

    [scrape_crd] = [crd for crd in crds if crd["spec"]["names"]["kind"] == "ScrapeJob"]
    group = scrape_crd["spec"]["group"]
    version = next(v["name"] for v in scrape_crd["spec"]["versions"] if v.get("storage"))
    plural = scrape_crd["spec"]["names"]["plural"]
    invalid = {
        "apiVersion": f"{group}/{version}",
        "kind": "ScrapeJob",
        "metadata": {"name": f"invalid-{uuid.uuid4().hex[:6]}"},
        "spec": {"parallelism": -1},
    }
    with pytest.raises(ApiError) as rejected:
        cluster.api.create(f"/apis/{group}/{version}/namespaces/{namespace}/{plural}", invalid)
    assert rejected.value.status_code == 422
    assert "spec.parallelism: Invalid value" in rejected.value.message

    # The shipped examples must pass the same server-side validation.
    kinds = {crd["spec"]["names"]["kind"] for crd in crds}
    for path in sorted(EXAMPLES_DIR.glob("*.yaml")):
        documents = [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") in kinds]
        if documents:
            cluster.kubectl(
                "apply",
                "--dry-run=server",
                f"--namespace={namespace}",
                "-f",
                "-",
                input=yaml.safe_dump_all(documents),
            )


def test_minio_keeps_objects_across_a_restart(minio: MinioServer, bucket: str) -> None:
    client = minio.client()
    client.put_object(Bucket=bucket, Key="units/000001.json", Body=b'{"ok": 1}')

    minio.stop()
    with pytest.raises(EndpointConnectionError):
        client.get_object(Bucket=bucket, Key="units/000001.json")
    minio.start()

    body = client.get_object(Bucket=bucket, Key="units/000001.json")["Body"].read()
    assert body == b'{"ok": 1}'
    assert set(minio.env()) == {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_DEFAULT_REGION",
        "S3_ENDPOINT_URL",
    }


def test_prometheus_scrapes_a_metrics_endpoint(
    start_prometheus: Callable[[Sequence[str]], PrometheusServer],
) -> None:
    registry = CollectorRegistry()
    Counter("commoncanvas_selftest_samples", "samples seen by this test", registry=registry).inc(7)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        prometheus = start_prometheus([f"127.0.0.1:{port}"])
        assert prometheus.wait_for_value("commoncanvas_selftest_samples_total") == 7.0
    finally:
        server.shutdown()
        thread.join()

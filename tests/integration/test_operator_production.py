"""The operator as production clusters use it, on the real control plane (chart RBAC, its
ServiceAccount): a `helm upgrade` mid-run, `kubectl wait`, suspend and resume, and Jobs a queue
(Kueue's labels) owns once created."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.cluster.harness import CPU_POOL, LocalCluster
from tests.cluster.kubeapi import Obj
from tests.cluster.kwok_stages import RUN_DURATION_ANNOTATION
from tests.cluster.minio import MinioServer
from tests.cluster.operator import CHART, SETTINGS_ENV, OperatorProcess, helm, installed_operator
from tests.integration.test_operator import jobs, phase, scrape_job, seed_plans, wait_status

pytestmark = pytest.mark.integration
API = "/apis/commoncanvas.dev/v1alpha1"
QUEUE = "kueue.x-k8s.io/queue-name"


@pytest.fixture
def chart_operator(
    cluster: LocalCluster, namespace: str, minio: MinioServer, tmp_path: Path
) -> Iterator[tuple[OperatorProcess, dict[str, str]]]:
    values = {"nodePools": {"cpu": {"nodeSelector": CPU_POOL.node_selector, "tolerations": []}}}
    with installed_operator(cluster, namespace, minio, tmp_path, values) as env:
        running = OperatorProcess(namespace, env, tmp_path / "operator.log")
        running.start()
        try:
            yield running, env
        finally:
            running.kill()
            print(running.log_tail())


def conditions_of(status: Obj) -> dict[str, Obj]:
    return {c["type"]: c for c in status.get("conditions") or []}


def job(cluster: LocalCluster, namespace: str, name: str) -> Obj:
    found: Obj = cluster.api.get(f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}")
    return found


def test_a_helm_upgrade_mid_run_keeps_every_resource_reconciling_and_creates_nothing_twice(
    cluster: LocalCluster,
    namespace: str,
    minio: MinioServer,
    bucket: str,
    chart_operator: tuple[OperatorProcess, dict[str, str]],
    tmp_path: Path,
) -> None:
    operator, env = chart_operator
    seed_plans(minio, bucket, ("done", 1), ("unused", 1))
    seed_plans(minio, bucket, ("busy", 2), ("unused", 1))
    cluster.apply(scrape_job("done", bucket), namespace)
    finished = wait_status(cluster, namespace, "scrapejobs", "done", phase("Succeeded"), "done Succeeded")
    cluster.apply(scrape_job("busy", bucket, **{RUN_DURATION_ANNOTATION: "25s"}), namespace)
    wait_status(
        cluster,
        namespace,
        "scrapejobs",
        "busy",
        lambda s: (s.get("units") or {}).get("total") == 2,
        "busy planned",
    )
    uids = {
        j["metadata"]["name"]: j["metadata"]["uid"]
        for r in ("done", "busy")
        for j in jobs(cluster, namespace, r)
    }

    # The upgrade: new worker images and changed workers.* values, every pod template changes.
    values = yaml.safe_load((tmp_path / "values.yaml").read_text())
    values["workers"].update(
        cpuImage="commoncanvas/worker:0.2.0",
        gpuImage="commoncanvas/worker-gpu:0.2.0",
        resources={"requests": {"cpu": "250m"}},
    )
    (tmp_path / "values.yaml").write_text(yaml.safe_dump(values))
    release = f"cc-{namespace}"
    upgraded = helm(
        cluster,
        "upgrade",
        release,
        str(CHART),
        f"--namespace={namespace}",
        f"--values={tmp_path / 'values.yaml'}",
        "--wait",
        "--timeout=60s",
        check=False,
    )
    assert upgraded.returncode == 0, upgraded.stderr
    settings = cluster.api.get(f"/api/v1/namespaces/{namespace}/configmaps/{release}-operator")
    Path(env[SETTINGS_ENV]).write_text(settings["data"]["settings.json"])
    operator.kill()
    restarted = OperatorProcess(namespace, env, tmp_path / "operator-upgraded.log")
    restarted.start()
    try:
        busy = wait_status(
            cluster, namespace, "scrapejobs", "busy", phase("Succeeded"), "busy Succeeded", 120
        )
        time.sleep(3)  # a few more passes over both, finished
        done = cluster.api.get(f"{API}/namespaces/{namespace}/scrapejobs/done")
    finally:
        restarted.kill()
        print(restarted.log_tail())
    assert done["status"] == finished["status"], "a finished resource's status must not change"
    drift = conditions_of(busy["status"])["TemplateDrift"]
    assert (
        drift["status"] == "True"
        and "busy-units kept as it runs (immutable: spec.template)" in drift["message"]
    )
    after = {
        j["metadata"]["name"]: j["metadata"]["uid"]
        for r in ("done", "busy")
        for j in jobs(cluster, namespace, r)
    }
    assert all(after[name] == uid for name, uid in uids.items()), "no Job was created twice"
    finalize = job(cluster, namespace, "busy-finalize")
    assert finalize["spec"]["template"]["spec"]["containers"][0]["image"] == "commoncanvas/worker:0.2.0"
    reasons = {
        e["reason"]
        for e in cluster.api.get(f"/api/v1/namespaces/{namespace}/events")["items"]
        if e["involvedObject"].get("name") == "busy"
    }
    assert "TemplateDrift" in reasons


def test_kubectl_wait_for_condition_succeeded_returns_and_suspend_pauses_a_stage(
    cluster: LocalCluster,
    namespace: str,
    minio: MinioServer,
    bucket: str,
    chart_operator: tuple[OperatorProcess, dict[str, str]],
) -> None:
    seed_plans(minio, bucket, ("paused", 2), ("unused", 1))
    body = scrape_job("paused", bucket, **{RUN_DURATION_ANNOTATION: "5s"})
    body["spec"]["suspend"] = True
    cluster.apply(body, namespace)
    suspended = wait_status(cluster, namespace, "scrapejobs", "paused", phase("Suspended"), "Suspended")
    assert conditions_of(suspended["status"])["Succeeded"]["status"] == "False"
    assert job(cluster, namespace, "paused-units")["spec"]["suspend"] is True
    path = f"{API}/namespaces/{namespace}/scrapejobs/paused"
    cluster.api.patch(path, {"spec": {"suspend": False}})
    waited = subprocess.run(
        [
            str(cluster.bin_dir / "kubectl"),
            f"--kubeconfig={cluster.kubeconfig}",
            f"--namespace={namespace}",
            "wait",
            "--for=condition=Succeeded",
            "scrapejob/paused",
            "--timeout=90s",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert waited.returncode == 0, waited.stderr
    status = cluster.api.get(path)["status"]
    assert status["phase"] == "Succeeded"
    assert {c["type"]: c["status"] for c in status["conditions"]}.items() >= {
        "Succeeded": "True",
        "Failed": "False",
    }.items()
    assert all(
        c["observedGeneration"] == cluster.api.get(path)["metadata"]["generation"]
        for c in status["conditions"]
    )


def admit(cluster: LocalCluster, namespace: str, name: str, **spec: Any) -> None:
    """What Kueue does on admission: unsuspend the Job (partial admission may lower parallelism)."""
    cluster.api.wait_for(f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}", lambda j: True, 60, name)
    cluster.api.patch(
        f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}", {"spec": {"suspend": False, **spec}}
    )


def test_under_a_queue_every_job_is_created_suspended_and_what_the_queue_sets_is_never_undone(
    cluster: LocalCluster,
    namespace: str,
    minio: MinioServer,
    bucket: str,
    chart_operator: tuple[OperatorProcess, dict[str, str]],
) -> None:
    seed_plans(minio, bucket, ("queued", 3), ("unused", 1))
    body = scrape_job("queued", bucket)
    body["metadata"]["labels"] = {QUEUE: "gpu-queue", "kueue.x-k8s.io/priority-class": "high"}
    cluster.apply(body, namespace)
    queued = wait_status(cluster, namespace, "scrapejobs", "queued", phase("Queued"), "Queued")
    assert conditions_of(queued["status"])["Admitted"]["status"] == "False"
    plan = job(cluster, namespace, "queued-plan")
    assert plan["spec"]["suspend"] is True
    assert plan["metadata"]["labels"][QUEUE] == "gpu-queue"
    assert plan["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "high"
    admit(cluster, namespace, "queued-plan")
    admit(cluster, namespace, "queued-units", parallelism=1)  # admitted partially: one worker of two
    time.sleep(3)  # several reconciles: none may set suspend or parallelism back
    units = job(cluster, namespace, "queued-units")
    assert units["spec"]["suspend"] is False and units["spec"]["parallelism"] == 1
    assert units["metadata"]["labels"][QUEUE] == "gpu-queue"
    admit(cluster, namespace, "queued-finalize")
    done = wait_status(cluster, namespace, "scrapejobs", "queued", phase("Succeeded"), "Succeeded", 90)
    assert done["status"]["units"]["succeeded"] == 3


def operator_counter(operator: OperatorProcess, name: str, **labels: str) -> float:
    """A counter of the operator's /metrics summed over its series, or over those with `labels`."""
    from tests.integration.test_operator import http_get

    code, text = http_get(f"http://127.0.0.1:{operator.metrics_port}/metrics")
    assert code == 200, text
    wanted = [f'{key}="{value}"' for key, value in labels.items()]
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(f"{name}{{") and all(label in line for label in wanted)
    )


def test_a_finished_resource_costs_no_api_request(
    cluster: LocalCluster,
    namespace: str,
    minio: MinioServer,
    bucket: str,
    chart_operator: tuple[OperatorProcess, dict[str, str]],
) -> None:
    operator, _ = chart_operator
    seed_plans(minio, bucket, ("quiet", 1), ("unused", 1))
    cluster.apply(scrape_job("quiet", bucket), namespace)
    finished = wait_status(cluster, namespace, "scrapejobs", "quiet", phase("Succeeded"), "Succeeded")
    time.sleep(2)  # the pass that wrote Succeeded is over
    requests = operator_counter(operator, "commoncanvas_operator_api_requests_total")
    skips = operator_counter(operator, "commoncanvas_operator_finished_skips_total")
    time.sleep(5)  # five reconcile intervals
    assert operator_counter(operator, "commoncanvas_operator_finished_skips_total") >= skips + 3
    assert operator_counter(operator, "commoncanvas_operator_api_requests_total") == requests
    assert cluster.api.get(f"{API}/namespaces/{namespace}/scrapejobs/quiet")["status"] == finished["status"]
    from tests.integration.test_operator import http_get

    code, text = http_get(f"http://127.0.0.1:{operator.liveness}/healthz")
    assert code == 200 and 0 <= json.loads(text)["lastReconcileAgeSeconds"] < 5, text


def test_a_running_resource_reads_its_jobs_from_the_watch_not_a_get_per_pass(
    cluster: LocalCluster,
    namespace: str,
    minio: MinioServer,
    bucket: str,
    chart_operator: tuple[OperatorProcess, dict[str, str]],
) -> None:
    operator, _ = chart_operator
    requests = "commoncanvas_operator_api_requests_total"
    seed_plans(minio, bucket, ("running", 2), ("unused", 1))
    cluster.apply(scrape_job("running", bucket, **{RUN_DURATION_ANNOTATION: "12s"}), namespace)
    wait_status(
        cluster,
        namespace,
        "scrapejobs",
        "running",
        lambda s: (s.get("units") or {}).get("total") == 2,
        "running planned",
    )
    time.sleep(1)  # the pass that read the finished plan's pods is over
    job_reads = operator_counter(operator, requests, verb="GET", resource="jobs")
    pod_reads = operator_counter(operator, requests, verb="GET", resource="pods")
    reconciles = "commoncanvas_operator_reconciles_total"
    passes = operator_counter(operator, reconciles, kind="ScrapeJob")
    time.sleep(4)  # four reconcile intervals while the units run
    status = cluster.api.get(f"{API}/namespaces/{namespace}/scrapejobs/running")["status"]
    assert status["phase"] == "Running", status
    assert operator_counter(operator, reconciles, kind="ScrapeJob") >= passes + 3
    assert operator_counter(operator, requests, verb="GET", resource="jobs") == job_reads
    # The finished plan's pods were listed once for its unit count, not once a pass.
    assert operator_counter(operator, requests, verb="GET", resource="pods") == pod_reads
    # The Jobs' progress still reaches the status: through the watch the index is fed by.
    done = wait_status(cluster, namespace, "scrapejobs", "running", phase("Succeeded"), "Succeeded", 90)
    assert done["status"]["units"]["succeeded"] == 2
    assert operator_counter(operator, requests, verb="GET", resource="jobs") == job_reads


def anchor_secret(cluster: LocalCluster, namespace: str, name: str) -> None:
    cluster.api.create(
        f"/api/v1/namespaces/{namespace}/secrets",
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "type": "Opaque"},
    )


def test_a_rotated_token_is_picked_up_without_a_restart(
    cluster: LocalCluster, namespace: str, minio: MinioServer, bucket: str, tmp_path: Path
) -> None:
    values = {"nodePools": {"cpu": {"nodeSelector": CPU_POOL.node_selector, "tolerations": []}}}
    with installed_operator(cluster, namespace, minio, tmp_path, values) as env:
        account = f"cc-{namespace}-operator"
        anchor_secret(cluster, namespace, "token-anchor-1")
        kubeconfig = cluster.service_account_kubeconfig(namespace, account, "10m", "token-anchor-1")
        operator = OperatorProcess(
            namespace, {**env, "KUBECONFIG": str(kubeconfig)}, tmp_path / "operator.log"
        )
        operator.start()
        try:
            seed_plans(minio, bucket, ("before", 1), ("after", 1))
            cluster.apply(scrape_job("before", bucket), namespace)
            wait_status(cluster, namespace, "scrapejobs", "before", phase("Succeeded"), "before Succeeded")
            # The kubelet rotates a projected token on disk; here: a new token in the same file, and
            # the one the operator started with invalidated (its bound Secret deleted).
            anchor_secret(cluster, namespace, "token-anchor-2")
            assert (
                cluster.service_account_kubeconfig(namespace, account, "10m", "token-anchor-2") == kubeconfig
            )
            cluster.api.delete(f"/api/v1/namespaces/{namespace}/secrets/token-anchor-1")
            seed_plans(minio, bucket, ("after", 1), ("unused", 1))
            cluster.apply(scrape_job("after", bucket), namespace)
            wait_status(cluster, namespace, "scrapejobs", "after", phase("Succeeded"), "after Succeeded", 90)
        finally:
            operator.kill()
            print(operator.log_tail())


def test_a_request_the_api_server_refuses_is_a_condition_not_a_retry_storm_and_clears_once_allowed(
    cluster: LocalCluster,
    namespace: str,
    minio: MinioServer,
    bucket: str,
    chart_operator: tuple[OperatorProcess, dict[str, str]],
) -> None:
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "no-jobs"},
        "spec": {"hard": {"count/jobs.batch": "0"}},
    }
    cluster.apply(quota, namespace)
    seed_plans(minio, bucket, ("capped", 1), ("unused", 1))
    cluster.apply(scrape_job("capped", bucket), namespace)
    refused = wait_status(
        cluster,
        namespace,
        "scrapejobs",
        "capped",
        lambda s: "ApplyRefused" in conditions_of(s),
        "ApplyRefused",
    )
    condition = conditions_of(refused["status"])["ApplyRefused"]
    assert condition["reason"] == "HTTP403" and "exceeded quota" in condition["message"]
    cluster.api.delete(f"/api/v1/namespaces/{namespace}/resourcequotas/no-jobs")
    done = wait_status(cluster, namespace, "scrapejobs", "capped", phase("Succeeded"), "Succeeded", 90)
    assert "ApplyRefused" not in conditions_of(done["status"])

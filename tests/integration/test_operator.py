"""The operator on the real control plane: installed with the chart's RBAC, run as its ServiceAccount.

kwok plays the kubelet, so no worker really runs: each stage's plan (and a TrainRun's latents plan) is
seeded in MinIO (what the plan pod would have written), and the finalize step leaves no summary.json,
which the operator tolerates.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from tests.cluster.harness import A100_POOL, CPU_POOL, GPU_RESOURCE, LocalCluster
from tests.cluster.kubeapi import ApiError, Obj
from tests.cluster.kwok_stages import FAIL_ANNOTATION, RUN_DURATION_ANNOTATION
from tests.cluster.minio import MinioServer
from tests.cluster.operator import OperatorProcess, installed_operator

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "charts" / "commoncanvas"
API = "/apis/commoncanvas.dev/v1alpha1"


def scrape_job(name: str, bucket: str, **annotations: str) -> Obj:
    return {
        "apiVersion": "commoncanvas.dev/v1alpha1",
        "kind": "ScrapeJob",
        "metadata": {"name": name, "annotations": annotations},
        "spec": {
            "source": {"uri": f"s3://{bucket}/yfcc.tsv"},
            "output": {"uri": f"s3://{bucket}/{name}"},
            "parallelism": 2,
        },
    }


def caption_job(name: str, bucket: str, scrape: str) -> Obj:
    return {
        "apiVersion": "commoncanvas.dev/v1alpha1",
        "kind": "CaptionJob",
        "metadata": {"name": name},
        "spec": {
            "input": {"scrapeJobRef": scrape},
            "output": {"uri": f"s3://{bucket}/{name}"},
            "gpusPerPod": 2,
            "parallelism": 2,
        },
    }


def seed_plans(minio: MinioServer, bucket: str, scrape: tuple[str, int], caption: tuple[str, int]) -> None:
    """What the plan pods would have written (kwok runs no worker)."""
    client = minio.client()
    client.put_object(
        Bucket=bucket, Key=f"{scrape[0]}/_plan/summary.json", Body=json.dumps({"units": scrape[1]})
    )
    units = {"hash": "seeded", "units": [{} for _ in range(caption[1])]}
    client.put_object(Bucket=bucket, Key=f"{caption[0]}/_plan/units.json", Body=json.dumps(units))


def wait_status(
    cluster: LocalCluster,
    namespace: str,
    plural: str,
    name: str,
    check: Callable[[Obj], bool],
    what: str,
    timeout: float = 60,
) -> Obj:
    result: Obj = cluster.api.wait_for(
        f"{API}/namespaces/{namespace}/{plural}/{name}",
        lambda obj: check(obj.get("status") or {}),
        timeout,
        what,
    )
    return result


def phase(expected: str) -> Callable[[Obj], bool]:
    return lambda status: status.get("phase") == expected


def jobs(cluster: LocalCluster, namespace: str, resource: str) -> list[Obj]:
    items: list[Obj] = cluster.api.get(
        f"/apis/batch/v1/namespaces/{namespace}/jobs",
        params={"labelSelector": f"commoncanvas.dev/resource={resource}"},
    )["items"]
    return items


def pods(cluster: LocalCluster, namespace: str, job: str) -> list[Obj]:
    items: list[Obj] = cluster.api.get(
        f"/api/v1/namespaces/{namespace}/pods",
        params={"labelSelector": f"batch.kubernetes.io/job-name={job}"},
    )["items"]
    return items


def test_caption_waits_for_scrape_then_both_succeed_and_a_restart_duplicates_nothing(
    cluster: LocalCluster, namespace: str, minio: MinioServer, bucket: str, operator: OperatorProcess
) -> None:
    seed_plans(minio, bucket, ("yfcc", 3), ("caps", 2))
    cluster.apply(caption_job("caps", bucket, "yfcc"), namespace)
    waiting = wait_status(cluster, namespace, "captionjobs", "caps", phase("Waiting"), "CaptionJob Waiting")
    [upstream] = [c for c in waiting["status"]["conditions"] if c["type"] == "UpstreamReady"]
    assert "ScrapeJob yfcc" in upstream["message"]

    cluster.apply(scrape_job("yfcc", bucket), namespace)
    wait_status(
        cluster,
        namespace,
        "scrapejobs",
        "yfcc",
        lambda s: (s.get("units") or {}).get("total") == 3,
        "ScrapeJob planned",
        60,
    )
    # The operator dies mid-way and comes back: it must pick up, not start over.
    operator.kill()
    before = {job["metadata"]["name"]: job["metadata"]["uid"] for job in jobs(cluster, namespace, "yfcc")}
    operator.start()

    scrape = wait_status(cluster, namespace, "scrapejobs", "yfcc", phase("Succeeded"), "ScrapeJob Succeeded")
    caption = wait_status(
        cluster, namespace, "captionjobs", "caps", phase("Succeeded"), "CaptionJob Succeeded"
    )

    assert scrape["status"]["units"] == {"total": 3, "succeeded": 3, "failed": 0}
    assert scrape["status"]["progress"] == "3/3"
    assert caption["status"]["units"] == {"total": 2, "succeeded": 2, "failed": 0}
    assert caption["status"]["observedGeneration"] == caption["metadata"]["generation"]
    after = {job["metadata"]["name"]: job["metadata"]["uid"] for job in jobs(cluster, namespace, "yfcc")}
    assert sorted(after) == ["yfcc-finalize", "yfcc-plan", "yfcc-units"]
    assert all(after[name] == uid for name, uid in before.items())

    [units] = [j for j in jobs(cluster, namespace, "caps") if j["metadata"]["name"] == "caps-units"]
    assert units["spec"]["completionMode"] == "Indexed" and units["spec"]["completions"] == 2
    assert units["metadata"]["ownerReferences"][0]["kind"] == "CaptionJob"
    caption_pods = pods(cluster, namespace, "caps-units")
    assert caption_pods and {p["spec"]["nodeName"] for p in caption_pods} <= set(
        cluster.node_names(A100_POOL)
    )
    container = caption_pods[0]["spec"]["containers"][0]
    assert container["resources"]["limits"][GPU_RESOURCE] == "2"
    assert container["args"] == ["caption", "work", "/etc/commoncanvas/job.yaml"]
    job_file = cluster.api.get(f"/api/v1/namespaces/{namespace}/configmaps/caps-job")["data"]["job.yaml"]
    assert yaml.safe_load(job_file)["spec"]["input"]["uris"] == [f"s3://{bucket}/yfcc"]
    scrape_pods = pods(cluster, namespace, "yfcc-units")
    assert {p["spec"]["nodeName"] for p in scrape_pods} <= set(cluster.node_names(CPU_POOL))
    reasons = {
        e["reason"]
        for e in cluster.api.get(f"/api/v1/namespaces/{namespace}/events")["items"]
        if e["involvedObject"].get("name") == "caps"
    }
    assert {"Waiting", "Succeeded"} <= reasons


def test_failing_units_fail_the_stage_and_its_downstream_names_it(
    cluster: LocalCluster, namespace: str, minio: MinioServer, bucket: str, operator: OperatorProcess
) -> None:
    seed_plans(minio, bucket, ("bad", 2), ("after", 1))
    cluster.apply(
        [scrape_job("bad", bucket, **{FAIL_ANNOTATION: "true"}), caption_job("after", bucket, "bad")],
        namespace,
    )

    bad = wait_status(cluster, namespace, "scrapejobs", "bad", phase("Failed"), "ScrapeJob Failed", 90)
    after = wait_status(cluster, namespace, "captionjobs", "after", phase("Failed"), "CaptionJob Failed")

    [failed] = [c for c in bad["status"]["conditions"] if c["type"] == "Failed"]
    assert failed["reason"] == "FailedIndexes"
    # kwok's failing pods are workers that die before any unit records an error: the workers are named.
    assert failed["message"].startswith("2 workers failed (indexes 0,1)")
    assert bad["status"]["units"]["succeeded"] == 0
    [downstream] = [c for c in after["status"]["conditions"] if c["type"] == "Failed"]
    assert downstream["message"].startswith("ScrapeJob bad failed: 2 workers failed")
    assert jobs(cluster, namespace, "after") == []


def test_invalid_resource_is_rejected_and_deleting_one_removes_its_children(
    cluster: LocalCluster, namespace: str, minio: MinioServer, bucket: str, operator: OperatorProcess
) -> None:
    invalid = scrape_job("invalid", bucket)
    invalid["spec"]["unitSize"] = 0
    with pytest.raises(ApiError) as rejected:
        cluster.api.create(f"{API}/namespaces/{namespace}/scrapejobs", invalid)
    assert rejected.value.status_code == 422
    assert "spec.unitSize" in rejected.value.message

    seed_plans(minio, bucket, ("gone", 1), ("unused", 1))
    cluster.apply(scrape_job("gone", bucket), namespace)
    wait_status(cluster, namespace, "scrapejobs", "gone", phase("Succeeded"), "ScrapeJob Succeeded")
    assert len(jobs(cluster, namespace, "gone")) == 3

    cluster.api.delete(f"{API}/namespaces/{namespace}/scrapejobs/gone")

    deadline = time.monotonic() + 60
    while jobs(cluster, namespace, "gone") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert jobs(cluster, namespace, "gone") == []


def train_run(name: str, bucket: str, max_nodes: int, **annotations: str) -> Obj:
    return {
        "apiVersion": "commoncanvas.dev/v1alpha1",
        "kind": "TrainRun",
        "metadata": {"name": name, "annotations": annotations},
        "spec": {
            "dataset": {"uris": [f"s3://{bucket}/caps"]},
            "output": {"uri": f"s3://{bucket}/{name}"},
            "checkpoint": {"uri": f"s3://{bucket}/{name}-ckpt"},
            "distributed": {"minNodes": 1, "maxNodes": max_nodes, "gpusPerNode": 8, "maxRestarts": 2},
        },
    }


def test_train_run_gets_a_rendezvous_service_and_one_gpu_pod_per_a100_node(
    cluster: LocalCluster, namespace: str, bucket: str, operator: OperatorProcess
) -> None:
    cluster.apply(train_run("sd", bucket, max_nodes=2), namespace)

    done = wait_status(cluster, namespace, "trainruns", "sd", phase("Succeeded"), "TrainRun Succeeded", 90)

    assert done["status"]["observedGeneration"] == done["metadata"]["generation"]
    service = cluster.api.get(f"/api/v1/namespaces/{namespace}/services/sd-rdzv")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["metadata"]["ownerReferences"][0]["kind"] == "TrainRun"
    [job] = jobs(cluster, namespace, "sd")
    assert job["metadata"]["name"] == "sd-train"
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    train_pods = pods(cluster, namespace, "sd-train")
    assert len(train_pods) == 2
    # 8 GPUs each: the two pods fill the two A100 nodes, one each.
    assert sorted(p["spec"]["nodeName"] for p in train_pods) == sorted(cluster.node_names(A100_POOL))
    for pod in train_pods:
        assert pod["spec"]["subdomain"] == "sd-rdzv"
        container = pod["spec"]["containers"][0]
        assert container["resources"]["limits"][GPU_RESOURCE] == "8"
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["TORCHX_RANK0_HOST"] == "sd-train-0.sd-rdzv"
        assert "--nnodes 1:2" in container["args"][1]
    job_file = cluster.api.get(f"/api/v1/namespaces/{namespace}/configmaps/sd-job")["data"]["job.yaml"]
    assert yaml.safe_load(job_file)["spec"]["dataset"]["uris"] == [f"s3://{bucket}/caps"]


def test_train_run_pod_on_a_lost_a100_node_is_replaced_and_the_run_still_succeeds(
    cluster: LocalCluster, namespace: str, bucket: str, operator: OperatorProcess
) -> None:
    spare = cluster.create_node(f"a100-spare-{namespace}", A100_POOL)["metadata"]["name"]
    cluster.apply(train_run("lossy", bucket, max_nodes=2, **{RUN_DURATION_ANNOTATION: "12s"}), namespace)
    pods_path = (
        f"/api/v1/namespaces/{namespace}/pods?labelSelector=batch.kubernetes.io/job-name%3Dlossy-train"
    )
    lost: str | None = None
    try:
        running = cluster.api.wait_for(
            pods_path,
            lambda found: sum(p.get("status", {}).get("phase") == "Running" for p in found["items"]) == 2,
            60,
            "both train pods Running",
        )["items"]
        victim = next(
            p
            for p in running
            if p["metadata"]["annotations"].get("batch.kubernetes.io/job-completion-index") == "1"
        )
        lost = victim["spec"]["nodeName"]

        cluster.delete_node(lost, gc_pods_now=True)

        def replaced(found: Obj) -> bool:
            return any(
                p["metadata"]["uid"] != victim["metadata"]["uid"]
                and p["metadata"]["annotations"].get("batch.kubernetes.io/job-completion-index") == "1"
                and p.get("status", {}).get("phase") in ("Running", "Succeeded")
                for p in found["items"]
            )

        replacement = cluster.api.wait_for(pods_path, replaced, 60, "a replacement for the lost node's pod")
        done = wait_status(
            cluster, namespace, "trainruns", "lossy", phase("Succeeded"), "TrainRun Succeeded", 90
        )
        assert done["status"]["phase"] == "Succeeded"
        [job] = jobs(cluster, namespace, "lossy")
        assert job["status"].get("failed", 0) == 0  # a lost node is not the run's failure
        nodes = {p["spec"]["nodeName"] for p in replacement["items"] if p["spec"].get("nodeName")}
        assert lost not in nodes
        assert nodes <= {*cluster.node_names(A100_POOL), spare}
    finally:
        # Leave the A100 pool as the other tests expect it: no pods left, the spare gone, the lost back.
        cluster.api.delete(f"{API}/namespaces/{namespace}/trainruns/lossy")
        cluster.api.wait_for(pods_path, lambda found: not found["items"], 60, "the train pods gone")
        cluster.delete_node(spare)
        if lost is not None and lost != spare:
            cluster.create_node(lost, A100_POOL)


def seed_latents_plan(minio: MinioServer, bucket: str, run: str, units: int) -> None:
    """What the latents plan pod would have written under the run's output (kwok runs no worker)."""
    plan = {"hash": "seeded", "units": [{} for _ in range(units)]}
    minio.client().put_object(Bucket=bucket, Key=f"{run}/latents/_plan/units.json", Body=json.dumps(plan))


def latents_run(name: str, bucket: str, max_nodes: int, **annotations: str) -> Obj:
    body = train_run(name, bucket, max_nodes, **annotations)
    body["spec"]["optimizations"] = {"precomputeLatents": True}
    return body


def conditions_of(obj: Obj) -> dict[str, Obj]:
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}


def test_train_run_with_precomputed_latents_encodes_on_a100_gpus_first_then_trains(
    cluster: LocalCluster, namespace: str, minio: MinioServer, bucket: str, operator: OperatorProcess
) -> None:
    seed_latents_plan(minio, bucket, "lat", 5)
    cluster.apply(latents_run("lat", bucket, max_nodes=2, **{RUN_DURATION_ANNOTATION: "4s"}), namespace)

    encoding = wait_status(
        cluster,
        namespace,
        "trainruns",
        "lat",
        lambda s: any(c["type"] == "LatentsUnitsComplete" for c in s.get("conditions") or []),
        "latents units running",
    )
    assert encoding["status"]["phase"] == "Running"
    assert encoding["status"]["units"]["total"] == 5
    assert encoding["status"]["progress"].startswith("latents ")
    assert conditions_of(encoding)["LatentsUnitsComplete"]["message"].endswith("/5 units")
    assert "lat-train" not in {j["metadata"]["name"] for j in jobs(cluster, namespace, "lat")}

    done = wait_status(cluster, namespace, "trainruns", "lat", phase("Succeeded"), "TrainRun Succeeded", 120)

    assert done["status"]["units"] == {"total": 5, "succeeded": 5, "failed": 0}
    found = conditions_of(done)
    assert all(found[t]["status"] == "True" for t in ("LatentsPlanned", "LatentsFinalized", "Trained"))
    by_name = {j["metadata"]["name"]: j for j in jobs(cluster, namespace, "lat")}
    assert sorted(by_name) == ["lat-latents-finalize", "lat-latents-plan", "lat-latents-units", "lat-train"]
    units = by_name["lat-latents-units"]
    assert units["spec"]["completionMode"] == "Indexed"
    assert units["spec"]["completions"] == 5
    assert units["spec"]["parallelism"] == 5  # 2 nodes x 8 GPUs, capped at the 5 units
    assert units["metadata"]["ownerReferences"][0]["kind"] == "TrainRun"
    # The train Job was made only once the latents phase had finished.
    finished = by_name["lat-latents-finalize"]["status"]["completionTime"]
    assert by_name["lat-train"]["metadata"]["creationTimestamp"] >= finished
    assert by_name["lat-latents-finalize"]["status"]["completionTime"] >= units["status"]["completionTime"]
    unit_pods = pods(cluster, namespace, "lat-latents-units")
    assert len(unit_pods) == 5
    assert {p["spec"]["nodeName"] for p in unit_pods} <= set(cluster.node_names(A100_POOL))
    for pod in unit_pods:
        container = pod["spec"]["containers"][0]
        assert container["resources"]["limits"][GPU_RESOURCE] == "1"
        assert container["args"] == ["latents", "work", "/etc/commoncanvas/job.yaml"]
    for step in ("plan", "finalize"):
        [pod] = pods(cluster, namespace, f"lat-latents-{step}")
        assert pod["spec"]["nodeName"] in cluster.node_names(CPU_POOL), step
        assert GPU_RESOURCE not in (pod["spec"]["containers"][0].get("resources") or {}).get("limits", {})
    train_pods = pods(cluster, namespace, "lat-train")
    assert sorted(p["spec"]["nodeName"] for p in train_pods) == sorted(cluster.node_names(A100_POOL))
    # Every Job reads the one job file.
    for job in by_name.values():
        volumes = job["spec"]["template"]["spec"]["volumes"]
        assert any((v.get("configMap") or {}).get("name") == "lat-job" for v in volumes)


def test_failing_latents_units_fail_the_train_run_naming_them_and_no_training_starts(
    cluster: LocalCluster, namespace: str, minio: MinioServer, bucket: str, operator: OperatorProcess
) -> None:
    seed_latents_plan(minio, bucket, "badlat", 2)
    cluster.apply(latents_run("badlat", bucket, max_nodes=1, **{FAIL_ANNOTATION: "true"}), namespace)

    failed = wait_status(cluster, namespace, "trainruns", "badlat", phase("Failed"), "TrainRun Failed", 90)

    condition = conditions_of(failed)["Failed"]
    assert condition["reason"] == "LatentsFailedIndexes"
    # Two consecutive indexes are "0,1" (three or more would be a range, "0-2").
    assert condition["message"].startswith("latents phase: 2 workers failed (indexes 0,1)")
    assert failed["status"]["units"]["succeeded"] == 0
    time.sleep(3)  # a few more reconciles: still nothing of training
    names = {j["metadata"]["name"] for j in jobs(cluster, namespace, "badlat")}
    assert names == {"badlat-latents-plan", "badlat-latents-units"}
    assert cluster.api.get_or_none(f"/api/v1/namespaces/{namespace}/services/badlat-rdzv") is None


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except (urllib.error.URLError, ConnectionError) as error:
        return 0, str(error)


def test_two_replicas_peer_one_works_and_the_other_takes_over_when_it_dies(
    cluster: LocalCluster, namespace: str, minio: MinioServer, bucket: str, tmp_path: Path
) -> None:
    values = {
        "operator": {"peering": "commoncanvas", "peeringLifetimeSeconds": 5},
        "nodePools": {"cpu": {"nodeSelector": CPU_POOL.node_selector, "tolerations": []}},
    }
    with installed_operator(cluster, namespace, minio, tmp_path, values) as env:
        replicas = [
            OperatorProcess(
                namespace, env, tmp_path / f"replica-{i}.log", standalone=False, peering="commoncanvas"
            )
            for i in range(2)
        ]
        try:
            for replica in replicas:
                replica.start()
            for replica in replicas:
                healthz = f"http://127.0.0.1:{replica.liveness}/healthz"
                wait_for(lambda url=healthz: http_get(url)[0] == 200, "liveness", 180)  # type: ignore[misc]
            # Both in the peering object; a replica acts on it within its next event (kopf starts every
            # peering replica paused, and the lower one may stay so without a word in its log).
            peering = f"/apis/kopf.dev/v1/namespaces/{namespace}/kopfpeerings/commoncanvas"
            cluster.api.wait_for(peering, lambda obj: len(obj.get("status") or {}) == 2, 120, "two peers")
            time.sleep(2)

            seed_plans(minio, bucket, ("first", 1), ("unused", 1))
            cluster.apply(scrape_job("first", bucket), namespace)
            wait_status(cluster, namespace, "scrapejobs", "first", phase("Succeeded"), "first Succeeded")
            scraped = {r: http_get(f"http://127.0.0.1:{r.metrics_port}/metrics") for r in replicas}
            assert all(status == 200 for status, _ in scraped.values())
            worked = [r for r, (_, text) in scraped.items() if 'name="first"' in text]
            assert len(worked) == 1, "exactly one replica may reconcile"
            [active] = worked
            [standby] = [r for r in replicas if r is not active]
            text = scraped[active][1]
            assert 'commoncanvas_operator_reconciles_total{kind="ScrapeJob",result="ok"}' in text
            assert 'commoncanvas_operator_units_done{kind="ScrapeJob",name="first"' in text

            resumed_before = standby.log_tail(10**6).count("Resuming operations")
            active.kill()  # no goodbye: its peering entry must go stale
            seed_plans(minio, bucket, ("second", 1), ("unused", 1))
            cluster.apply(scrape_job("second", bucket), namespace)
            wait_status(cluster, namespace, "scrapejobs", "second", phase("Succeeded"), "taken over", 180)
            assert standby.log_tail(10**6).count("Resuming operations") > resumed_before
        finally:
            for replica in replicas:
                replica.kill()
                print(replica.log_tail(3000))


def wait_for(check: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout:.0f} s")
        time.sleep(0.5)


def test_a_spec_change_running_work_cannot_take_is_refused_and_nothing_changes(
    cluster: LocalCluster, namespace: str, minio: MinioServer, bucket: str, operator: OperatorProcess
) -> None:
    seed_plans(minio, bucket, ("slow", 2), ("unused", 1))
    body = scrape_job("slow", bucket, **{RUN_DURATION_ANNOTATION: "600s"})
    cluster.apply(body, namespace)
    wait_status(
        cluster,
        namespace,
        "scrapejobs",
        "slow",
        lambda s: (s.get("units") or {}).get("total") == 2,
        "planned",
    )
    job_file = cluster.api.get(f"/api/v1/namespaces/{namespace}/configmaps/slow-job")

    path = f"{API}/namespaces/{namespace}/scrapejobs/slow"
    moved = f"s3://{bucket}/other.tsv"
    cluster.api.patch(path, {"spec": {"source": {"uri": moved}, "parallelism": 1}})
    refused = wait_status(
        cluster,
        namespace,
        "scrapejobs",
        "slow",
        lambda s: any(c["type"] == "SpecChangeRefused" for c in s.get("conditions") or []),
        "refused",
    )
    [condition] = [c for c in refused["status"]["conditions"] if c["type"] == "SpecChangeRefused"]
    assert condition["message"].startswith("spec.source.uri changed after this resource's work started")
    assert refused["status"]["phase"] == "Running"
    after = cluster.api.get(f"/api/v1/namespaces/{namespace}/configmaps/slow-job")
    assert after["data"] == job_file["data"], "the running work's job file was changed"

    # Set back: the parallelism change alone applies.
    cluster.api.patch(path, {"spec": {"source": {"uri": body["spec"]["source"]["uri"]}}})
    wait_status(
        cluster,
        namespace,
        "scrapejobs",
        "slow",
        lambda s: not any(c["type"] == "SpecChangeRefused" for c in s.get("conditions") or []),
        "accepted",
    )
    cluster.api.wait_for(
        f"/apis/batch/v1/namespaces/{namespace}/jobs/slow-units",
        lambda job: job["spec"]["parallelism"] == 1,
        30,
        "parallelism 1",
    )
    cluster.api.delete(path)

"""On the real control plane: a CaptionJob's workers are an elastic Indexed Job whose size changes in
place (2 -> 4 -> 1) while it runs; every unit is captioned once, and models load once per worker pod.

The operator runs here as the chart's ServiceAccount; the pod runner runs each worker pod as a real
process (tiny random-weight BLIP-2 read from MinIO, catalog and captions in MinIO)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from streaming import MDSWriter
from tests.cluster.harness import LOCAL_POOL, REPO_ROOT, LocalCluster
from tests.cluster.minio import MinioServer
from tests.cluster.operator import OperatorProcess, installed_operator
from tests.cluster.processes import free_port

from commoncanvas import storage, workqueue
from commoncanvas.mds import read_split
from commoncanvas.sample import synthetic_jpeg
from commoncanvas.scrape.worker import CATALOG_COLUMNS, blank_catalog_row

pytestmark = pytest.mark.integration

API = "/apis/commoncanvas.dev/v1alpha1"
IMAGES = 48
LOCAL_VALUES: dict[str, Any] = {
    **yaml.safe_load((REPO_ROOT / "charts" / "commoncanvas" / "values-local.yaml").read_text()),
    "nodePools": {"local": {"nodeSelector": LOCAL_POOL.node_selector, "tolerations": LOCAL_POOL.tolerations}},
}


def write_catalog(root: Path) -> None:
    """A finished ScrapeJob's catalog: two images per shard, so one unit per shard below."""
    with MDSWriter(out=str(root / "commercial"), columns=CATALOG_COLUMNS, size_limit=9_000) as writer:
        for number in range(IMAGES):
            image = synthetic_jpeg(number, (96, 72))
            row = blank_catalog_row()
            row.update(image=image, photo_id=100 + number, license_code="cc0", tags=[], width=96, height=72)
            writer.write(row)


def upload_tree(client: Any, local: Path, bucket: str, prefix: str) -> None:
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local).as_posix()}")


def units_job(cluster: LocalCluster, namespace: str) -> dict[str, Any] | None:
    jobs = cluster.api.get(f"/apis/batch/v1/namespaces/{namespace}/jobs")["items"]
    return next((j for j in jobs if j["metadata"]["name"] == "elastic-units"), None)


def worker_pods(cluster: LocalCluster, namespace: str) -> list[dict[str, Any]]:
    pods = cluster.api.get(f"/api/v1/namespaces/{namespace}/pods")["items"]
    return [p for p in pods if p["metadata"]["labels"].get("batch.kubernetes.io/job-name") == "elastic-units"]


def wait_for(condition: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_workers_scaled_in_place_2_4_1_caption_every_unit_once_and_load_the_model_per_worker(
    cluster: LocalCluster, namespace: str, minio: MinioServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from commoncanvas.models import write_tiny_blip2

    for key, value in minio.env().items():  # this process reads the workers' progress too
        monkeypatch.setenv(key, value)
    storage.s3_client.cache_clear()
    bucket = f"elastic-{namespace}"
    minio.make_bucket(bucket)
    output = storage.open_storage(f"s3://{bucket}/captions")
    client = minio.client()
    write_catalog(tmp_path / "catalog")
    upload_tree(client, tmp_path / "catalog", bucket, "catalog")
    upload_tree(client, write_tiny_blip2(tmp_path / "blip2"), bucket, "models/blip2")
    caption_job = {
        "apiVersion": "commoncanvas.dev/v1alpha1",
        "kind": "CaptionJob",
        "metadata": {"name": "elastic"},
        "spec": {
            "input": {"uris": [f"s3://{bucket}/catalog"], "splits": ["commercial"]},
            "output": {"uri": f"s3://{bucket}/captions"},
            "model": {"source": f"s3://{bucket}/models/blip2"},
            # A random-weight model repeats itself; these keep its captions from being degenerate.
            "decoding": {"maxNewTokens": 8, "minNewTokens": 4, "noRepeatNgramSize": 2},
            "batchSize": 1,
            "loaderWorkers": 0,
            "samplesPerUnit": 1,
            "parallelism": 2,
            "gpusPerPod": 0,
            "nodePool": "local",
        },
    }
    values = {
        **LOCAL_VALUES,
        "operator": {"replicas": 0},
        # Pods share this host here: a worker whose metrics port is taken works on without /metrics.
        "workers": {"backoffLimitPerIndex": 2, "metricsPort": free_port()},
    }
    path = f"{API}/namespaces/{namespace}/captionjobs/elastic"
    with installed_operator(cluster, namespace, minio, tmp_path, values) as env:
        operator = OperatorProcess(namespace, env, tmp_path / "operator.log")
        operator.start()
        try:
            cluster.api.create(f"{API}/namespaces/{namespace}/captionjobs", caption_job)
            wait_for(lambda: len(worker_pods(cluster, namespace)) == 2, 180, "two worker pods")
            for size in (4, 1):
                cluster.api.patch(path, {"spec": {"parallelism": size}})
                wait_for(
                    lambda size=size: (
                        (units_job(cluster, namespace) or {}).get("spec", {}).get("completions") == size
                    ),
                    60,
                    f"the workers Job resized to {size}",
                )
                if size == 4:  # before scaling down, the added workers have loaded the model and claimed
                    wait_for(
                        lambda: sum(d["modelLoads"] for d in workqueue.read_progress(output)) >= 3,
                        240,
                        "three workers with their model loaded",
                    )
            final = wait_for(
                lambda: (
                    (cluster.api.get(path).get("status") or {}).get("phase") in ("Succeeded", "Failed")
                    and cluster.api.get(path)
                ),
                600,
                "the CaptionJob to finish",
            )
        except BaseException:
            for pod in cluster.api.get(f"/api/v1/namespaces/{namespace}/pods")["items"]:
                name = pod["metadata"]["name"]
                print(f"--- pod {name}\n{cluster.pod_log(namespace, name)[-3000:]}")
            raise
        finally:
            operator.kill()
            print(operator.log_tail())

    status = final["status"]
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1)
    assert status["units"]["succeeded"] == status["units"]["total"] == IMAGES // 2
    assert status["captions"]["commercial"] + sum(status["excluded"].values()) == IMAGES
    ids = [
        int(row["photo_id"]) for row in read_split(f"s3://{bucket}/captions/commercial", tmp_path / "read")
    ]
    assert len(ids) == len(set(ids)) == status["captions"]["commercial"], "a sample was captioned twice"
    assert set(ids) <= set(range(100, 100 + IMAGES))
    docs = workqueue.read_progress(output)
    loaded = [doc for doc in docs if doc["modelLoads"]]
    assert status["modelLoads"] == sum(doc["modelLoads"] for doc in docs) == len(loaded)
    assert all(doc["modelLoads"] == 1 for doc in loaded), "a worker loads its model once"
    assert len(loaded) >= 3, "the pods added at 4 took units too"
    assert status["modelLoads"] < status["units"]["total"], "model loads follow workers, not units"
    assert status["workers"] == len(docs)
    storage.s3_client.cache_clear()

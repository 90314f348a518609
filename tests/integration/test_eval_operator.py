"""On the real control plane: an EvalRun's generation is sharded over two worker pods (an Indexed Job the
operator makes), its finalize computes the metrics, and they reach the resource's status.

The operator runs here as the chart's ServiceAccount; the pod runner runs each pod as a real process
(tiny random-weight SD2 pipeline, CLIP and InceptionV3 stand-in, prompts and references in MinIO)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from tests.cluster.harness import LocalCluster
from tests.cluster.minio import MinioServer
from tests.cluster.operator import OperatorProcess, installed_operator
from tests.cluster.processes import free_port
from tests.integration.test_elastic_workers import LOCAL_VALUES, upload_tree, wait_for

from commoncanvas import storage, units
from commoncanvas.models import write_tiny_clip, write_tiny_inception, write_tiny_sd2

pytestmark = pytest.mark.integration
API = "/apis/commoncanvas.dev/v1alpha1"


def test_an_evalruns_generation_is_sharded_over_worker_pods_and_its_metrics_reach_status(
    cluster: LocalCluster, namespace: str, minio: MinioServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in minio.env().items():  # this process reads the markers too
        monkeypatch.setenv(key, value)
    storage.s3_client.cache_clear()
    bucket = f"eval-{namespace}"
    minio.make_bucket(bucket)
    client = minio.client()
    upload_tree(client, write_tiny_sd2(tmp_path / "sd2"), bucket, "models/sd2")
    upload_tree(client, write_tiny_clip(tmp_path / "clip"), bucket, "models/clip")
    inception = write_tiny_inception(tmp_path / "inception")
    client.upload_file(str(inception), bucket, f"models/{inception.name}")
    rng = np.random.default_rng(0)
    for number in range(4):
        png = tmp_path / "refs" / f"{number}.png"
        png.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (72, 96, 3), dtype=np.uint8)).save(png)
    upload_tree(client, tmp_path / "refs", bucket, "refs")
    captions = "id\tcaption\n" + "".join(f"{i}\ta photo number {i}\n" for i in range(4))
    client.put_object(Bucket=bucket, Key="prompts.tsv", Body=captions.encode())
    evalrun = {
        "apiVersion": "commoncanvas.dev/v1alpha1",
        "kind": "EvalRun",
        "metadata": {"name": "sharded"},
        "spec": {
            "model": {"pipelineUri": f"s3://{bucket}/models/sd2"},
            "prompts": {"uri": f"s3://{bucket}/prompts.tsv"},
            "references": {"uri": f"s3://{bucket}/refs"},
            "extractors": {
                "inception": f"s3://{bucket}/models/{inception.name}",
                "clip": f"s3://{bucket}/models/clip",
            },
            "output": {"uri": f"s3://{bucket}/eval"},
            "resolution": 64,
            "guidanceScales": [1.5, 7.5],
            "inferenceSteps": 2,
            "samplesPerUnit": 2,
            "parallelism": 2,
            "gpusPerPod": 0,
            "nodePool": "local",
        },
    }
    values = {
        **LOCAL_VALUES,
        "operator": {"replicas": 0},
        "workers": {"backoffLimitPerIndex": 2, "metricsPort": free_port()},
    }
    path = f"{API}/namespaces/{namespace}/evalruns/sharded"
    with installed_operator(cluster, namespace, minio, tmp_path, values) as env:
        operator = OperatorProcess(namespace, env, tmp_path / "operator.log")
        operator.start()
        try:
            cluster.api.create(f"{API}/namespaces/{namespace}/evalruns", evalrun)
            final: dict[str, Any] = wait_for(
                lambda: (
                    (cluster.api.get(path).get("status") or {}).get("phase") in ("Succeeded", "Failed")
                    and cluster.api.get(path)
                ),
                600,
                "the EvalRun to finish",
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
    # 4 prompts x 2 guidance scales in units of 2, then the 4 reference images in units of 2.
    assert status["units"] == {"total": 6, "succeeded": 6, "failed": 0}
    assert (status["prompts"], status["references"]) == (4, 4)
    assert [row["guidanceScale"] for row in status["results"]] == [1.5, 7.5]
    for row in status["results"]:
        assert {"fid", "kid", "clipFid", "clipScore"} <= set(row) and row["fid"] >= 0
    assert status["outputs"]["results"] == f"s3://{bucket}/eval/results.json"
    markers = units.read_markers(storage.open_storage(f"s3://{bucket}/eval"))
    assert len(markers) == 6 and len({m["worker"] for m in markers.values()}) == 2, "one worker did it all"
    assert status["workers"] == 2 and status["modelLoads"] == 2
    storage.s3_client.cache_clear()

"""End to end on the harness's local node pool: ``kubectl apply -f manifests/examples/pipeline-local.yaml``.

The operator (chart RBAC, its ServiceAccount) turns the three resources into Jobs; the pod runner runs
every pod as a real worker process: the scrape fetches the bundled CC sample over HTTP, the caption
job runs a tiny random-weight BLIP-2 read from MinIO, the TrainRun trains a tiny SD2 under torchrun.
Everything lands in MinIO, and the three statuses say Succeeded.

A real Prometheus scrapes the operator and the workers (with the chart's rules loaded) meanwhile, and
every Grafana panel's query must return data afterwards; each dashboard is drawn from those results to
``$TEST_ARTIFACTS/dashboards/*.png`` (default ``test-artifacts/``) for a person to look at.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from tests.cluster.harness import LOCAL_POOL, REPO_ROOT, LocalCluster
from tests.cluster.minio import MinioServer
from tests.cluster.operator import OperatorProcess, installed_operator
from tests.cluster.processes import free_port
from tests.cluster.prometheus import PrometheusServer
from tests.dashboards import DASHBOARDS, RULES, load, render, substitute

from commoncanvas.sample import build_sample
from commoncanvas.sample.server import LocalHTTPServer

pytestmark = pytest.mark.integration

PIPELINE = REPO_ROOT / "manifests" / "examples" / "pipeline-local.yaml"
API = "/apis/commoncanvas.dev/v1alpha1"
PLURALS = {"ScrapeJob": "scrapejobs", "CaptionJob": "captionjobs", "TrainRun": "trainruns"}
# Series only GPUs fill (DCGM, CUDA memory, MFU needs a device's peak FLOP/s), or only trouble does
# (OOM backoffs, firing alerts): a healthy CPU run leaves these panels empty.
EMPTY_ON_A_HEALTHY_CPU_RUN = (
    "DCGM_FI_",
    "commoncanvas_gpu_memory_bytes",
    "commoncanvas_train_mfu",
    "commoncanvas_oom_backoffs_total",
    "ALERTS",
)
# Grafana's $__rate_interval for a 1 s scrape interval; the caption dashboard's stage.
RUN_VARIABLES = {"$__rate_interval": "30s", "$stage": "caption"}
# The chart's values for a small cluster, with the harness's `local` pool (a tainted node) as that pool.
LOCAL_VALUES: dict[str, Any] = {
    **yaml.safe_load((REPO_ROOT / "charts" / "commoncanvas" / "values-local.yaml").read_text()),
    "nodePools": {"local": {"nodeSelector": LOCAL_POOL.node_selector, "tolerations": LOCAL_POOL.tolerations}},
}


def s3_parts(uri: str) -> tuple[str, str]:
    parts = urlsplit(uri)
    return parts.netloc, parts.path.lstrip("/")


def upload_tree(client: Any, local: Path, uri: str) -> None:
    bucket, prefix = s3_parts(uri)
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local).as_posix()}")


def keys(client: Any, uri: str) -> list[str]:
    bucket, prefix = s3_parts(uri)
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
    return [item["Key"][len(prefix) + 1 :] for page in pages for item in page.get("Contents", [])]


@pytest.fixture
def staged(minio: MinioServer, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """What pipeline-local.yaml reads: the sample's metadata and a tiny BLIP-2 in its bucket, the
    sample's photos served where its fetch templates point."""
    from commoncanvas.models import write_tiny_blip2

    scrape, caption, train = yaml.safe_load_all(PIPELINE.read_text())
    served = urlsplit(scrape["spec"]["fetch"]["sizedUrlTemplate"])
    client = minio.client()
    bucket, metadata_key = s3_parts(scrape["spec"]["source"]["uri"])
    minio.make_bucket(bucket)
    sample = build_sample(tmp_path / "sample", f"{served.scheme}://{served.netloc}")
    client.upload_file(str(sample.metadata), bucket, metadata_key)
    upload_tree(client, write_tiny_blip2(tmp_path / "blip2"), caption["spec"]["model"]["source"])
    with LocalHTTPServer(root=sample.root / "www", port=served.port):
        yield {"sample": sample, "client": client, "resources": (scrape, caption, train)}


def wait_until_done(
    cluster: LocalCluster, namespace: str, resources: list[Any], timeout: float
) -> dict[str, Any]:
    """Each resource's final object; fails at once, with its status, when one fails."""
    deadline = time.monotonic() + timeout
    pending = {(r["kind"], r["metadata"]["name"]) for r in resources}
    final: dict[str, Any] = {}
    while pending and time.monotonic() < deadline:
        for kind, name in sorted(pending):
            obj = cluster.api.get(f"{API}/namespaces/{namespace}/{PLURALS[kind]}/{name}")
            phase = (obj.get("status") or {}).get("phase")
            if phase == "Failed":
                pytest.fail(f"{kind} {name} failed: {json.dumps(obj['status'], indent=1)}")
            if phase == "Succeeded":
                final[kind] = obj
                pending.discard((kind, name))
        time.sleep(1)
    if pending:
        statuses = {
            name: cluster.api.get(f"{API}/namespaces/{namespace}/{PLURALS[kind]}/{name}").get("status")
            for kind, name in pending
        }
        pytest.fail(f"not done after {timeout:.0f} s: {json.dumps(statuses, indent=1)}")
    return final


def test_pipeline_local_yaml_runs_real_workers_and_leaves_a_trained_model_in_minio(
    cluster: LocalCluster,
    namespace: str,
    minio: MinioServer,
    staged: dict[str, Any],
    start_prometheus: Any,
    tmp_path: Path,
) -> None:
    scrape, caption, train = staged["resources"]
    client = staged["client"]
    # Every pod here shares this host: one port for all workers (they run one at a time), kept open a
    # few seconds after each pod's work so the 1 s scrapes see its final counts.
    workers_port = free_port()
    values = {
        **LOCAL_VALUES,
        "operator": {"replicas": 0},  # the operator runs here, as the chart's ServiceAccount
        "workers": {"backoffLimitPerIndex": 1, "metricsPort": workers_port, "metricsLingerSeconds": 3},
    }
    with installed_operator(cluster, namespace, minio, tmp_path, values) as env:
        operator = OperatorProcess(namespace, env, tmp_path / "operator.log")
        operator.start()
        workers = f"127.0.0.1:{workers_port}"
        prometheus = start_prometheus(
            [workers, f"127.0.0.1:{operator.metrics_port}"],
            target_labels={workers: {"namespace": namespace, "pod": "local-workers"}},
            rule_files=[RULES],
        )
        started = time.time()
        try:
            cluster.kubectl("apply", "-f", str(PIPELINE), f"--namespace={namespace}")
            done = wait_until_done(cluster, namespace, [scrape, caption, train], timeout=600)
        except BaseException:
            for pod in cluster.api.get(f"/api/v1/namespaces/{namespace}/pods")["items"]:
                name = pod["metadata"]["name"]
                print(f"--- pod {name}\n{cluster.pod_log(namespace, name)[-3000:]}")
            raise
        finally:
            operator.kill()
            print(operator.log_tail())

    sample = staged["sample"]
    expected = {split: len(sample.expected(split)) for split in ("commercial", "noncommercial")}
    scraped = done["ScrapeJob"]["status"]
    assert scraped["samples"] == expected
    assert scraped["units"]["failed"] == 0 and scraped["units"]["succeeded"] == scraped["units"]["total"]
    assert "CC-BY-ND" not in "".join(scraped["licenses"])
    for split, uri in scraped["outputs"].items():
        assert "index.json" in keys(client, uri), f"catalog {split} has no MDS index"

    captioned = done["CaptionJob"]["status"]
    assert captioned["captions"] == expected
    for uri in captioned["outputs"].values():
        assert any(key.endswith(".mds") or key.endswith(".mds.zstd") for key in keys(client, uri))

    trained = done["TrainRun"]["status"]
    assert trained["step"] == train["spec"]["schedule"]["maxSteps"]
    model_keys = keys(client, train["spec"]["output"]["uri"])
    assert "pipeline/model_index.json" in model_keys
    assert any(key.startswith("pipeline/unet/") for key in model_keys)
    bucket, prefix = s3_parts(train["spec"]["output"]["uri"])
    assert {"datacard.json", "datacard.md", "attribution.jsonl"} <= set(model_keys)
    card = json.loads(client.get_object(Bucket=bucket, Key=f"{prefix}/datacard.json")["Body"].read())
    assert card["imagesSeen"] == trained["imagesSeen"] == 32
    assert card["trained"]["byLicense"] and all(lic["derivatives"] for lic in card["licenses"].values())
    assert set(card["trained"]["byLicense"]) <= set(scraped["licenses"])

    check_dashboards(prometheus, started)


def check_dashboards(prometheus: PrometheusServer, started: float) -> None:
    """Every panel query has data during the run (but those only GPUs or trouble fill), as Grafana's
    range queries would show it; each dashboard drawn from those results."""
    time.sleep(3)  # the last scrape and rule evaluation
    finished = time.time()
    artifacts = Path(os.environ.get("TEST_ARTIFACTS") or REPO_ROOT / "test-artifacts") / "dashboards"
    empty, checked = [], 0
    for path in DASHBOARDS:
        dashboard = load(path)
        results: dict[int, list[dict[str, Any]]] = {}
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                expr = substitute(target["expr"], RUN_VARIABLES)
                series = prometheus.query_range(expr, started, finished, step=2)
                results.setdefault(panel["id"], []).extend(series)
                if any(name in expr for name in EMPTY_ON_A_HEALTHY_CPU_RUN):
                    continue
                checked += 1
                if not any(value != "NaN" for item in series for _, value in item["values"]):
                    empty.append(f"{dashboard['title']} / {panel['title']} / {target['refId']}")
        print(f"dashboard {dashboard['title']}: {render(dashboard, results, artifacts / f'{path.stem}.png')}")
    assert checked >= 35
    assert not empty, f"panels with no data during the run: {empty}"

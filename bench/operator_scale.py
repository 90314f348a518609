"""The operator at scale on kwok, against plain Indexed Jobs of the same size applied directly.

    python -m bench operator_scale [--nodes 200] [--caption-units 5000] [--scrape-units 20000]

Each side gets a fresh control plane from the test harness (etcd, kube-apiserver, kube-controller-manager,
kube-scheduler, kwok): `--nodes` fake A100 nodes (8 GPUs each) and enough fake CPU nodes (110 pods each)
for the scrape pods. kwok plays the kubelet: a unit pod runs `--unit-seconds` (the kwok run-duration
annotation), plan and finalize pods 1 s.

- operator: the chart installed with helm (operator replicas 0), `python -m commoncanvas_operator
  --standalone` run as the chart's ServiceAccount with the chart's settings, the plans seeded in MinIO (kwok
  runs no worker); then a ScrapeJob and a CaptionJob (input URIs, so both run at once) are created and
  followed to phase Succeeded (plan Job, units Indexed Job of workers, finalize Job).  As each index
  completes (one pod per worker), its share of the units' markers `_units/NNNNNN.json` and its progress
  object `_workers/wNNNN.json` are written to its stage's output in MinIO, as a real worker writes them
  (kwok runs no worker, and an operator reading an empty store would have it too easy).
- baseline: the same two units Jobs (`builders.build_stage_job`, same pod template, completions and
  parallelism) and their job-file ConfigMaps created directly: the floor the operator adds to.

Measured from the create requests (t=0), by polling the Jobs and the resources every `--poll` seconds:
the first wave started (min(parallelism, units) unit pods Ready or done per Job), all unit pods scheduled
(every index's pod Ready or done), all units succeeded (the Job's `succeeded`), the resource's phase
Succeeded, and the status lag: from the Job counting every unit succeeded to the resource's
`status.units.succeeded` saying so. API requests are the kube-apiserver's own counters, diffed over the
window: `apiserver_request_total` less node Lease heartbeats, non-resource paths and this benchmark's
polling, by client from the API Priority and Fairness flow schemas (the operator is the only
ServiceAccount outside kube-system that makes requests). Operator CPU seconds (in the window) and peak
RSS (VmHWM, whole life) come from /proc.

As kwokctl does for scale tests, the controller manager's and scheduler's API clients get
`--client-qps` requests/s (default 5000): at their defaults (20 and 50) their own client throttles would
be the floor; `--client-qps 0` keeps the defaults. `--rounds N` repeats both sides, alternating which
goes first, and reports median [min-max] (a ratio's spread from its per-round ratios); each round takes
minutes at the default size, so the default is 2 rounds (BENCH_SCALE_ROUNDS), and 5 or more are meant
for smaller clusters, e.g. `BENCH_NODES=20 BENCH_CAPTION_UNITS=250 BENCH_SCRAPE_UNITS=1000`.  Options
also come from the environment: BENCH_NODES, BENCH_CAPTION_UNITS, BENCH_SCRAPE_UNITS,
BENCH_UNIT_SECONDS, BENCH_SCALE_ROUNDS.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import re
import shutil
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml
from tests.cluster.harness import A100_POOL, CPU_POOL, LocalCluster
from tests.cluster.kubeapi import KubeApi, Obj, load_kubeconfig
from tests.cluster.kwok_stages import RUN_DURATION_ANNOTATION
from tests.cluster.minio import MinioServer
from tests.cluster.operator import OperatorProcess, helm, installed_operator
from tests.cluster.processes import REPO_ROOT, http_ok, wait_until

from bench.report import Table, alternate, ratios, rounded, spread, stats

CHART = REPO_ROOT / "charts" / "commoncanvas"
NAMESPACE = "bench"
RELEASE = f"cc-{NAMESPACE}"  # the name installed_operator gives the release
BUCKET = "bench"
API = "/apis/commoncanvas.dev/v1alpha1"
GPUS_PER_NODE = int(A100_POOL.allocatable["nvidia.com/gpu"])
PODS_PER_NODE = int(CPU_POOL.allocatable["pods"])
# Stage name -> (kind, plural); the names are those of the resources and the Jobs' prefixes.
STAGES = {"scrape": ("ScrapeJob", "scrapejobs"), "caption": ("CaptionJob", "captionjobs")}
SIDES = ("baseline", "operator")
# The API server's clients, as its flow schemas tell them apart (see by_client).
CLIENTS = ("operator", "kube-controller-manager", "kube-scheduler", "kwok and other exempt", "other")


def chart_reconcile_seconds() -> float:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    return float(values["operator"]["reconcileSeconds"])


@dataclass(frozen=True)
class Setup:
    nodes: int  # fake A100 nodes
    caption_units: int
    scrape_units: int
    caption_parallelism: int
    scrape_parallelism: int
    unit_seconds: float
    reconcile_seconds: float
    client_qps: int
    poll: float
    timeout: float

    @property
    def gpus(self) -> int:
        return self.nodes * GPUS_PER_NODE

    @property
    def cpu_nodes(self) -> int:
        # Room for every scrape pod plus the plan and finalize pods, and one node spare.
        return math.ceil((self.scrape_parallelism + 4) / PODS_PER_NODE) + 1

    @property
    def units(self) -> int:
        return self.caption_units + self.scrape_units

    def stage_units(self, stage: str) -> int:
        return self.caption_units if stage == "caption" else self.scrape_units


@dataclass
class Outcome:
    side: str
    stages: dict[str, dict[str, float]]  # stage -> milestone -> seconds from t=0
    window_seconds: float
    requests: dict[str, float]  # client -> API requests in the window
    polling_requests: int
    operator: dict[str, float] = field(default_factory=dict)

    def milestone(self, name: str) -> float | None:
        """When the last stage reached it (None: not measured on this side)."""
        times = [stage[name] for stage in self.stages.values() if name in stage]
        return max(times) if len(times) == len(self.stages) else None

    def lag(self, start: str, end: str) -> float | None:
        lags = [s[end] - s[start] for s in self.stages.values() if start in s and end in s]
        return max(lags) if len(lags) == len(self.stages) else None


# ---------------------------------------------------------------- the cluster


def tls_client(kubeconfig: Path) -> httpx.Client:
    """Admin HTTPS to the API server for its /metrics text (KubeApi speaks JSON only)."""
    credentials = load_kubeconfig(kubeconfig)
    context = ssl.create_default_context(cafile=credentials.ca_file)
    if credentials.cert_file:
        context.load_cert_chain(credentials.cert_file, credentials.key_file)
    return httpx.Client(base_url=credentials.server, verify=context, timeout=60)


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str, *names: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of the named series in Prometheus text format."""
    samples = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and match[1] in names:
            samples.append((match[1], dict(_LABEL.findall(match[2] or "")), float(match[3])))
    return samples


def request_counts(client: httpx.Client) -> dict[str, float]:
    """Cumulative API requests: all (less Leases and non-resource paths), Leases, and by flow schema."""
    text = client.get("/metrics").raise_for_status().text
    counts: dict[str, float] = {"all": 0.0, "leases": 0.0}
    for _, labels, value in parse_metrics(text, "apiserver_request_total"):
        if labels.get("resource") == "leases":
            counts["leases"] += value
        elif labels.get("resource"):
            counts["all"] += value
    for _, labels, value in parse_metrics(text, "apiserver_flowcontrol_dispatched_requests_total"):
        key = f"flow:{labels.get('flow_schema', '')}"
        counts[key] = counts.get(key, 0.0) + value
    return counts


def by_client(before: dict[str, float], after: dict[str, float], own: int) -> dict[str, float]:
    """Requests in the window: all, and per client from the flow schemas. Node Leases (kwok, exempt)
    and this benchmark's own polling (admin, exempt) are taken out of both."""
    delta = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in {*before, *after}}
    flows = {key.removeprefix("flow:"): value for key, value in delta.items() if key.startswith("flow:")}
    result = {
        "all": delta["all"] - own,
        "operator": flows.pop("service-accounts", 0.0),
        "kube-controller-manager": flows.pop("kube-system-service-accounts", 0.0)
        + flows.pop("kube-controller-manager", 0.0),
        "kube-scheduler": flows.pop("kube-scheduler", 0.0),
        "kwok and other exempt": flows.pop("exempt", 0.0) + flows.pop("probes", 0.0) - delta["leases"] - own,
    }
    result["other"] = sum(flows.values())
    return result


# ---------------------------------------------------------------- the two sides


def resources(setup: Setup) -> dict[str, Obj]:
    """The ScrapeJob and the CaptionJob (its input named by URI, so it does not wait for the scrape)."""
    annotations = {RUN_DURATION_ANNOTATION: f"{setup.unit_seconds:g}s"}
    meta = {"namespace": NAMESPACE, "annotations": annotations}
    return {
        "scrape": {
            "apiVersion": "commoncanvas.dev/v1alpha1",
            "kind": "ScrapeJob",
            "metadata": {"name": "scrape", **meta},
            "spec": {
                "source": {"uri": f"s3://{BUCKET}/yfcc100m.tsv"},
                "output": {"uri": f"s3://{BUCKET}/scrape"},
                "parallelism": setup.scrape_parallelism,
            },
        },
        "caption": {
            "apiVersion": "commoncanvas.dev/v1alpha1",
            "kind": "CaptionJob",
            "metadata": {"name": "caption", **meta},
            "spec": {
                "input": {"uris": [f"s3://{BUCKET}/catalog"]},
                "output": {"uri": f"s3://{BUCKET}/caption"},
                "gpusPerPod": 1,
                "parallelism": setup.caption_parallelism,
            },
        },
    }


def chart_values(setup: Setup) -> Obj:
    """Both sides' chart values (the operator side adds the object store through installed_operator)."""
    return {
        "operator": {"replicas": 0, "watchNamespace": NAMESPACE, "reconcileSeconds": setup.reconcile_seconds},
        "workers": {"backoffLimitPerIndex": 2},
        "nodePools": {"cpu": {"nodeSelector": CPU_POOL.node_selector, "tolerations": []}},
    }


def chart_settings(cluster: LocalCluster, values_file: Path) -> Obj:
    """The operator settings the chart renders (the baseline builds its Jobs with the same ones)."""
    rendered = helm(
        cluster,
        "template",
        RELEASE,
        str(CHART),
        f"--namespace={NAMESPACE}",
        f"--values={values_file}",
        "--show-only=templates/settings.yaml",
    ).stdout
    config_map = next(d for d in yaml.safe_load_all(rendered) if d and "settings.json" in d.get("data", {}))
    settings: Obj = json.loads(config_map["data"]["settings.json"])
    return settings


def seed_plans(minio: MinioServer, setup: Setup) -> None:
    """What the plan pods would have written (kwok runs no worker): the unit count of each stage."""
    client = minio.client()
    minio.make_bucket(BUCKET)
    summary = {"units": setup.scrape_units}
    client.put_object(Bucket=BUCKET, Key="scrape/_plan/summary.json", Body=json.dumps(summary))
    units = {"hash": "seeded", "units": [{} for _ in range(setup.caption_units)]}
    client.put_object(Bucket=BUCKET, Key="caption/_plan/units.json", Body=json.dumps(units))


def completed_indexes(text: str | None) -> set[int]:
    """A Job's `status.completedIndexes` ("0-3,7") as a set."""
    done: set[int] = set()
    for part in filter(None, (text or "").split(",")):
        first, _, last = part.partition("-")
        done.update(range(int(first), int(last or first) + 1))
    return done


class MarkerWriter:
    """Writes, for each completed worker pod, its units' markers and its progress object to MinIO, as
    the worker itself would (kwok runs no worker): from a thread of its own, so the writes never delay
    the polls that time the milestones."""

    def __init__(self, minio: MinioServer, setup: Setup) -> None:
        self.client, self.setup = minio.client(), setup
        self.seen: dict[str, set[int]] = {stage: set() for stage in STAGES}
        self.todo: queue.Queue[tuple[str, int] | None] = queue.Queue()
        self.written = 0
        self.thread = threading.Thread(target=self._write, daemon=True, name="markers")
        self.thread.start()

    def completed(self, stage: str, indexes: set[int]) -> None:
        for index in sorted(indexes - self.seen[stage]):
            self.todo.put((stage, index))
        self.seen[stage] |= indexes

    def _share(self, stage: str, index: int) -> range:
        """The units worker `index` runs: the units Job has one pod per worker, min(parallelism, units)
        of them, and a worker starts in its own contiguous range (commoncanvas.workqueue)."""
        units = self.setup.caption_units if stage == "caption" else self.setup.scrape_units
        parallelism = self.setup.caption_parallelism if stage == "caption" else self.setup.scrape_parallelism
        workers = max(1, min(parallelism, units))
        return range(index * units // workers, (index + 1) * units // workers)

    def _write(self) -> None:
        from commoncanvas.units import marker_key
        from commoncanvas.workqueue import WORKERS

        while (item := self.todo.get()) is not None:
            stage, index = item
            share = self._share(stage, index)
            for unit in share:
                stats = {"unit": unit, "seconds": self.setup.unit_seconds, "written": 0, "bytes": 0}
                body = json.dumps(stats)
                self.client.put_object(Bucket=BUCKET, Key=f"{stage}/{marker_key(unit)}", Body=body)
                self.written += 1
            # ... and its progress object, which is what the operator reads.
            now = time.time()
            progress = {"worker": f"w{index:04d}", "index": index, "units": list(share), "written": 0}
            progress.update(
                modelLoads=int(stage == "caption"), started=now - self.setup.unit_seconds, updated=now
            )
            key = f"{stage}/{WORKERS}/w{index:04d}.json"
            self.client.put_object(Bucket=BUCKET, Key=key, Body=json.dumps(progress))

    def close(self) -> int:
        self.todo.put(None)
        self.thread.join(timeout=120)
        return self.written


class Tracker:
    """Polls the Jobs (and the resources) of the namespace; records when each milestone is first seen."""

    def __init__(
        self, api: KubeApi, setup: Setup, operator: bool, started: float, markers: MarkerWriter | None = None
    ) -> None:
        self.api, self.setup, self.operator, self.started = api, setup, operator, started
        self.markers = markers
        self.stages: dict[str, dict[str, float]] = {stage: {} for stage in STAGES}
        self.requests = 0
        self.last: dict[str, Obj] = {}

    def _list(self, path: str) -> list[Obj]:
        self.requests += 1
        items: list[Obj] = self.api.get(path)["items"]
        return items

    def _seen(self, stage: str, milestone: str, now: float) -> None:
        self.stages[stage].setdefault(milestone, now - self.started)

    def poll(self) -> bool:
        """One look; True once every stage is done (its units Job, or with the operator its resource)."""
        now = time.monotonic()
        jobs = {
            job["metadata"]["name"]: job for job in self._list(f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs")
        }
        for stage in STAGES:
            job = jobs.get(f"{stage}-units")
            if job is None:
                continue
            status = job.get("status") or {}
            self.last[f"{stage}-units"] = status
            failed = [
                c for c in status.get("conditions") or [] if c["type"] == "Failed" and c["status"] == "True"
            ]
            if failed:
                raise RuntimeError(f"Job {stage}-units failed: {failed[0].get('message')}")
            if self.markers is not None:
                self.markers.completed(stage, completed_indexes(status.get("completedIndexes")))
            completions = int(job["spec"]["completions"])
            started_or_done = sum(int(status.get(key) or 0) for key in ("ready", "succeeded", "failed"))
            self._seen(stage, "units_job", now)
            if started_or_done >= min(int(job["spec"]["parallelism"]), completions):
                self._seen(stage, "first_wave", now)
            if started_or_done >= completions:
                self._seen(stage, "all_scheduled", now)
            if int(status.get("succeeded") or 0) >= completions:
                self._seen(stage, "units_done", now)
        if not self.operator:
            return all("units_done" in milestones for milestones in self.stages.values())
        for stage, (kind, plural) in STAGES.items():
            for item in self._list(f"{API}/namespaces/{NAMESPACE}/{plural}"):
                status = item.get("status") or {}
                self.last[kind] = status
                if status.get("phase") == "Failed":
                    raise RuntimeError(f"{kind} {stage} failed: {json.dumps(status)[:2000]}")
                if int((status.get("units") or {}).get("succeeded") or 0) >= self.setup.stage_units(stage):
                    self._seen(stage, "status_units", now)
                if status.get("phase") == "Succeeded":
                    self._seen(stage, "succeeded", now)
        return all("succeeded" in milestones for milestones in self.stages.values())

    def follow(self, check: Callable[[], None] = lambda: None) -> float:
        """Poll until done; the seconds from t=0 to the poll that saw it done."""
        deadline = self.started + self.setup.timeout
        while not self.poll():
            check()
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"not done after {self.setup.timeout:.0f}s; milestones {self.stages}; "
                    f"last status {json.dumps(self.last)[:3000]}"
                )
            time.sleep(self.setup.poll)
        return time.monotonic() - self.started


def start_cluster(setup: Setup, state_dir: Path) -> LocalCluster:
    # The controller manager's and scheduler's client rate limits (20 and 50 requests/s) would be the
    # floor at this scale, not the Jobs; lifted as kwokctl does for scale tests (0 keeps them).
    qps = setup.client_qps
    lifted = [f"--kube-api-qps={qps}", f"--kube-api-burst={2 * qps}"] if qps else []
    cluster = LocalCluster(
        state_dir,
        extra_args={"kube-controller-manager": lifted, "kube-scheduler": lifted},
        cpu_nodes=setup.cpu_nodes,
        a100_nodes=setup.nodes,
        local_nodes=0,
        pod_run_seconds=1.0,
        kueue=False,  # both sides as before: nothing else watching Jobs
    )
    began = time.monotonic()
    cluster.start(timeout=300)
    cluster.create_namespace(NAMESPACE)
    print(
        f"  cluster up in {time.monotonic() - began:.0f}s: {setup.nodes} A100 nodes ({setup.gpus} GPUs), "
        f"{setup.cpu_nodes} CPU nodes",
        flush=True,
    )
    return cluster


def run_baseline(setup: Setup, cluster: LocalCluster, work: Path) -> Outcome:
    from commoncanvas_operator.builders import build_job_file, build_stage_job, resolve_resource
    from commoncanvas_operator.settings import Settings

    values_file = work / "values.yaml"
    values_file.write_text(yaml.safe_dump(chart_values(setup)))
    settings = Settings.from_dict(chart_settings(cluster, values_file))
    objects: list[tuple[str, Obj]] = []
    for stage, body in resources(setup).items():
        job_file = build_job_file(resolve_resource(body, None), body["spec"])
        job = build_stage_job(body, "units", settings, units=setup.stage_units(stage))
        objects += [
            (f"/api/v1/namespaces/{NAMESPACE}/configmaps", job_file),
            (f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs", job),
        ]
    with tls_client(cluster.kubeconfig) as metrics:
        before = request_counts(metrics)
        started = time.monotonic()
        for path, obj in objects:
            cluster.api.create(path, obj)
        tracker = Tracker(cluster.api, setup, operator=False, started=started)
        window = tracker.follow()
        after = request_counts(metrics)
    return Outcome(
        "baseline", tracker.stages, window, by_client(before, after, tracker.requests), tracker.requests
    )


def operator_metrics(port: int) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).raise_for_status().text
    samples = parse_metrics(
        text, "commoncanvas_operator_reconcile_seconds_sum", "commoncanvas_operator_reconcile_seconds_count"
    )
    total = sum(v for name, _, v in samples if name.endswith("_sum"))
    count = sum(v for name, _, v in samples if name.endswith("_count"))
    return {"reconciles": count, "reconcile_mean_ms": 1000 * total / count if count else 0.0}


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the most resident memory the process ever had."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def run_operator(setup: Setup, cluster: LocalCluster, work: Path) -> Outcome:
    with (
        MinioServer(work / "minio" / "data", log_dir=cluster.logs_dir) as minio,
        installed_operator(cluster, NAMESPACE, minio, work, chart_values(setup)) as env,
    ):
        seed_plans(minio, setup)
        operator = OperatorProcess(NAMESPACE, env, cluster.logs_dir / "operator.log")
        operator.start()
        assert operator.process is not None
        process = psutil.Process(operator.process.pid)

        def alive() -> None:
            if process.status() == psutil.STATUS_ZOMBIE or not process.is_running():
                raise RuntimeError(f"the operator exited:\n{operator.log_tail(4000)}")

        try:
            wait_until(
                lambda: http_ok(f"http://127.0.0.1:{operator.liveness}/healthz"),
                120,
                "the operator's liveness endpoint",
            )
            with tls_client(cluster.kubeconfig) as metrics:
                before = request_counts(metrics)
                cpu_before = sum(process.cpu_times()[:4])
                started = time.monotonic()
                for stage, body in resources(setup).items():
                    cluster.api.create(f"{API}/namespaces/{NAMESPACE}/{STAGES[stage][1]}", body)
                markers = MarkerWriter(minio, setup)
                tracker = Tracker(cluster.api, setup, operator=True, started=started, markers=markers)
                try:
                    window = tracker.follow(alive)
                finally:
                    written = markers.close()
                after = request_counts(metrics)
                cpu = sum(process.cpu_times()[:4]) - cpu_before
            figures = {"cpu_seconds": cpu, "peak_rss_mb": peak_rss_mb(process.pid), "markers": written}
            figures.update(operator_metrics(operator.metrics_port))
        except BaseException:
            print(f"--- operator log:\n{operator.log_tail(6000)}", file=sys.stderr)
            raise
        finally:
            operator.kill()
    requests = by_client(before, after, tracker.requests)
    return Outcome("operator", tracker.stages, window, requests, tracker.requests, figures)


RUNNERS: dict[str, Callable[[Setup, LocalCluster, Path], Outcome]] = {
    "baseline": run_baseline,
    "operator": run_operator,
}


def run_side(side: str, setup: Setup) -> Outcome:
    """One side on its own fresh control plane, stopped (and its state removed) whatever happens."""
    work = Path(tempfile.mkdtemp(prefix=f"commoncanvas-bench-scale-{side}-"))
    cluster: LocalCluster | None = None
    try:
        cluster = start_cluster(setup, work / "cluster")
        return RUNNERS[side](setup, cluster, work)
    except BaseException:
        if cluster is not None and cluster.processes:
            print(cluster.diagnostics(log_lines=20)[-8000:], file=sys.stderr)
        raise
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------- the report


Measure = Callable[[Outcome], float | None]


def _measures(setup: Setup) -> list[tuple[str, str, Measure, str, bool]]:
    """(key, label, measure, format, ratio?) of every reported figure."""

    def at(name: str) -> Measure:
        return lambda o: o.milestone(name)

    def per_unit(client: str) -> Measure:
        return lambda o: o.requests[client] / setup.units

    def figure(key: str) -> Measure:
        return lambda o: o.operator.get(key)

    return [
        ("units_job", "units Jobs exist, s", at("units_job"), ".1f", False),
        ("first_wave", "first wave started, s", at("first_wave"), ".1f", True),
        ("all_scheduled", "all unit pods scheduled, s", at("all_scheduled"), ".1f", True),
        ("units_done", "all units succeeded (Job), s", at("units_done"), ".1f", True),
        ("status_units", "... in resource status, s", at("status_units"), ".1f", False),
        ("succeeded", "phase Succeeded, s", at("succeeded"), ".1f", False),
        ("status_lag", "status update lag, s", lambda o: o.lag("units_done", "status_units"), ".1f", False),
        ("requests_per_unit", "API requests / unit", per_unit("all"), ".2f", True),
        *((f"requests_per_unit:{c}", f"  {c}", per_unit(c), ".3f", False) for c in CLIENTS),
        ("operator_cpu_seconds", "operator CPU s", figure("cpu_seconds"), ".1f", False),
        ("operator_peak_rss_mb", "operator peak RSS MB", figure("peak_rss_mb"), ".0f", False),
        ("reconciles", "reconcile passes", figure("reconciles"), ".0f", False),
        ("reconcile_mean_ms", "reconcile pass mean ms", figure("reconcile_mean_ms"), ".1f", False),
        ("markers", "unit markers written", figure("markers"), ".0f", False),
    ]


def report(setup: Setup, results: dict[str, list[Outcome]]) -> dict[str, Any]:
    sides = [side for side in SIDES if results.get(side)]
    rounds = max(len(results[side]) for side in sides)
    both = len(sides) == 2
    table = Table(
        f"Operator on kwok: {setup.nodes} A100 nodes ({setup.gpus} GPUs) + {setup.cpu_nodes} CPU "
        f"nodes; CaptionJob {setup.caption_units} units x{setup.caption_parallelism}, ScrapeJob "
        f"{setup.scrape_units} units x{setup.scrape_parallelism}; units run {setup.unit_seconds:g}s; "
        f"median [min-max] of {rounds} rounds",
        ["", *sides, *(["operator / baseline"] if both else [])],
        caption=(
            f"Seconds from the create requests to the first poll (every {setup.poll:g}s) that saw it, for "
            "the later of the two stages. first wave: min(parallelism, units) pods of each units Job running "
            "or done; all scheduled: every unit's pod running or done; status update lag: from the Job "
            "counting every unit succeeded to the resource's status.units saying so (the larger of the two "
            "stages). API requests: the API server's counters over the window, less node Lease heartbeats, "
            "non-resource paths and this benchmark's polling; per client from the API Priority and Fairness "
            f"flow schemas. Operator reconcile interval {setup.reconcile_seconds:g}s; controller manager and "
            f"scheduler client QPS {setup.client_qps or 'default'}. A ratio's spread is that of its "
            "per-round ratios."
        ),
    )
    line: dict[str, Any] = {
        "benchmark": "operator_scale",
        **asdict(setup),
        "gpus": setup.gpus,
        "cpu_nodes": setup.cpu_nodes,
        "rounds": rounds,
        **{side: {} for side in sides},
    }
    for key, label, measure, spec, ratio in _measures(setup):
        values = {side: [measure(o) for o in results[side]] for side in sides}
        cells = [spread(values[side], spec) for side in sides]
        if both:
            per_round = ratios(values["operator"], values["baseline"])
            cells.append(spread(per_round, ".2f", "x") if ratio else "")
            if ratio:
                line[f"ratio_{key}"] = rounded(stats(per_round))
        table.add_row(label, *cells)
        for side in sides:
            summary = stats(values[side])
            line[side][key] = None if summary["median"] is None else round(summary["median"], 4)
            line[side][f"{key}_spread"] = rounded(summary, 4)
    for side in sides:
        line[side]["rounds"] = [
            {
                "window_seconds": round(o.window_seconds, 2),
                "stages": {s: {k: round(v, 2) for k, v in m.items()} for s, m in o.stages.items()},
                "requests": {k: round(v) for k, v in o.requests.items()},
                "polling_requests": o.polling_requests,
                **{k: round(v, 2) for k, v in o.operator.items()},
            }
            for o in results[side]
        ]
    table.print()
    print(json.dumps(line))
    return line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="python -m bench.operator_scale", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--nodes", type=int, default=int(env("BENCH_NODES", "200")), help="fake A100 nodes")
    parser.add_argument("--caption-units", type=int, default=int(env("BENCH_CAPTION_UNITS", "5000")))
    parser.add_argument("--scrape-units", type=int, default=int(env("BENCH_SCRAPE_UNITS", "20000")))
    parser.add_argument(
        "--caption-parallelism", type=int, help="CaptionJob pods at once (default: one per GPU, 8 per node)"
    )
    parser.add_argument(
        "--scrape-parallelism", type=int, help="ScrapeJob pods at once (default: 10 per A100 node)"
    )
    parser.add_argument(
        "--unit-seconds",
        type=float,
        default=float(env("BENCH_UNIT_SECONDS", "10")),
        help="how long kwok runs a unit pod",
    )
    parser.add_argument(
        "--reconcile-seconds", type=float, help="operator reconcile interval (default: the chart's)"
    )
    parser.add_argument(
        "--client-qps",
        type=int,
        default=5000,
        help="controller manager and scheduler API client QPS (burst twice that); 0 keeps their defaults",
    )
    parser.add_argument("--poll", type=float, default=0.5, help="seconds between status polls")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds each side may take")
    parser.add_argument(
        "--rounds",
        type=int,
        default=int(env("BENCH_SCALE_ROUNDS", "2")),
        help="repeat both sides, alternating which goes first; median [min-max] is reported (5+ for a "
        "spread worth the name: minutes per round at the default size)",
    )
    parser.add_argument("--only", choices=SIDES, help="run one side only")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    setup = Setup(
        nodes=args.nodes,
        caption_units=args.caption_units,
        scrape_units=args.scrape_units,
        caption_parallelism=args.caption_parallelism or args.nodes * GPUS_PER_NODE,
        scrape_parallelism=args.scrape_parallelism or 10 * args.nodes,
        unit_seconds=args.unit_seconds,
        reconcile_seconds=args.reconcile_seconds or chart_reconcile_seconds(),
        client_qps=args.client_qps,
        poll=args.poll,
        timeout=args.timeout,
    )
    sides = [args.only] if args.only else list(SIDES)

    def said(round_: int, side: str, outcome: Outcome) -> None:
        done = outcome.milestone("units_done") or 0
        print(
            f"round {round_ + 1} {side}: all units succeeded after {done:.1f}s, done after "
            f"{outcome.window_seconds:.1f}s; {outcome.requests['all']:.0f} API requests",
            flush=True,
        )

    # Alternating which side goes first: a shared machine's load drifts.
    contenders = {side: (lambda side=side: run_side(side, setup)) for side in sides}
    results = alternate(contenders, args.rounds, said)
    return report(setup, results)


if __name__ == "__main__":
    main()

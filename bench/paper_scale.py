"""Workers pulling units, held against the paper's scale: what a unit costs beyond its own work.

    python -m bench paper_scale [--rounds 5] [--units 200] [--scrape-samples 1000] [--caption-images 32]
        [--kwok-units 1000,100000] [--kwok-workers 256] [--kwok-nodes 32] [--kwok-seconds 120] [--parts abc]

(a) Measured here, each over `--rounds` rounds (median [min-max]):
- bookkeeping per unit: a worker (`commoncanvas.workqueue.Worker`) claims, checks, publishes and
  reports `--units` units whose own work is nothing, against a real MinIO (the harness' binary, on
  loopback) and against a local directory. That is every store request a unit costs a worker: the
  claim's conditional create, the done check, the fencing check, the marker's conditional create, the
  claim's close, the progress object, plus a lease renewal every `lease/3` of work.
- a unit's own work at the default sizes: a real scrape unit (`ScrapeStage`) fetching
  `--scrape-samples` synthetic photos from a local HTTP server (50 ms latency, 64 in flight), and a
  real caption unit with the tiny random-weight BLIP-2 on this CPU over `--caption-images` images,
  each scaled per sample to the default unit size (`unitSize` 10,000; `samplesPerUnit` 8,192).
  The overhead share is bookkeeping over (bookkeeping + work).
(c) A projection for the paper's run from those costs: 70M images captioned on 64 and 256 A100s at
the paper's ~17 images/s per A100 (1,120 A100-hours) and at the 100/s goal: units, pods, model loads,
store requests for claims and for the operator's progress reads, the overhead share; beside the
per-shard units of before (a unit per 64 MiB catalog shard, 20-300 photos, one pod and model load each).

(b) The operator's cost on kwok (`--kwok-units 1000,100000 --kwok-workers 256 --kwok-nodes 32`), when
the harness' binaries are built (make cluster-tools; skipped with a note otherwise): one control plane
from tests/cluster (bench.operator_scale's setup) with the chart installed once; per size a fresh
operator process and a CaptionJob of that many planned units (`_plan/units.json` seeded in MinIO,
ShardGroupUnit dicts) and `parallelism` workers, created and followed to phase Succeeded. kwok runs the
worker pods `--kwok-seconds`; meanwhile this benchmark plays the workers against MinIO: every
`--kwok-progress-seconds` it rewrites the W progress objects `_workers/{worker}.json` with their `units`
growing, all published by 80% of the pods' run, writes each published unit's marker from a thread pool
(`--no-kwok-markers`: progress only; the operator no longer reads markers; on a 2-core machine the
pool falls behind at 100,000 units and the count written by Succeeded is reported), then summary.json
before finalize. The plan pod gets the `{"units": N}` termination message a kubelet would keep (kwok writes
none). Measured per size: the operator's API requests/s (the API server's counters), CPU s/min and
peak RSS, create to Succeeded, reconcile passes and mean (operator /metrics); the largest / smallest
ratio should stay near 1. Each round is minutes (worker pods run 120 s by default), so
`--kwok-rounds` defaults to 1. `--parts ab` skips (c), `--parts b` runs (b) alone.
Options also come from the environment: BENCH_ROUNDS, BENCH_UNITS, BENCH_SCRAPE_SAMPLES,
BENCH_CAPTION_IMAGES, BENCH_KWOK_UNITS, BENCH_KWOK_WORKERS, BENCH_KWOK_NODES, BENCH_KWOK_SECONDS,
BENCH_KWOK_ROUNDS.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.report import MIN_ROUNDS, Table, ratios, rounded, spread, stats

PAPER_IMAGES = 70_000_000
PAPER_ROWS = 100_000_000
PAPER_IMAGES_PER_A100 = 17.0  # 70M images in ~1,120 A100-hours
GOAL_IMAGES_PER_A100 = 100.0
SHARD_PHOTOS = (20, 300)  # a 64 MiB catalog shard of native-resolution photos
RECONCILE_SECONDS = 10.0


class NoWork:
    """A stage whose units do nothing: what is left of a unit's time is the workqueue's."""

    stage = "bench"

    def __init__(self, uri: str, total: int) -> None:
        from commoncanvas.storage import open_storage

        self.output = open_storage(uri)
        self.total = total

    def total_units(self) -> int:
        return self.total

    def load_model(self) -> bool:
        return False

    def run_attempt(self, unit: int, attempt: int) -> dict[str, Any]:
        return {"unit": unit, "split": "commercial", "written": 0, "outcomes": {}, "licenses": {}}


def bookkeeping_seconds(uri: str, units: int) -> float:
    """Seconds per unit a worker spends on claims, markers and progress."""
    from commoncanvas.workqueue import Identity, Worker

    worker = Worker(NoWork(uri, units), Identity(0, 1), lease=60)
    started = time.perf_counter()
    worker.run()
    return (time.perf_counter() - started) / units


def scrape_seconds_per_sample(work: Path, samples: int) -> float:
    """One real scrape unit over synthetic photos served locally."""
    from bench.scrape_fetch import build_corpus, write_inputs
    from commoncanvas.sample.server import LocalHTTPServer
    from commoncanvas.scrape.worker import ScrapeStage, ensure_plan, layout_of
    from commoncanvas.specs import ScrapeJob

    corpus = build_corpus(samples, seed=0)
    www = work / "www"
    for path, body in corpus.files.items():
        target = www / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(body)
    with LocalHTTPServer(root=www, latency=0.05) as server:
        write_inputs(corpus, server.base_url, work)
        job = ScrapeJob.model_validate(
            {
                "metadata": {"name": "bench"},
                "spec": {
                    "source": {"uri": str(work / "yfcc100m_bench.tsv")},
                    "output": {"uri": str(work / f"out-{time.monotonic_ns()}")},
                    "unitSize": samples,
                    "fetch": {
                        "originalUrlTemplate": server.base_url
                        + "/farm{farm}/{server}/{id}_{secret_original}_o.{ext}",
                        "sizedUrlTemplate": server.base_url + "/farm{farm}/{server}/{id}_{secret}_b.jpg",
                        "allowPrivateNetworks": True,
                        "allowedHosts": ["127.0.0.1"],
                        "retries": 0,
                    },
                },
            }
        )
        ensure_plan(job.spec, layout_of(job.spec))
        stage = ScrapeStage(job.spec)
        started = time.perf_counter()
        stats_ = stage.run_attempt(0, 0)
        seconds = time.perf_counter() - started
    return seconds / max(1, int(stats_["planned"]))


def caption_seconds_per_image(work: Path, images: int) -> float:
    """One real caption unit with the tiny BLIP-2 on this CPU (model loaded before the clock starts)."""
    from streaming import MDSWriter

    from commoncanvas.caption.worker import CaptionStage
    from commoncanvas.models import write_tiny_blip2
    from commoncanvas.sample import synthetic_jpeg
    from commoncanvas.scrape.worker import CATALOG_COLUMNS, blank_catalog_row
    from commoncanvas.specs import CaptionJob

    catalog = work / "catalog"
    with MDSWriter(out=str(catalog / "commercial"), columns=CATALOG_COLUMNS) as writer:
        for number in range(images):
            row: dict[str, Any] = blank_catalog_row()
            row.update(image=synthetic_jpeg(number), photo_id=number, license_code="cc0", tags=[])
            row.update(width=640, height=480)
            writer.write(row)
    model = write_tiny_blip2(work / "blip2")
    job = CaptionJob.model_validate(
        {
            "metadata": {"name": "bench"},
            "spec": {
                "input": {"uris": [str(catalog)], "splits": ["commercial"]},
                "output": {"uri": str(work / f"captions-{time.monotonic_ns()}")},
                "model": {"source": str(model)},
                "decoding": {"maxNewTokens": 8, "minNewTokens": 8},
                "batchSize": 16,
                "loaderWorkers": 0,
            },
        }
    )
    stage = CaptionStage(job.spec)
    stage.load_model()
    started = time.perf_counter()
    stage.run_attempt(0, 0)
    return (time.perf_counter() - started) / images


def projection(bookkeeping: float, lease: float = 120.0) -> list[dict[str, Any]]:
    """The paper's captioning run, before (a pod per shard) and now (a pod per worker)."""
    from commoncanvas.specs.caption import CAPTION_SAMPLES_PER_UNIT

    rows = []
    units = -(-PAPER_IMAGES // CAPTION_SAMPLES_PER_UNIT)
    for gpus in (64, 256):
        for rate in (PAPER_IMAGES_PER_A100, GOAL_IMAGES_PER_A100):
            hours = PAPER_IMAGES / (gpus * rate) / 3600
            unit_seconds = CAPTION_SAMPLES_PER_UNIT / rate
            # Per unit: 6 requests plus a lease renewal every lease/3 seconds of work.
            claim_requests = units * (6 + unit_seconds / (lease / 3))
            operator_reads = (hours * 3600 / RECONCILE_SECONDS) * (1 + gpus)
            rows.append(
                {
                    "gpus": gpus,
                    "imagesPerSecondPerGpu": rate,
                    "hours": round(hours, 1),
                    "units": units,
                    "podsNow": gpus,
                    "modelLoadsNow": gpus,
                    "podsBefore": [PAPER_IMAGES // SHARD_PHOTOS[1], PAPER_IMAGES // SHARD_PHOTOS[0]],
                    "claimRequests": int(claim_requests),
                    "operatorStoreReads": int(operator_reads),
                    "overheadShare": bookkeeping / (bookkeeping + unit_seconds),
                }
            )
    return rows


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench paper_scale")
    env = os.environ.get
    parser.add_argument("--rounds", type=int, default=int(env("BENCH_ROUNDS", MIN_ROUNDS)))
    parser.add_argument("--units", type=int, default=int(env("BENCH_UNITS", "200")))
    parser.add_argument("--scrape-samples", type=int, default=int(env("BENCH_SCRAPE_SAMPLES", "1000")))
    parser.add_argument("--caption-images", type=int, default=int(env("BENCH_CAPTION_IMAGES", "32")))
    parser.add_argument("--out", type=Path, default=None, help="Also write the results here (JSON)")
    parser.add_argument("--parts", default="abc", help="which of (a), (b), (c) to run; (c) needs (a)")
    parser.add_argument(
        "--kwok-units", default=env("BENCH_KWOK_UNITS", "1000,100000"), help="planned units, one run each"
    )
    parser.add_argument("--kwok-workers", type=int, default=int(env("BENCH_KWOK_WORKERS", "256")))
    parser.add_argument("--kwok-nodes", type=int, default=int(env("BENCH_KWOK_NODES", "32")))
    parser.add_argument(
        "--kwok-seconds",
        type=float,
        default=float(env("BENCH_KWOK_SECONDS", "120")),
        help="how long kwok runs a worker pod",
    )
    parser.add_argument(
        "--kwok-rounds",
        type=int,
        default=int(env("BENCH_KWOK_ROUNDS", "1")),
        help="rounds of (b); 1 by default since each is minutes",
    )
    parser.add_argument("--kwok-progress-seconds", type=float, default=5.0, help="between progress writes")
    parser.add_argument("--no-kwok-markers", action="store_true", help="write progress objects only")
    parser.add_argument("--kwok-reconcile-seconds", type=float, help="default: the chart's")
    parser.add_argument("--kwok-timeout", type=float, default=1800.0, help="seconds one CaptionJob may take")
    args, _ = parser.parse_known_args(argv)
    return args


def minio_uri(work: Path) -> tuple[Any, str] | None:
    """A real MinIO on loopback when the harness has built one (make cluster-tools), else None."""
    from tests.cluster.minio import MinioServer

    try:
        server = MinioServer(work / "minio-data", log_dir=work / "minio-logs")
        server.start()
    except Exception as error:  # not built here: the local directory figures stand alone
        print(f"paper_scale: no MinIO ({error}); bookkeeping measured on a local directory only")
        return None
    server.make_bucket("bench")
    for key, value in server.env().items():
        os.environ[key] = value
    from commoncanvas import storage

    storage.s3_client.cache_clear()
    return server, "s3://bench"


def overhead(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """(a), and (c) from its figures."""
    from commoncanvas.specs.caption import CAPTION_SAMPLES_PER_UNIT
    from commoncanvas.specs.scrape import ScrapeJobSpec

    scrape_unit = ScrapeJobSpec.model_fields["unit_size"].default
    with tempfile.TemporaryDirectory(prefix="bench-paper-scale-") as tmp:
        work = Path(tmp)
        store = minio_uri(work)
        try:
            local: list[float] = []
            remote: list[float] = []
            scrape: list[float] = []
            caption: list[float] = []
            for round_ in range(args.rounds):
                local.append(bookkeeping_seconds(str(work / f"local-{round_}"), args.units))
                if store:
                    remote.append(bookkeeping_seconds(f"{store[1]}/round-{round_}", args.units))
                scrape.append(scrape_seconds_per_sample(work / f"scrape-{round_}", args.scrape_samples))
                caption.append(caption_seconds_per_image(work / f"caption-{round_}", args.caption_images))
        finally:
            if store:
                store[0].stop()
    results["bookkeepingSecondsPerUnit"] = {"local": stats(local), "minio": stats(remote)}
    results["scrapeSecondsPerSample"] = stats(scrape)
    results["captionSecondsPerImage"] = stats(caption)
    bookkeeping = statistics.median(remote or local)
    table = Table(
        f"paper_scale: per-unit overhead at default unit sizes ({args.rounds} rounds, median [min-max])",
        ["stage", "unit size", "unit work s", "bookkeeping ms", "overhead"],
        caption="bookkeeping: claim, checks, marker, progress, against "
        + ("MinIO on loopback" if remote else "a local directory"),
    )
    for name, per_sample, size in (
        ("scrape", scrape, scrape_unit),
        ("caption (tiny BLIP-2, CPU)", caption, CAPTION_SAMPLES_PER_UNIT),
    ):
        work_seconds = [s * size for s in per_sample]
        shares = [bookkeeping / (bookkeeping + w) * 100 for w in work_seconds]
        table.add_row(
            name,
            size,
            spread(work_seconds),
            spread([b * 1000 for b in remote or local]),
            spread(shares, ".3f", "%"),
        )
        results[f"{name.split()[0]}OverheadShare"] = stats(shares)
    table.print()
    if "c" not in args.parts:
        return
    results["projection"] = projection(bookkeeping)
    paper = Table(
        "paper_scale: projection for captioning 70M images (units of 8,192; a pod and model load per GPU)",
        [
            "A100s",
            "img/s/GPU",
            "hours",
            "units",
            "pods (before)",
            "model loads",
            "claim reqs",
            "operator reads",
            "overhead",
        ],
    )
    for row in results["projection"]:
        before = f"{row['podsBefore'][0]:,}-{row['podsBefore'][1]:,}"
        paper.add_row(
            row["gpus"],
            f"{row['imagesPerSecondPerGpu']:g}",
            row["hours"],
            f"{row['units']:,}",
            f"{row['podsNow']} ({before})",
            row["modelLoadsNow"],
            f"{row['claimRequests']:,}",
            f"{row['operatorStoreReads']:,}",
            f"{row['overheadShare'] * 100:.4f}%",
        )
    paper.print()


# ---------------------------------------------------------------- (b) the operator on kwok

KWOK_BUCKET = "paper"
KWOK_SPLIT = "commercial"
HARNESS_BINARIES = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kwok",
    "helm",
    "minio",
)


def missing_harness_binaries() -> list[str]:
    from tests.cluster.processes import bin_dir

    return [name for name in HARNESS_BINARIES if not os.access(bin_dir() / name, os.X_OK)]


def unit_doc(unit: int, split_root: str, samples: int) -> dict[str, Any]:
    """A ShardGroupUnit as shardplan writes it, with one MDS shard entry of the catalog's columns."""
    columns = {"image": "jpeg", "photo_id": "int", "license_code": "str", "title": "str", "tags": "json"}
    shard = {
        "column_encodings": list(columns.values()),
        "column_names": list(columns),
        "column_sizes": [None] * len(columns),
        "compression": None,
        "format": "mds",
        "hashes": [],
        "raw_data": {"basename": f"shard.{unit:05d}.mds", "bytes": 67_000_000, "hashes": {}},
        "samples": samples,
        "size_limit": 67_108_864,
        "version": 2,
        "zip_data": None,
    }
    return {
        "unit": unit,
        "split": KWOK_SPLIT,
        "split_root": split_root,
        "shards": [shard],
        "columns": columns,
    }


def worker_units(worker: int, workers: int, units: int, fraction: float) -> list[int]:
    """The units worker `worker` has published once `fraction` of the work is done: workers take units
    round-robin (as claims in order would), every unit published at fraction 1."""
    mine = range(worker, units, workers)
    return list(mine[: math.ceil(len(mine) * min(1.0, max(0.0, fraction)))])


def worker_doc(worker: int, units: list[int], started: float, samples: int, done: bool) -> dict[str, Any]:
    """A worker's `_workers/{name}.json` as WorkerProgress.save writes it."""
    return {
        "worker": f"w{worker:04d}-r0-kwok",
        "index": worker,
        "replica": 0,
        "device": "0",
        "visibleDevices": "0",
        "stage": "caption",
        "state": "done" if done else "running",
        "started": started,
        "updated": time.time(),
        "units": units,
        "written": len(units) * samples,
        "busySeconds": round(time.time() - started, 3),
        "modelLoads": 1,
        "lost": 0,
        "failed": {},
    }


class WorkerEmulator:
    """Plays the W workers against MinIO while kwok runs their pods: every `every` seconds each worker's
    progress object is rewritten with its `units` list grown linearly, all units published by 80% of
    the pods' run time; each newly published unit's marker is written by a pool of its own (a real
    worker writes it before its progress). Then the finalize's summary.json."""

    def __init__(
        self,
        client: Any,
        prefix: str,
        units: int,
        workers: int,
        seconds: float,
        every: float,
        markers: bool,
        samples: int,
    ) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.client, self.prefix, self.units, self.workers = client, prefix, units, workers
        self.seconds, self.every, self.markers, self.samples = seconds * 0.8, every, markers, samples
        self.progress_pool = ThreadPoolExecutor(16, thread_name_prefix="progress")
        self.marker_pool = ThreadPoolExecutor(16, thread_name_prefix="markers")
        self.marker_futures: list[Any] = []
        self.published = [0] * workers
        self.progress_writes = 0
        self.ticks: list[float] = []  # seconds each round of W progress writes took
        self.summary_at: float | None = None
        self.started = 0.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="workers")

    def start(self) -> None:
        self.started = time.time()
        self.thread.start()

    def _put(self, key: str, body: Any) -> None:
        self.client.put_object(Bucket=KWOK_BUCKET, Key=f"{self.prefix}/{key}", Body=json.dumps(body))

    def _marker(self, unit: int) -> None:
        self._put(
            f"_units/{unit:06d}.json",
            {
                "unit": unit,
                "split": KWOK_SPLIT,
                "attempt": 0,
                "written": self.samples,
                "licenses": {},
                "outcomes": {},
            },
        )

    def _tick(self, fraction: float) -> None:
        began = time.monotonic()
        docs = []
        for worker in range(self.workers):
            units = worker_units(worker, self.workers, self.units, fraction)
            if self.markers:
                self.marker_futures += [
                    self.marker_pool.submit(self._marker, u) for u in units[self.published[worker] :]
                ]
            self.published[worker] = len(units)
            docs.append(worker_doc(worker, units, self.started, self.samples, fraction >= 1))
        for future in [self.progress_pool.submit(self._put, f"_workers/{d['worker']}.json", d) for d in docs]:
            future.result()
        self.progress_writes += len(docs)
        self.ticks.append(time.monotonic() - began)

    def _run(self) -> None:
        while not self.stop.is_set():
            fraction = (time.time() - self.started) / self.seconds
            self._tick(fraction)
            if fraction >= 1:
                self._put(
                    "summary.json",
                    summary_doc(self.units, self.workers, self.samples, f"s3://{KWOK_BUCKET}/{self.prefix}"),
                )
                self.summary_at = time.time() - self.started
                return
            self.stop.wait(self.every)

    def markers_written(self) -> int:
        return sum(1 for f in self.marker_futures if f.done() and not f.cancelled() and f.exception() is None)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=60)
        for future in self.marker_futures:
            future.cancel()
        self.marker_pool.shutdown(wait=True)
        self.progress_pool.shutdown(wait=True)


def summary_doc(units: int, workers: int, samples_per_unit: int, output: str) -> dict[str, Any]:
    """summary.json as caption finalize writes it (units.summarize plus captions and excluded)."""
    samples = {KWOK_SPLIT: units * samples_per_unit}
    return {
        "samples": samples,
        "licenses": {},
        "units": units,
        "workers": workers,
        "modelLoads": workers,
        "outputs": {KWOK_SPLIT: f"{output}/{KWOK_SPLIT}"},
        "excluded": {},
        "captions": samples,
    }


def kwok_s3_client(minio: Any) -> Any:
    """boto3 with room for both emulator pools' threads (the harness' client pools 10 connections)."""
    import boto3
    from botocore.config import Config

    env = minio.env()
    return boto3.client(
        "s3",
        endpoint_url=env["S3_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 4}, max_pool_connections=40),
    )


@dataclass(frozen=True)
class KwokSetup:
    sizes: tuple[int, ...]  # planned units, one CaptionJob per size and round
    workers: int
    nodes: int  # fake A100 nodes, 8 GPUs each
    seconds: float  # how long kwok runs a worker pod
    rounds: int
    every: float  # seconds between rounds of progress writes
    markers: bool
    reconcile_seconds: float
    timeout: float
    poll: float = 0.5


def report_plan_count(api: Any, namespace: str, job: str, units: int) -> bool:
    """Give the plan pod the termination message a kubelet would (kwok writes none): `{"units": N}`.
    Without it the operator falls back to reading `_plan/units.json` (O(units) bytes) every pass."""
    pods = api.get(
        f"/api/v1/namespaces/{namespace}/pods", {"labelSelector": f"batch.kubernetes.io/job-name={job}"}
    )
    done = False
    for pod in pods["items"]:
        status = pod.get("status") or {}
        if status.get("phase") != "Succeeded":
            continue
        containers = status.get("containerStatuses") or []
        for container in containers:
            terminated = (container.get("state") or {}).get("terminated")
            if terminated is not None:
                terminated["message"] = json.dumps({"units": units})
        path = f"/api/v1/namespaces/{namespace}/pods/{pod['metadata']['name']}/status"
        api.patch(path, {"status": {"containerStatuses": containers}})
        done = True
    return done


def job_complete(job: dict[str, Any] | None) -> bool:
    conditions = ((job or {}).get("status") or {}).get("conditions") or []
    return any(c["type"] == "Complete" and c["status"] == "True" for c in conditions)


def operator_run(
    setup: KwokSetup, cluster: Any, minio: Any, env: dict[str, str], units: int, name: str
) -> dict[str, Any]:
    """One CaptionJob of `units` planned units on a fresh operator process, created to Succeeded."""
    import psutil
    from tests.cluster.kwok_stages import RUN_DURATION_ANNOTATION
    from tests.cluster.operator import OperatorProcess
    from tests.cluster.processes import http_ok, wait_until

    from bench import operator_scale as scale
    from commoncanvas.specs.caption import CAPTION_SAMPLES_PER_UNIT as samples

    ns, api = scale.NAMESPACE, cluster.api
    client = kwok_s3_client(minio)
    plan = json.dumps(
        {
            "hash": "seeded",
            "units": [unit_doc(u, f"s3://{KWOK_BUCKET}/catalog/{KWOK_SPLIT}", samples) for u in range(units)],
        }
    )
    client.put_object(Bucket=KWOK_BUCKET, Key=f"{name}/_plan/units.json", Body=plan)
    operator = OperatorProcess(ns, env, cluster.logs_dir / f"operator-{name}.log")
    operator.start()
    assert operator.process is not None
    process = psutil.Process(operator.process.pid)
    emulator = WorkerEmulator(
        client, name, units, setup.workers, setup.seconds, setup.every, setup.markers, samples
    )
    path = f"{scale.API}/namespaces/{ns}/captionjobs"
    body = {
        "apiVersion": "commoncanvas.dev/v1alpha1",
        "kind": "CaptionJob",
        "metadata": {
            "name": name,
            "namespace": ns,
            "annotations": {RUN_DURATION_ANNOTATION: f"{setup.seconds:g}s"},
        },
        "spec": {
            "input": {"uris": [f"s3://{KWOK_BUCKET}/catalog"]},
            "output": {"uri": f"s3://{KWOK_BUCKET}/{name}"},
            "gpusPerPod": 1,
            "parallelism": setup.workers,
        },
    }

    def cpu() -> float:
        return float(sum(process.cpu_times()[:4]))

    try:
        wait_until(
            lambda: http_ok(f"http://127.0.0.1:{operator.liveness}/healthz"), 120, "the operator's liveness"
        )
        with scale.tls_client(cluster.kubeconfig) as metrics:
            own = 0
            marks: dict[str, float] = {}
            counts: dict[str, dict[str, float]] = {}
            cpus: dict[str, float] = {}

            def mark(key: str) -> None:
                marks[key] = time.monotonic() - started
                counts[key], cpus[key] = scale.request_counts(metrics), cpu()

            started = time.monotonic()
            mark("created")
            api.create(path, body)
            plan_reported = False
            live = 0
            while True:
                if process.status() == psutil.STATUS_ZOMBIE:
                    raise RuntimeError(f"the operator exited:\n{operator.log_tail(4000)}")
                if time.monotonic() - started > setup.timeout:
                    raise TimeoutError(f"{name} not Succeeded after {setup.timeout:.0f}s")
                job = api.get_or_none(f"/apis/batch/v1/namespaces/{ns}/jobs/{name}-units")
                own += 1
                if not plan_reported:
                    plan_reported = report_plan_count(api, ns, f"{name}-plan", units)
                    own += 1 + plan_reported
                    if plan_reported:
                        marks["plan_reported"] = time.monotonic() - started
                        marks["plan_reported_late"] = float(job is not None)
                if (
                    job is not None
                    and "workers_running" not in marks
                    and int((job.get("status") or {}).get("ready") or 0)
                ):
                    mark("workers_running")
                    emulator.start()
                if job_complete(job) and "units_done" not in marks:
                    mark("units_done")
                status = api.get(f"{path}/{name}").get("status") or {}
                own += 1
                if not job_complete(job):
                    # What the operator made of the progress objects while the workers ran.
                    live = max(live, int((status.get("units") or {}).get("succeeded") or 0))
                if status.get("phase") == "Failed":
                    raise RuntimeError(f"{name} failed: {json.dumps(status)[:2000]}")
                if status.get("phase") == "Succeeded":
                    mark("succeeded")
                    break
                time.sleep(setup.poll)
        figures = scale.operator_metrics(operator.metrics_port)
        figures["peak_rss_mb"] = scale.peak_rss_mb(process.pid)
        figures["markers"] = emulator.markers_written()
    except BaseException:
        print(f"--- operator log:\n{operator.log_tail(6000)}", file=sys.stderr)
        raise
    finally:
        emulator.close()
        # Delete while the operator runs (its handlers may hold the resource), then stop it.
        api.delete(f"{path}/{name}")
        with contextlib.suppress(Exception):
            wait_until(lambda: api.get_or_none(f"{path}/{name}") is None, 60, f"{name} deleted")
        operator.kill()

    def rate(start: str, end: str) -> dict[str, float]:
        seconds = marks[end] - marks[start]
        requests = scale.by_client(counts[start], counts[end], 0)["operator"]
        cpu_seconds = cpus[end] - cpus[start]
        return {
            "seconds": seconds,
            "requests": requests,
            "requests_per_s": requests / seconds,
            "cpu_seconds": cpu_seconds,
            "cpu_s_per_min": 60 * cpu_seconds / seconds,
        }

    units_phase = "workers_running" in marks and "units_done" in marks
    return {
        "units": units,
        "name": name,
        "to_succeeded_s": marks["succeeded"],
        "window": rate("created", "succeeded"),
        "units_phase": rate("workers_running", "units_done") if units_phase else None,
        "plan_count_late": bool(marks.get("plan_reported_late")),
        "summary_at_s": emulator.summary_at,
        "progress_writes": emulator.progress_writes,
        "progress_tick_s": statistics.median(emulator.ticks) if emulator.ticks else None,
        "plan_mb": len(plan) / 1e6,
        "live_units_seen": live,
        "status": {k: status.get(k) for k in ("units", "workers", "modelLoads", "imagesPerSecond")},
        "polling_requests": own,
        **figures,
    }


KWOK_MEASURES: list[tuple[str, str, Any, str]] = [
    ("to_succeeded_s", "create -> Succeeded, s", lambda r: r["to_succeeded_s"], ".1f"),
    ("requests_per_s", "operator API requests/s", lambda r: r["window"]["requests_per_s"], ".2f"),
    (
        "units_requests_per_s",
        "  ... while workers run",
        lambda r: (r["units_phase"] or {}).get("requests_per_s"),
        ".2f",
    ),
    ("requests", "operator API requests", lambda r: r["window"]["requests"], ".0f"),
    ("cpu_s_per_min", "operator CPU s/min", lambda r: r["window"]["cpu_s_per_min"], ".2f"),
    (
        "units_cpu_s_per_min",
        "  ... while workers run",
        lambda r: (r["units_phase"] or {}).get("cpu_s_per_min"),
        ".2f",
    ),
    ("peak_rss_mb", "operator peak RSS MB", lambda r: r["peak_rss_mb"], ".0f"),
    ("reconciles", "reconcile passes", lambda r: r["reconciles"], ".0f"),
    ("reconcile_mean_ms", "reconcile pass mean ms", lambda r: r["reconcile_mean_ms"], ".1f"),
    ("progress_tick_s", "W progress writes take, s", lambda r: r["progress_tick_s"], ".2f"),
    ("live_units_seen", "status units done, live", lambda r: r["live_units_seen"], ".0f"),
    ("status_workers", "status workers", lambda r: r["status"].get("workers"), ".0f"),
    ("status_model_loads", "status modelLoads", lambda r: r["status"].get("modelLoads"), ".0f"),
    ("markers", "unit markers written", lambda r: r["markers"], ".0f"),
    ("plan_mb", "_plan/units.json MB", lambda r: r["plan_mb"], ".1f"),
]


def kwok_report(setup: KwokSetup, runs: dict[int, list[dict[str, Any]]]) -> dict[str, Any]:
    small, large = min(setup.sizes), max(setup.sizes)
    both = small != large
    table = Table(
        f"paper_scale (b): the operator on kwok, a CaptionJob of {setup.workers} workers on "
        f"{setup.nodes} A100 nodes, worker pods run {setup.seconds:g}s; {setup.rounds} round(s), "
        "median [min-max]",
        ["", *(f"{size:,} units" for size in setup.sizes), *([f"{large:,} / {small:,}"] if both else [])],
        caption=(
            "Operator API requests: the API server's counters (the operator's ServiceAccount flow schema) "
            "from create to phase Succeeded, and from the first worker pod ready to the units Job complete. "
            f"CPU from /proc, peak RSS is VmHWM (a fresh operator per CaptionJob). Reconcile every "
            f"{setup.reconcile_seconds:g}s. The workers are emulated: their W progress objects rewritten "
            f"every {setup.every:g}s, all units published by 80% of the pods' run"
            + (", each unit's marker written as it is published" if setup.markers else ", no unit markers")
            + '; plan pods given the {"units": N} termination message a kubelet keeps.'
        ),
    )
    result: dict[str, Any] = {"setup": asdict(setup), "sizes": {}, "ratio": {}, "runs": runs}
    for key, label, measure, spec in KWOK_MEASURES:
        values = {size: [measure(r) for r in runs[size]] for size in setup.sizes}
        cells = [spread(values[size], spec) for size in setup.sizes]
        for size in setup.sizes:
            result["sizes"].setdefault(str(size), {})[key] = rounded(stats(values[size]), 4)
        if both:
            per_round = ratios(values[large], values[small])
            result["ratio"][key] = rounded(stats(per_round), 4)
            cells.append(spread(per_round, ".2f", "x"))
        table.add_row(label, *cells)
    table.print()
    late = [r["name"] for size in setup.sizes for r in runs[size] if r["plan_count_late"]]
    if late:
        print(
            f"paper_scale (b): the plan count reached {late} only after the operator read it from the store"
        )
    return result


def operator_cost(setup: KwokSetup) -> dict[str, Any]:
    """(b): one kwok control plane, the chart installed once; per size and round a fresh operator and a
    CaptionJob followed to Succeeded (sizes alternate order by round)."""
    import shutil

    from tests.cluster.minio import MinioServer
    from tests.cluster.operator import installed_operator

    from bench import operator_scale as scale
    from bench.report import alternate

    cluster_setup = scale.Setup(
        nodes=setup.nodes,
        caption_units=max(setup.sizes),
        scrape_units=0,
        caption_parallelism=setup.workers,
        scrape_parallelism=0,
        unit_seconds=setup.seconds,
        reconcile_seconds=setup.reconcile_seconds,
        client_qps=5000,
        poll=setup.poll,
        timeout=setup.timeout,
    )
    values = {
        "operator": {
            "replicas": 0,
            "watchNamespace": scale.NAMESPACE,
            "reconcileSeconds": setup.reconcile_seconds,
        },
        "workers": {"backoffLimitPerIndex": 2},
        "nodePools": {"cpu": {"nodeSelector": scale.CPU_POOL.node_selector, "tolerations": []}},
    }
    work = Path(tempfile.mkdtemp(prefix="commoncanvas-bench-paper-kwok-"))
    cluster = None
    count = iter(range(10_000))
    began = time.monotonic()
    try:
        cluster = scale.start_cluster(cluster_setup, work / "cluster")
        with (
            MinioServer(work / "minio" / "data", log_dir=cluster.logs_dir) as minio,
            installed_operator(cluster, scale.NAMESPACE, minio, work, values) as env,
        ):
            minio.make_bucket(KWOK_BUCKET)

            def contender(size: int) -> Any:
                return lambda: operator_run(setup, cluster, minio, env, size, f"caption-{size}-{next(count)}")

            def said(round_: int, size: str, run: dict[str, Any]) -> None:
                print(
                    f"  round {round_ + 1}, {int(size):,} units: Succeeded after "
                    f"{run['to_succeeded_s']:.0f}s, "
                    f"{run['window']['requests_per_s']:.2f} operator requests/s, "
                    f"{run['window']['cpu_s_per_min']:.2f} CPU s/min, {run['peak_rss_mb']:.0f} MB",
                    flush=True,
                )

            by_name = alternate({str(size): contender(size) for size in setup.sizes}, setup.rounds, said)
            runs = {int(size): done for size, done in by_name.items()}
    except BaseException:
        if cluster is not None and cluster.processes:
            print(cluster.diagnostics(log_lines=20)[-8000:], file=sys.stderr)
        raise
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    result = kwok_report(setup, runs)
    result["seconds"] = round(time.monotonic() - began, 1)
    return result


def kwok_setup(args: argparse.Namespace) -> KwokSetup:
    from bench.operator_scale import chart_reconcile_seconds

    return KwokSetup(
        sizes=tuple(int(n) for n in str(args.kwok_units).split(",") if n.strip()),
        workers=args.kwok_workers,
        nodes=args.kwok_nodes,
        seconds=args.kwok_seconds,
        rounds=args.kwok_rounds,
        every=args.kwok_progress_seconds,
        markers=not args.no_kwok_markers,
        reconcile_seconds=args.kwok_reconcile_seconds or chart_reconcile_seconds(),
        timeout=args.kwok_timeout,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    results: dict[str, Any] = {"rounds": args.rounds, "units": args.units}
    if "a" in args.parts:
        overhead(args, results)
    if "b" in args.parts:
        missing = missing_harness_binaries()
        if missing:
            print(f"paper_scale (b): skipped, the harness has no {', '.join(missing)} (make cluster-tools)")
        else:
            results["kwok"] = operator_cost(kwok_setup(args))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return results

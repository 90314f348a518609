"""Operator steady state: what finished and running resources cost, beside an earlier operator.

    python -m bench operator_steady [--finished 200] [--running 20] [--window 30] [--rounds 3]
                                    [--baseline-rev REV]

One kwok control plane and MinIO, the chart installed (its operator Deployment at 0 replicas), then
`--finished` ScrapeJobs run to Succeeded (one-unit plans seeded in MinIO; kwok runs pods for 1 s) and
`--running` ScrapeJobs left Running (their unit pods run for a day), all under this tree's operator.
Then, in alternating rounds, this tree's operator and the baseline (the operator of git revision
`--baseline-rev`, default BASELINE_REV: the last commit before the steady-state work, extracted with
`git archive`) each run alone over the same resources, as the chart's ServiceAccount with the chart's
settings (reconcile every `--reconcile-seconds`): after a warm-up of two intervals, `--window` seconds
of API requests per second it sent (the API server's flow-schema counter for ServiceAccounts: the only
one making requests here), its CPU seconds per second and its peak RSS. At paper scale a namespace
holds thousands of finished stages and runs: the goal is that they cost nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from tests.cluster.harness import CPU_POOL, LocalCluster
from tests.cluster.kwok_stages import RUN_DURATION_ANNOTATION
from tests.cluster.minio import MinioServer
from tests.cluster.operator import SETTINGS_ENV, OperatorProcess, installed_operator
from tests.cluster.processes import REPO_ROOT

from bench.operator_scale import by_client, peak_rss_mb, request_counts, tls_client
from bench.report import Table, alternate, ratio_spread, rounded, spread, stats

NAMESPACE = "steady"
BUCKET = "steady"
API = "/apis/commoncanvas.dev/v1alpha1"
BASELINE_REV = "5703406"  # the operator as it was before finished resources stopped costing requests
SIDES = ("operator", "baseline")


def scrape_job(name: str, running: bool) -> dict[str, Any]:
    annotations = {RUN_DURATION_ANNOTATION: "86400s"} if running else {}
    return {
        "apiVersion": "commoncanvas.dev/v1alpha1",
        "kind": "ScrapeJob",
        "metadata": {"name": name, "annotations": annotations},
        "spec": {
            "source": {"uri": f"s3://{BUCKET}/yfcc.tsv"},
            "output": {"uri": f"s3://{BUCKET}/{name}"},
            "parallelism": 1,
        },
    }


def baseline_tree(rev: str, into: Path) -> Path:
    """The repository at `rev` (its operator and services packages), extracted under `into`."""
    archive = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "archive", rev, "operator", "services"],
        check=True,
        capture_output=True,
    ).stdout
    into.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def phases(cluster: LocalCluster) -> dict[str, int]:
    items = cluster.api.get(f"{API}/namespaces/{NAMESPACE}/scrapejobs")["items"]
    counted: dict[str, int] = {}
    for item in items:
        phase = (item.get("status") or {}).get("phase") or "Pending"
        counted[phase] = counted.get(phase, 0) + 1
    return counted


def measure(
    cluster: LocalCluster, env: dict[str, str], log: Path, window: float, warmup: float
) -> dict[str, float]:
    operator = OperatorProcess(NAMESPACE, env, log)
    operator.start()
    assert operator.process is not None
    process = psutil.Process(operator.process.pid)
    try:
        time.sleep(warmup)
        with tls_client(cluster.kubeconfig) as metrics:
            before = request_counts(metrics)
            cpu_before = sum(process.cpu_times()[:4])
            started = time.monotonic()
            time.sleep(window)
            after = request_counts(metrics)
            cpu = sum(process.cpu_times()[:4]) - cpu_before
            seconds = time.monotonic() - started
        if process.status() == psutil.STATUS_ZOMBIE:
            raise RuntimeError(f"the operator exited:\n{operator.log_tail(4000)}")
        requests = by_client(before, after, own=0)["operator"]
        return {
            "requests_per_second": requests / seconds,
            "cpu_per_second": cpu / seconds,
            "peak_rss_mb": peak_rss_mb(process.pid),
        }
    finally:
        operator.kill()


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="commoncanvas-bench-steady-"))
    cluster = LocalCluster(work / "cluster", cpu_nodes=4, a100_nodes=0, local_nodes=0, kueue=False)
    try:
        cluster.start(timeout=300)
        cluster.create_namespace(NAMESPACE)
        values = {
            "nodePools": {"cpu": {"nodeSelector": CPU_POOL.node_selector, "tolerations": []}},
            "operator": {"reconcileSeconds": args.reconcile_seconds},
        }
        with (
            MinioServer(work / "minio" / "data", log_dir=cluster.logs_dir) as minio,
            installed_operator(cluster, NAMESPACE, minio, work, values) as chart_env,
        ):
            # This tree's code, whatever the virtualenv's editable install points at.
            env = {**chart_env, "PYTHONPATH": f"{REPO_ROOT / 'operator'}:{REPO_ROOT / 'services'}"}
            minio.make_bucket(BUCKET)
            client = minio.client()
            names = [f"done-{i:04d}" for i in range(args.finished)] + [
                f"busy-{i:03d}" for i in range(args.running)
            ]
            for name in names:
                client.put_object(
                    Bucket=BUCKET, Key=f"{name}/_plan/summary.json", Body=json.dumps({"units": 1})
                )
                cluster.api.create(
                    f"{API}/namespaces/{NAMESPACE}/scrapejobs", scrape_job(name, name.startswith("busy"))
                )
            setup = OperatorProcess(NAMESPACE, env, cluster.logs_dir / "operator-setup.log")
            setup.start()
            deadline = time.monotonic() + args.timeout
            try:
                while (counted := phases(cluster)).get("Succeeded", 0) < args.finished:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"resources did not finish in time: {counted}")
                    time.sleep(2)
            finally:
                setup.kill()
            print(f"  set up: {phases(cluster)}", flush=True)
            baseline_root = baseline_tree(args.baseline_rev, work / "baseline")
            sides = {
                "operator": env,
                "baseline": {
                    **env,
                    "PYTHONPATH": f"{baseline_root / 'operator'}:{baseline_root / 'services'}",
                },
            }
            warmup = 2 * args.reconcile_seconds

            def side(name: str) -> Any:
                own = dict(sides[name])
                own[SETTINGS_ENV] = env[SETTINGS_ENV]
                log = cluster.logs_dir / f"operator-{name}.log"
                return lambda: measure(cluster, own, log, args.window, warmup)

            results = alternate({name: side(name) for name in SIDES}, args.rounds)
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    return report(args, results)


def report(args: argparse.Namespace, results: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    table = Table(
        f"Operator steady state on kwok: {args.finished} finished + {args.running} running ScrapeJobs, "
        f"reconcile every {args.reconcile_seconds:g}s, {args.window:g}s windows; median [min-max] of "
        f"{args.rounds} rounds",
        ["", "this operator", f"baseline ({args.baseline_rev})", "this / baseline"],
        caption="API requests: the API server's own counters (flow schema of ServiceAccounts) over the "
        "window; CPU from /proc over the window; RSS: peak of the process's life.",
    )
    line: dict[str, Any] = {"benchmark": "operator_steady", **vars(args)}
    for key, label, spec in (
        ("requests_per_second", "API requests / s", ".2f"),
        ("cpu_per_second", "operator CPU s / s", ".3f"),
        ("peak_rss_mb", "operator peak RSS MB", ".0f"),
    ):
        ours = [r[key] for r in results["operator"]]
        theirs = [r[key] for r in results["baseline"]]
        table.add_row(label, spread(ours, spec), spread(theirs, spec), ratio_spread(ours, theirs))
        line[key] = {"operator": rounded(stats(ours)), "baseline": rounded(stats(theirs))}
    table.print()
    print(json.dumps(line))
    return line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="python -m bench.operator_steady", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--finished", type=int, default=int(env("BENCH_STEADY_FINISHED", "200")))
    parser.add_argument("--running", type=int, default=int(env("BENCH_STEADY_RUNNING", "20")))
    parser.add_argument("--window", type=float, default=float(env("BENCH_STEADY_WINDOW", "30")))
    parser.add_argument("--reconcile-seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=int(env("BENCH_STEADY_ROUNDS", "3")))
    parser.add_argument("--baseline-rev", default=env("BENCH_STEADY_BASELINE", BASELINE_REV))
    parser.add_argument("--timeout", type=float, default=900)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()

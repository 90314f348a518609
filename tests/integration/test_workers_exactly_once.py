"""Workers pulling scrape units from real MinIO through the real CLI: whatever happens to a worker or to
the store, the catalog holds each planned sample exactly once, the same (photo_id, sha256) set as an
uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from commoncanvas import storage, units, workqueue
from commoncanvas.mds import read_split
from commoncanvas.runner import run_scrape
from commoncanvas.sample import Sample, url_templates
from commoncanvas.sample.server import LocalHTTPServer
from commoncanvas.specs import ScrapeJob

pytestmark = pytest.mark.integration
LEASE = "3"


def scrape_job(
    sample: Sample, server: LocalHTTPServer, output: str, fetch_retries: int = 1, **spec: Any
) -> ScrapeJob:
    fetch = {
        **url_templates(server.base_url),
        "retries": fetch_retries,
        "backoffSeconds": 0.05,
        "concurrency": 1,
        "allowPrivateNetworks": True,
        "allowedHosts": ["127.0.0.1"],
    }
    body = {
        "source": {"uri": str(sample.metadata)},
        "output": {"uri": output},
        "fetch": fetch,
        "unitSize": 4,
        "parallelism": 2,
        **spec,
    }
    return ScrapeJob.model_validate({"metadata": {"name": "exactly-once"}, "spec": body})


def fresh_bucket(minio: Any, prefix: str) -> str:
    """The session's MinIO outlives a test: each run writes to a bucket of its own."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    minio.make_bucket(name)
    return name


def job_file(job: ScrapeJob, path: Path) -> Path:
    doc = {"apiVersion": "commoncanvas.dev/v1alpha1", **job.model_dump(by_alias=True, exclude_none=True)}
    path.write_text(yaml.safe_dump(doc))
    return path


def catalog(output: str, cache: Path) -> list[tuple[int, str]]:
    """Every (photo_id, sha256) of both splits, duplicates kept."""
    found: list[tuple[int, str]] = []
    for split in ("commercial", "noncommercial"):
        if not storage.open_storage(output).exists(f"{split}/index.json"):
            continue
        found += [
            (int(row["photo_id"]), str(row["sha256"]))
            for row in read_split(f"{output}/{split}", cache / split)
        ]
    return sorted(found)


@pytest.fixture
def uninterrupted(
    minio: Any, s3_env: dict[str, str], served_sample: tuple[Sample, LocalHTTPServer], tmp_path: Path
) -> list[tuple[int, str]]:
    sample, server = served_sample
    output = f"s3://{fresh_bucket(minio, 'reference')}/run"
    run_scrape(scrape_job(sample, server, output), show_progress=False)
    reference = catalog(output, tmp_path / "reference")
    assert reference and len(reference) == len(set(reference))
    return reference


def claims_in_flight(output: str) -> list[dict[str, Any]]:
    store = storage.open_storage(output)
    bodies = [json.loads(store.read_text(key)) for key in store.list(workqueue.CLAIMS)]
    return [body for body in bodies if body.get("state") == "running"]


def wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def worker_mid_unit(
    job: ScrapeJob, server: LocalHTTPServer, path: Path
) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """Worker 0 of the job as a pod runs it (`scrape work`), on a slowed server, once it holds its
    first claim: the process and that claim."""
    from commoncanvas.scrape.worker import ensure_plan, layout_of

    ensure_plan(job.spec, layout_of(job.spec))
    server.latency = 0.4  # the worker stays mid-unit for a while
    worker = subprocess.Popen(
        [sys.executable, "-m", "commoncanvas.cli", "scrape", "work", str(job_file(job, path))],
        env={**os.environ, "JOB_COMPLETION_INDEX": "0"},
    )
    wait_for(lambda: claims_in_flight(job.spec.output.uri), 120, "the worker's first claim")
    (held,) = claims_in_flight(job.spec.output.uri)
    return worker, held


def test_a_worker_paused_past_its_lease_never_publishes_the_unit_taken_from_it(
    minio: Any,
    s3_env: dict[str, str],
    served_sample: tuple[Sample, LocalHTTPServer],
    uninterrupted: list[tuple[int, str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(workqueue.LEASE_ENV, LEASE)
    sample, server = served_sample
    output = f"s3://{fresh_bucket(minio, 'paused')}/run"
    job = scrape_job(sample, server, output)
    zombie, held = worker_mid_unit(job, server, tmp_path / "j.yaml")
    try:
        zombie.send_signal(signal.SIGSTOP)
        time.sleep(float(LEASE) + 1.5)  # its lease runs out while it is paused
        server.latency = 0.05
        run_scrape(job, show_progress=False)  # takes the unit over and finishes every unit
        marker = units.read_marker(storage.open_storage(output), held["unit"])
        assert marker["attempt"] == 1 and marker["worker"] != held["worker"]
        zombie.send_signal(signal.SIGCONT)
        assert zombie.wait(timeout=180) == 0
    finally:
        zombie.kill()
    assert units.read_marker(storage.open_storage(output), held["unit"])["attempt"] == 1
    (doc,) = [
        d for d in workqueue.read_progress(storage.open_storage(output)) if d["worker"] == held["worker"]
    ]
    assert doc["lost"] == 1 and held["unit"] not in doc["units"], "the resumed worker must not publish"
    assert not list(storage.open_storage(output).list(units.attempt_dir("commercial", held["unit"], 0)))
    assert not list(storage.open_storage(output).list(units.attempt_dir("noncommercial", held["unit"], 0)))
    assert catalog(output, tmp_path / "read") == uninterrupted


def test_a_worker_killed_mid_unit_is_taken_over_and_nothing_is_lost_or_doubled(
    minio: Any,
    s3_env: dict[str, str],
    served_sample: tuple[Sample, LocalHTTPServer],
    uninterrupted: list[tuple[int, str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(workqueue.LEASE_ENV, LEASE)
    sample, server = served_sample
    output = f"s3://{fresh_bucket(minio, 'killed-worker')}/run"
    job = scrape_job(sample, server, output)
    worker, _ = worker_mid_unit(job, server, tmp_path / "j.yaml")
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    server.latency = 0.05
    summary = run_scrape(job, show_progress=False)
    assert catalog(output, tmp_path / "read") == uninterrupted
    assert summary["workers"] == 3, "the killed worker and the rerun's two"


def test_minio_restarted_mid_run_is_waited_out_and_the_run_completes_exactly_once(
    minio: Any,
    s3_env: dict[str, str],
    served_sample: tuple[Sample, LocalHTTPServer],
    uninterrupted: list[tuple[int, str]],
    tmp_path: Path,
) -> None:
    sample, server = served_sample
    output = f"s3://{fresh_bucket(minio, 'restarted')}/run"
    before = len(server.requests)  # the uninterrupted run used this server too
    results: list[Any] = []
    # The run in a thread; MinIO restarted from this one (its process dies with the thread that
    # started it).
    run = threading.Thread(
        target=lambda: results.append(run_scrape(scrape_job(sample, server, output), show_progress=False))
    )
    run.start()
    wait_for(lambda: len(server.requests) >= before + 6, 120, "the run to be fetching")
    minio.stop()
    time.sleep(3)
    minio.start()
    run.join(timeout=600)
    assert not run.is_alive() and results, "the run did not finish after MinIO came back"
    (summary,) = results
    wait_for(lambda: minio.pid is not None, 30, "MinIO back")
    assert catalog(output, tmp_path / "read") == uninterrupted
    assert sum(summary["samples"].values()) == len(uninterrupted)


def test_two_local_runs_of_the_same_file_at_once_share_the_units(
    minio: Any,
    s3_env: dict[str, str],
    served_sample: tuple[Sample, LocalHTTPServer],
    uninterrupted: list[tuple[int, str]],
    tmp_path: Path,
) -> None:
    sample, server = served_sample
    output = f"s3://{fresh_bucket(minio, 'twice')}/run"
    path = job_file(scrape_job(sample, server, output), tmp_path / "job.yaml")
    command = [sys.executable, "-m", "commoncanvas.cli", "run", "--no-progress", str(path)]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=600)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0]
    assert catalog(output, tmp_path / "read") == uninterrupted
    published = [u for d in workqueue.read_progress(storage.open_storage(output)) for u in d["units"]]
    assert sorted(published) == sorted(set(published)), "a unit was published twice"
    assert all(json.loads(out.splitlines()[-1])["kind"] == "ScrapeJob" for out in outputs)


def test_killing_the_local_runner_stops_its_workers(
    served_sample: tuple[Sample, LocalHTTPServer], tmp_path: Path
) -> None:
    sample, server = served_sample
    server.latency = 1.0
    path = job_file(scrape_job(sample, server, str(tmp_path / "out")), tmp_path / "job.yaml")
    runner = subprocess.Popen([sys.executable, "-m", "commoncanvas.cli", "run", "--no-progress", str(path)])
    parent = psutil.Process(runner.pid)
    wait_for(lambda: len(parent.children(recursive=True)) >= 2, 120, "the runner's workers")
    workers = parent.children(recursive=True)
    runner.send_signal(signal.SIGKILL)
    runner.wait()
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, f"workers outlived the runner: {alive}"


def test_an_image_host_outage_publishes_nothing_and_a_rerun_after_it_fetches_every_sample(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.cluster.processes import free_port

    from commoncanvas.runner import UnitsFailed
    from commoncanvas.sample import build_sample

    monkeypatch.setenv(workqueue.PATIENCE_ENV, "2")  # give up on the outage quickly
    port = free_port()
    www = tmp_path / "sample"
    www.mkdir()
    sample = build_sample(www, f"http://127.0.0.1:{port}")
    offline = LocalHTTPServer(root=www / "www", port=port)  # not started: the host is down
    output = str(tmp_path / "out")
    job = scrape_job(sample, offline, output, fetch_retries=0)
    with pytest.raises(UnitsFailed, match=r"failed transiently .*over fetch\.maxTransientFailures"):
        run_scrape(job, show_progress=False)
    assert not units.done_units(storage.open_storage(output)), "an outage must not publish a unit"
    with LocalHTTPServer(root=www / "www", port=port):
        summary = run_scrape(job, show_progress=False)
    expected = {row.photo_id for split in ("commercial", "noncommercial") for row in sample.expected(split)}
    found = [photo_id for photo_id, _ in catalog(output, tmp_path / "read")]
    assert sorted(found) == sorted(expected) and len(found) == len(set(found))
    assert sum(summary["samples"].values()) == len(expected)


def test_samples_failing_transiently_below_the_budget_are_fetched_by_a_rerun_exactly_once(
    served_sample: tuple[Sample, LocalHTTPServer], tmp_path: Path
) -> None:
    from aiohttp import web

    from commoncanvas.sample import served_files

    sample, server = served_sample
    rows = [row for split in ("commercial", "noncommercial") for row in sample.expected(split)]
    flaky = rows[::3]  # a third of the photos answer 503 on every URL during the first run
    outage = {"on": True}

    def flaky_route(body: bytes) -> Any:
        async def handle(request: web.Request) -> web.Response:
            if outage["on"]:
                return web.Response(status=503, text="try later")
            return web.Response(body=body, content_type="image/jpeg")

        return handle

    for row in flaky:
        for path, body in served_files(row).items():
            server.routes[path] = flaky_route(body)
    output = str(tmp_path / "out")
    job = scrape_job(sample, server, output, fetch_retries=0)
    job.spec.fetch.max_transient_failures = 1.0  # publish the units anyway: the rerun is under test
    first = run_scrape(job, show_progress=False)
    assert first["transient"] == {"http-503": len(flaky)}, "transient failures are not exclusions"
    assert not any("503" in reason for reason in first["excluded"])
    assert {p for p, _ in catalog(output, tmp_path / "r1")} == {r.photo_id for r in rows} - {
        r.photo_id for r in flaky
    }
    outage["on"] = False
    second = run_scrape(job, show_progress=False)
    assert second["transient"] == {}
    found = catalog(output, tmp_path / "r2")
    assert sorted(p for p, _ in found) == sorted(r.photo_id for r in rows), "every photo exactly once"
    assert sum(second["samples"].values()) == len(rows)
    reference = str(tmp_path / "uninterrupted")
    run_scrape(scrape_job(sample, server, reference, fetch_retries=0), show_progress=False)
    assert found == catalog(reference, tmp_path / "r3"), "the same (photo_id, sha256) set as one clean run"
    units_before = len(json.loads((tmp_path / "out" / "_plan" / "units.json").read_text()))
    third = run_scrape(job, show_progress=False)
    assert third["samples"] == second["samples"]
    assert len(json.loads((tmp_path / "out" / "_plan" / "units.json").read_text())) == units_before

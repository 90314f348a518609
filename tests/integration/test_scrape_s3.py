"""ScrapeJob end to end against real servers: the sample over HTTP, shards into a real MinIO."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

import pytest

from commoncanvas import storage, workqueue
from commoncanvas.licenses import BY_CODE
from commoncanvas.mds import read_split
from commoncanvas.runner import UnitsFailed, run_scrape
from commoncanvas.sample import Sample, build_sample, url_templates
from commoncanvas.sample.server import LocalHTTPServer
from commoncanvas.specs import ScrapeJob

pytestmark = pytest.mark.integration


def make_job(sample: Sample, server: LocalHTTPServer, output: str, **fetch: Any) -> ScrapeJob:
    return ScrapeJob.model_validate(
        {
            "metadata": {"name": "test-scrape"},
            "spec": {
                "source": {"uri": str(sample.metadata)},
                "output": {"uri": output},
                "fetch": {
                    **url_templates(server.base_url),
                    "retries": 1,
                    "backoffSeconds": 0.05,
                    "allowPrivateNetworks": True,  # the sample server is on loopback
                    "allowedHosts": ["127.0.0.1"],
                    **fetch,
                },
                "unitSize": 6,
                "parallelism": 2,
            },
        }
    )


def expected_ids(sample: Sample, split: str) -> set[int]:
    return {row.photo_id for row in sample.expected(split)}


def assert_catalog_exactly_once(sample: Sample, output: str, cache: Path) -> None:
    for split in ("commercial", "noncommercial"):
        rows = read_split(f"{output}/{split}", cache / split)
        ids = [int(r["photo_id"]) for r in rows]
        assert len(ids) == len(set(ids)), f"{split}: a sample was written twice"
        assert set(ids) == expected_ids(sample, split), f"{split}: samples lost or foreign ones present"
        by_id = {row.photo_id: row for row in sample.rows}
        for record in rows:
            row = by_id[int(record["photo_id"])]
            assert record["license_code"] == row.license_code
            assert record["license_url"] == BY_CODE[record["license_code"]].url
            assert BY_CODE[record["license_code"]].derivatives, "a NoDerivs image entered the catalog"
            assert record["author"] == row.author and record["page_url"].endswith(f"/photos/{row.photo_id}/")
            assert record["sha256"] == hashlib.sha256(record["image"]).hexdigest()
            assert record["image"] == (row.original or row.sized), "the original bytes must be kept"


def test_scrapejob_writes_c_and_nc_catalogs_to_minio(
    minio: Any, s3_env: dict[str, str], served_sample: tuple[Sample, LocalHTTPServer], tmp_path: Path
) -> None:
    sample, server = served_sample
    minio.make_bucket("catalog")
    output = "s3://catalog/run-1"
    summary = run_scrape(make_job(sample, server, output), show_progress=False)
    assert summary["samples"] == {
        "commercial": len(expected_ids(sample, "commercial")),
        "noncommercial": len(expected_ids(sample, "noncommercial")),
    }
    for row in sample.rows:
        if row.expect not in ("commercial", "noncommercial"):
            assert summary["excluded"].get(row.expect, 0) >= 1, f"{row.expect} not reported"
    assert_catalog_exactly_once(sample, output, tmp_path / "read")


def test_an_s3_outage_longer_than_the_workers_patience_fails_clearly_and_a_rerun_completes(
    minio: Any, s3_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Shorter outages are waited out (test_workers_exactly_once); this one outlasts the patience.
    monkeypatch.setenv(workqueue.PATIENCE_ENV, "2")
    www = tmp_path / "sample"
    www.mkdir()
    outage = threading.Event()

    def stop_s3_after_some_fetches(path: str) -> None:
        if len(server.requests) == 4 and not outage.is_set():
            outage.set()
            minio.stop()  # S3 goes away while units are fetching: their uploads must fail

    with LocalHTTPServer(root=www / "www", latency=0.05, on_request=stop_s3_after_some_fetches) as server:
        sample = build_sample(www, server.base_url)
        minio.make_bucket("outage")
        output = "s3://outage/run"
        job = make_job(sample, server, output, concurrency=1)
        try:
            with pytest.raises(UnitsFailed) as failure:
                run_scrape(job, show_progress=False)
        finally:
            minio.start()
        assert outage.is_set()
        message = str(failure.value)
        assert "rerun" in message and minio.endpoint_url in message, message
        storage.s3_client.cache_clear()
        run_scrape(job, show_progress=False)
    assert_catalog_exactly_once(sample, output, tmp_path / "read")

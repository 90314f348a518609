"""bench.operator_scale's stand-in for the worker pods kwok does not run: markers and progress objects."""

from __future__ import annotations

import json
from typing import Any

from bench.operator_scale import BUCKET, MarkerWriter, Setup, completed_indexes


class FakeMinio:
    def __init__(self) -> None:
        self.objects: dict[str, str] = {}

    def client(self) -> Any:
        objects = self.objects

        class Client:
            def put_object(self, Bucket: str, Key: str, Body: str) -> None:  # boto3's argument names
                objects[f"{Bucket}/{Key}"] = Body

        return Client()


def setup() -> Setup:
    return Setup(1, 2, 3, 2, 3, 10.0, 5.0, 0, 0.5, 60.0)


def test_completed_indexes_reads_the_jobs_ranges() -> None:
    assert completed_indexes("0-2,5,7-8") == {0, 1, 2, 5, 7, 8}
    assert completed_indexes("") == completed_indexes(None) == set()


def test_each_completed_worker_writes_its_units_markers_once_and_its_progress_object() -> None:
    minio = FakeMinio()
    writer = MarkerWriter(minio, setup())  # type: ignore[arg-type]
    writer.completed("caption", {0, 1})
    writer.completed("caption", {0, 1, 2})  # the next poll sees the earlier ones again
    writer.completed("scrape", {0})
    assert writer.close() == 4
    assert sorted(key for key in minio.objects if "/_units/" in key) == [
        f"{BUCKET}/caption/_units/000000.json",
        f"{BUCKET}/caption/_units/000001.json",
        f"{BUCKET}/caption/_units/000002.json",
        f"{BUCKET}/scrape/_units/000000.json",
    ]
    assert json.loads(minio.objects[f"{BUCKET}/caption/_units/000002.json"])["unit"] == 2
    progress = json.loads(minio.objects[f"{BUCKET}/caption/_workers/w0001.json"])
    assert progress["units"] == [1] and progress["modelLoads"] == 1


def test_the_steady_state_report_puts_this_operator_beside_the_baseline(capsys: Any) -> None:
    import argparse

    from bench.operator_steady import report

    args = argparse.Namespace(
        finished=200, running=20, window=30.0, reconcile_seconds=5.0, rounds=2, baseline_rev="abc", timeout=1
    )
    ours = [{"requests_per_second": 8.0, "cpu_per_second": 0.05, "peak_rss_mb": 150.0}] * 2
    theirs = [{"requests_per_second": 80.0, "cpu_per_second": 0.5, "peak_rss_mb": 180.0}] * 2
    line = report(args, {"operator": ours, "baseline": theirs})
    printed = capsys.readouterr().out
    assert "| API requests / s" in printed and "0.10x" in printed
    assert line["requests_per_second"]["operator"]["median"] == 8.0
    assert line["requests_per_second"]["baseline"]["median"] == 80.0

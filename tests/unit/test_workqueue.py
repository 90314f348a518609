"""Workers pull units: exactly-once claims, leases taken over, fencing, failures, progress per worker."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from commoncanvas import units, workqueue
from commoncanvas.storage import LocalStorage, StorageError
from commoncanvas.units import StageLayout
from commoncanvas.workqueue import Board, Identity, Worker, longest_run_upper_half


class CountingStage:
    """A stage whose unit writes one file under the attempt's prefix; it loads a 'model' once and
    can be told to fail, to hit the store, or to run a hook mid-unit."""

    stage = "test"

    def __init__(self, root: str, total: int, fail: frozenset[int] = frozenset(), hook: Any = None) -> None:
        self.output = LocalStorage(root)
        self.total = total
        self.fail = fail
        self.hook = hook
        self.loads = 0
        self.runs: list[tuple[int, int]] = []
        self.store_errors_left = 0

    def total_units(self) -> int:
        return self.total

    def load_model(self) -> bool:
        self.loads += 1
        return True

    def run_attempt(self, unit: int, attempt: int) -> dict[str, Any]:
        self.runs.append((unit, attempt))
        if self.hook:
            self.hook(unit, attempt)
        if self.store_errors_left:
            self.store_errors_left -= 1
            raise StorageError("writing s3://bucket/x failed: cannot reach the store")
        if unit in self.fail:
            raise ValueError(f"unit {unit} is broken")
        prefix = units.attempt_dir("commercial", unit, attempt)
        self.output.write_text(f"{prefix}/index.json", json.dumps({"version": 2, "shards": []}))
        return {"unit": unit, "split": "commercial", "written": 1, "outcomes": {"ok": 1}, "licenses": {}}


def published_by(storage: LocalStorage) -> dict[int, list[str]]:
    owners: dict[int, list[str]] = {}
    for doc in workqueue.read_progress(storage):
        for unit in doc["units"]:
            owners.setdefault(unit, []).append(doc["worker"])
    return owners


def test_one_worker_runs_every_unit_once_loads_its_model_once_and_reports_in_one_object(
    tmp_path: Path,
) -> None:
    stage = CountingStage(str(tmp_path), 7)
    report = Worker(stage, Identity(0, 1), lease=5).run()
    assert sorted(stage.runs) == [(u, 0) for u in range(7)]
    assert units.done_units(stage.output) == set(range(7))
    assert report["units"] == 7 and report["modelLoads"] == 1 and stage.loads == 1
    (doc,) = workqueue.read_progress(stage.output)
    assert doc["units"] == list(range(7)) and doc["state"] == "done" and doc["modelLoads"] == 1


def test_workers_in_parallel_publish_each_unit_exactly_once(tmp_path: Path) -> None:
    stages = [CountingStage(str(tmp_path), 40) for _ in range(4)]
    workers = [Worker(stage, Identity(index, 4), lease=5) for index, stage in enumerate(stages)]
    threads = [threading.Thread(target=worker.run) for worker in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    owners = published_by(stages[0].output)
    assert sorted(owners) == list(range(40)) and all(len(o) == 1 for o in owners.values())
    totals = workqueue.progress_totals(workqueue.read_progress(stages[0].output))
    assert totals["unitsDone"] == 40 and totals["workers"] == 4 and totals["modelLoads"] == 4
    assert all(stage.runs for stage in stages), "every worker got work from its own range"


def test_a_claim_whose_lease_ran_out_is_taken_over_and_the_dead_attempts_files_removed(
    tmp_path: Path,
) -> None:
    stage = CountingStage(str(tmp_path), 3)
    dead = {"worker": "gone", "unit": 1, "attempt": 0, "state": "running", "expires": time.time() - 1}
    stage.output.create(workqueue.claim_key(1, 0), json.dumps(dead).encode())
    stage.output.write_text(f"{units.attempt_dir('commercial', 1, 0)}/shard.00000.mds", "half written")
    Worker(stage, Identity(0, 1), lease=5).run()
    assert units.read_marker(stage.output, 1)["attempt"] == 1
    summary = units.summarize(StageLayout(stage.output), {0: "commercial", 1: "commercial", 2: "commercial"})
    assert summary["units"] == 3
    assert not stage.output.exists(f"{units.attempt_dir('commercial', 1, 0)}/shard.00000.mds")
    assert stage.output.exists(f"{units.attempt_dir('commercial', 1, 1)}/index.json")


def test_a_live_claim_is_waited_for_not_taken(tmp_path: Path) -> None:
    stage = CountingStage(str(tmp_path), 2)
    live = {"worker": "busy", "unit": 0, "attempt": 0, "state": "running", "expires": time.time() + 1.5}
    stage.output.create(workqueue.claim_key(0, 0), json.dumps(live).encode())
    started = time.monotonic()
    Worker(stage, Identity(0, 1), lease=5).run()
    assert time.monotonic() - started >= 1.4, "the unit was taken while its lease lived"
    assert (0, 1) in stage.runs and (0, 0) not in stage.runs


def test_an_attempt_taken_over_while_it_ran_does_not_publish(tmp_path: Path) -> None:
    def another_worker_takes_over(unit: int, attempt: int) -> None:
        if (unit, attempt) == (0, 0):  # it thought this worker dead, and its own lease ran out too
            body = {"worker": "other", "unit": 0, "attempt": 1, "state": "running", "expires": 0}
            stage.output.create(workqueue.claim_key(0, 1), json.dumps(body).encode())

    stage = CountingStage(str(tmp_path), 1, hook=another_worker_takes_over)
    report = Worker(stage, Identity(0, 1), lease=5).run()
    assert report["lost"] == 1
    assert units.read_marker(stage.output, 0)["attempt"] == 2
    assert not stage.output.exists(f"{units.attempt_dir('commercial', 0, 0)}/index.json")


def test_a_unit_that_fails_every_attempt_is_given_up_named_and_retried_by_a_rerun(tmp_path: Path) -> None:
    stage = CountingStage(str(tmp_path), 4, fail=frozenset({2}))
    with pytest.raises(workqueue.UnitsGivenUp, match=r"1 of 4 units failed 3 times .*unit 2: ValueError"):
        Worker(stage, Identity(0, 1), lease=5).run()
    assert [r for r in stage.runs if r[0] == 2] == [(2, 0), (2, 1), (2, 2)]
    assert units.done_units(stage.output) == {0, 1, 3}
    assert workqueue.reset_given_up(stage.output, 4) == 1
    fixed = CountingStage(str(tmp_path), 4)
    Worker(fixed, Identity(0, 1), lease=5).run()
    assert fixed.runs == [(2, 0)] and units.done_units(fixed.output) == {0, 1, 2, 3}


def test_a_store_error_inside_a_unit_is_no_failure_of_the_unit(tmp_path: Path) -> None:
    stage = CountingStage(str(tmp_path), 2)
    stage.store_errors_left = 4  # more than MAX_FAILED_ATTEMPTS: a failure count would give it up
    Worker(stage, Identity(0, 1), lease=5).run()
    assert units.done_units(stage.output) == {0, 1}
    assert workqueue.progress_totals(workqueue.read_progress(stage.output))["failedUnits"] == {}


def test_workers_start_in_their_own_ranges_and_steal_the_upper_half_of_the_longest_gap() -> None:
    assert [Worker.own_range(w) for w in fake_workers(10, 3)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert longest_run_upper_half([0, 1, 5, 6, 7, 8, 9, 12]) == [7, 8, 9]
    assert longest_run_upper_half([4]) == [4] and longest_run_upper_half([]) == []


def fake_workers(total: int, count: int) -> list[Any]:
    class Shape:
        def __init__(self, index: int) -> None:
            self.total, self.identity = total, Identity(index, count)

    return [Shape(index) for index in range(count)]


def test_the_board_lists_done_units_and_each_claimed_units_attempts(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    for unit, attempt in ((0, 0), (2, 0), (2, 1)):
        storage.create(workqueue.claim_key(unit, attempt), b"{}")
    units.finish_unit(storage, 0, {"unit": 0})
    board = Board.read(storage, 4)
    assert board.done == {0} and board.attempts == {0: [0], 2: [0, 1]}
    assert board.unclaimed() == [1, 3] and board.open_claims() == [2]


def test_a_claim_is_created_once_however_many_race_for_it(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    results: list[bool] = []
    threads = [
        threading.Thread(target=lambda: results.append(storage.create("_claims/000001/000.json", b"{}")))
        for _ in range(16)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results.count(True) == 1


def test_each_replica_of_a_pod_gets_its_own_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert workqueue.visible_devices(2) == ["3", "5"]
    assert workqueue.visible_devices(1) == ["3"]
    with pytest.raises(RuntimeError, match="gpusPerPod is 3 but only 2 devices are visible"):
        workqueue.visible_devices(3)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert workqueue.visible_devices(2) == ["0", "1"] and workqueue.visible_devices(0) == [""]


def test_a_worker_whose_own_range_is_empty_steals_work(tmp_path: Path) -> None:
    stage = CountingStage(str(tmp_path), 1)
    Worker(stage, Identity(0, 2), lease=5).run()  # two workers, one unit: worker 0's range is empty
    assert stage.runs == [(0, 0)]

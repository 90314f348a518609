"""bench.paper_scale (b): the emulated workers' objects read back as the operator and finalize read them."""

from __future__ import annotations

from bench.paper_scale import summary_doc, unit_doc, worker_doc, worker_units

from commoncanvas.shardplan import ShardGroupUnit
from commoncanvas.workqueue import progress_totals


def test_workers_publish_every_unit_once_by_the_end() -> None:
    units, workers = 1003, 8
    halfway = [worker_units(w, workers, units, 0.5) for w in range(workers)]
    done = [worker_units(w, workers, units, 1.0) for w in range(workers)]
    assert sorted(u for mine in done for u in mine) == list(range(units))
    assert all(set(h) <= set(d) for h, d in zip(halfway, done, strict=True))
    assert 0 < sum(map(len, halfway)) < units
    assert worker_units(3, workers, units, 0.0) == []
    assert worker_units(3, workers, units, 2.0) == done[3]  # past the end: all of them, no more


def test_progress_docs_add_up_as_the_operator_reads_them() -> None:
    units, workers, samples = 100, 4, 8192
    docs = [worker_doc(w, worker_units(w, workers, units, 1.0), 0.0, samples, True) for w in range(workers)]
    totals = progress_totals(docs)
    assert (totals["unitsDone"], totals["workers"], totals["modelLoads"]) == (units, workers, workers)
    assert totals["written"] == units * samples
    assert len({doc["worker"] for doc in docs}) == workers


def test_seeded_plan_units_and_summary_have_the_real_shapes() -> None:
    unit = ShardGroupUnit(**unit_doc(7, "s3://paper/catalog/commercial", 8192))
    assert (unit.unit, unit.split, unit.shards[0]["samples"]) == (7, "commercial", 8192)
    assert list(unit.columns) == unit.shards[0]["column_names"]
    summary = summary_doc(10, 4, 8192, "s3://paper/out")
    assert (summary["units"], summary["workers"], summary["modelLoads"]) == (10, 4, 4)
    assert summary["captions"] == summary["samples"] == {"commercial": 81920}

"""CaptionJob with a tiny random-weight BLIP-2 on CPU, over real shards in MinIO and on disk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from streaming import MDSWriter

from commoncanvas import units, workqueue
from commoncanvas.caption import worker
from commoncanvas.caption.unitplan import InputMissing
from commoncanvas.mds import read_split
from commoncanvas.runner import LocalRun, run_file
from commoncanvas.sample import Sample, synthetic_jpeg, url_templates
from commoncanvas.sample.server import LocalHTTPServer
from commoncanvas.scrape.worker import CATALOG_COLUMNS, blank_catalog_row
from commoncanvas.specs import CaptionJob, ScrapeJob

pytestmark = pytest.mark.integration
LICENSE_COLUMNS = (
    "photo_id",
    "license_code",
    "license_name",
    "license_url",
    "author",
    "author_nsid",
    "page_url",
)


def caption_job(source: str, output: str, model: Path, **spec: Any) -> CaptionJob:
    body = {
        "input": {"uris": [source]} if "input" not in spec else spec.pop("input"),
        "output": {"uri": output},
        "model": {"source": str(model)},
        "prompt": "a photo of",
        "decoding": {"maxNewTokens": 8, "minNewTokens": 3, "noRepeatNgramSize": 2},
        "batchSize": 4,
        "loaderWorkers": 1,
        "parallelism": 2,
        **spec,
    }
    return CaptionJob.model_validate({"metadata": {"name": "test-caption"}, "spec": body})


def scrape_to(sample: Sample, server: LocalHTTPServer, output: str) -> dict[str, Any]:
    job = ScrapeJob.model_validate(
        {
            "metadata": {"name": "catalog"},
            "spec": {
                "source": {"uri": str(sample.metadata)},
                "output": {"uri": output},
                "fetch": {
                    **url_templates(server.base_url),
                    "retries": 0,
                    "allowPrivateNetworks": True,  # the sample server is on loopback
                    "allowedHosts": ["127.0.0.1"],
                },
                "unitSize": 5,
                "parallelism": 2,
            },
        }
    )
    return LocalRun(show_progress=False).scrape(job)


def test_captions_every_good_sample_through_minio_keeping_license_columns(
    minio: Any,
    s3_env: dict[str, str],
    served_sample: tuple[Sample, LocalHTTPServer],
    tiny_blip2: Path,
    tmp_path: Path,
) -> None:
    sample, server = served_sample
    minio.make_bucket("pipeline")
    scrape_to(sample, server, "s3://pipeline/catalog")
    summary = LocalRun(show_progress=False).caption(
        caption_job("s3://pipeline/catalog", "s3://pipeline/captions", tiny_blip2)
    )
    for split in ("commercial", "noncommercial"):
        catalog = {
            int(r["photo_id"]): r
            for r in read_split(f"s3://pipeline/catalog/{split}", tmp_path / "c" / split)
        }
        captioned = read_split(f"s3://pipeline/captions/{split}", tmp_path / "o" / split)
        assert sorted(int(r["photo_id"]) for r in captioned) == sorted(catalog), (
            f"{split}: samples lost or added"
        )
        assert summary["captions"][split] == len(catalog)
        for row in captioned:
            source = catalog[int(row["photo_id"])]
            assert {c: row[c] for c in LICENSE_COLUMNS} == {c: source[c] for c in LICENSE_COLUMNS}
            assert {c: row[c] for c in CATALOG_COLUMNS} == {c: source[c] for c in CATALOG_COLUMNS}, (
                "every catalog column (CommonCatalog's fields) passes through captioning"
            )
            assert row["image"] == source["image"], "the original image bytes must pass through untouched"
            assert row["caption"].strip() and row["caption"] == " ".join(row["caption"].split())
            assert not row["caption"].lower().startswith("a photo of")
            assert (row["caption_model"], row["caption_prompt"]) == (str(tiny_blip2), "a photo of")


def write_catalog(root: Path, images: list[bytes], size_limit: int | None = None) -> None:
    shards = {"size_limit": size_limit} if size_limit else {}
    with MDSWriter(out=str(root / "commercial"), columns=CATALOG_COLUMNS, **shards) as writer:
        for number, image in enumerate(images):
            writer.write(
                {
                    **blank_catalog_row(),
                    "image": image,
                    "photo_id": 100 + number,
                    "split": "commercial",
                    "license_code": "cc0",
                    "license_name": "Public Domain Dedication (CC0)",
                    "license_url": "https://creativecommons.org/publicdomain/zero/1.0/",
                    "author": f"author {number}",
                    "author_nsid": f"{number}@N00",
                    "title": "",
                    "tags": [],
                    "page_url": f"https://x/{number}",
                    "fetched_url": f"https://x/{number}.jpg",
                    "width": 320,
                    "height": 240,
                    "sha256": "",
                }
            )
    # An empty NC split, written the way a finished ScrapeJob writes one.
    (root / "noncommercial").mkdir(parents=True)
    (root / "noncommercial" / "index.json").write_text('{"version": 2, "shards": []}')


def test_a_corrupt_image_in_an_input_shard_is_excluded_with_its_reason(
    tiny_blip2: Path, tmp_path: Path
) -> None:
    images = [synthetic_jpeg(n, (320, 240)) for n in range(5)]
    images[2] = images[2][:200]  # truncated JPEG inside an otherwise valid shard
    write_catalog(tmp_path / "catalog", images)
    job = caption_job(
        str(tmp_path / "catalog"),
        str(tmp_path / "captions"),
        tiny_blip2,
        input={"uris": [str(tmp_path / "catalog")], "splits": ["commercial"]},
    )
    summary = LocalRun(show_progress=False).caption(job)
    assert summary["excluded"] == {"corrupt-image": 1}
    ids = sorted(int(r["photo_id"]) for r in read_split(str(tmp_path / "captions" / "commercial"), tmp_path))
    assert ids == [100, 101, 103, 104]
    (marker,) = units.read_markers(units.StageLayout.at(str(tmp_path / "captions")).output).values()
    assert marker["failures"][0]["photo_id"] == 102 and "corrupt-image" in marker["failures"][0]["detail"]


def test_cuda_out_of_memory_halves_the_batch_and_loses_nothing(
    tiny_blip2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import Blip2ForConditionalGeneration

    write_catalog(tmp_path / "catalog", [synthetic_jpeg(n, (320, 240)) for n in range(6)])
    real_generate = Blip2ForConditionalGeneration.generate
    calls: list[int] = []

    def generate_with_little_memory(self: Any, pixel_values: torch.Tensor, **kwargs: Any) -> Any:
        calls.append(pixel_values.shape[0])
        if pixel_values.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
        return real_generate(self, pixel_values=pixel_values, **kwargs)

    monkeypatch.setattr(Blip2ForConditionalGeneration, "generate", generate_with_little_memory)
    job = caption_job(
        str(tmp_path / "catalog"),
        str(tmp_path / "captions"),
        tiny_blip2,
        input={"uris": [str(tmp_path / "catalog")], "splits": ["commercial"]},
        batchSize=4,
        loaderWorkers=0,
    )
    stats = worker.CaptionStage(job.spec).run_attempt(0, 0)  # in this process: the injection applies
    assert stats["written"] == 6 and stats["outcomes"] == {"ok": 6}
    assert stats["oom_backoffs"] == 2 and stats["final_micro_batch"] == 1
    assert calls[:3] == [4, 2, 1], "the batch must be halved on each out-of-memory error"


def test_killed_caption_worker_then_rerun_gives_every_sample_exactly_once(
    tiny_blip2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COMMONCANVAS_LEASE_SECONDS", "2")  # the killed worker's claim runs out soon
    write_catalog(tmp_path / "catalog", [synthetic_jpeg(n, (320, 240)) for n in range(12)])
    job = caption_job(
        str(tmp_path / "catalog"),
        str(tmp_path / "captions"),
        tiny_blip2,
        input={"uris": [str(tmp_path / "catalog")], "splits": ["commercial"]},
        batchSize=1,
        loaderWorkers=0,
    )
    job_file = tmp_path / "caption.yaml"
    job_file.write_text(yaml.safe_dump(job.model_dump(by_alias=True, exclude_none=True)))
    scratch = tmp_path / "worker-tmp"
    scratch.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-m", "commoncanvas.cli", "caption", "work", str(job_file)],
        env={**os.environ, "TMPDIR": str(scratch)},
    )
    # The worker has begun its unit once the unit's scratch directory exists.
    deadline = time.monotonic() + 240
    while not list(scratch.glob("commoncanvas-caption-*")) and time.monotonic() < deadline:
        assert process.poll() is None, "the worker exited before it could be killed"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    layout = units.StageLayout.at(str(tmp_path / "captions"))
    assert not units.is_done(layout.output, 0)
    layout.output.write_bytes(
        f"{units.attempt_dir('commercial', 0, 0)}/shard.00000.mds", b"debris of the killed try"
    )

    summary = LocalRun(show_progress=False).caption(job)
    ids = [int(r["photo_id"]) for r in read_split(str(tmp_path / "captions" / "commercial"), tmp_path)]
    assert sorted(ids) == list(range(100, 112))
    assert units.read_marker(layout.output, 0)["attempt"] == 1, "the killed attempt's claim was taken over"
    assert not layout.output.exists(f"{units.attempt_dir('commercial', 0, 0)}/shard.00000.mds")
    assert summary["modelLoads"] == 2 and summary["workers"] == 2, "the killed worker and the rerun's"


def test_a_caption_job_whose_scrape_output_is_missing_fails_clearly(tiny_blip2: Path, tmp_path: Path) -> None:
    job = caption_job(str(tmp_path / "never-scraped"), str(tmp_path / "captions"), tiny_blip2)
    with pytest.raises(InputMissing, match=r"never-scraped/commercial/index\.json does not exist"):
        LocalRun(show_progress=False).caption(job)


def test_a_caption_job_referencing_an_unfinished_scrape_job_names_it(
    tiny_blip2: Path, tmp_path: Path
) -> None:
    scrape = {
        "apiVersion": "commoncanvas.dev/v1alpha1",
        "kind": "ScrapeJob",
        "metadata": {"name": "photos"},
        "spec": {"source": {"uri": str(tmp_path / "m.tsv")}, "output": {"uri": str(tmp_path / "catalog")}},
    }
    caption = caption_job("", str(tmp_path / "captions"), tiny_blip2, input={"scrapeJobRef": "photos"})
    pipeline = tmp_path / "pipeline.yaml"
    caption_doc = {
        "apiVersion": "commoncanvas.dev/v1alpha1",
        **caption.model_dump(by_alias=True, exclude_none=True),
    }
    # The CaptionJob comes first, so its ScrapeJob has not run when it starts.
    pipeline.write_text(yaml.safe_dump_all([caption_doc, scrape]))
    with pytest.raises(LookupError, match="references ScrapeJob 'photos'"):
        run_file(pipeline, show_progress=False)


def test_a_pod_with_two_gpus_runs_two_captioners_each_on_its_own_device(
    tiny_blip2: Path, tmp_path: Path
) -> None:
    # Several small shards, one unit each, so both replicas get units.
    write_catalog(tmp_path / "catalog", [synthetic_jpeg(n, (160, 120)) for n in range(12)], size_limit=12_000)
    job = caption_job(
        str(tmp_path / "catalog"),
        str(tmp_path / "captions"),
        tiny_blip2,
        input={"uris": [str(tmp_path / "catalog")], "splits": ["commercial"]},
        batchSize=2,
        loaderWorkers=0,
        samplesPerUnit=1,
        parallelism=1,
        gpusPerPod=2,
    )
    job_file = tmp_path / "caption.yaml"
    job_file.write_text(yaml.safe_dump(job.model_dump(by_alias=True, exclude_none=True)))
    result = subprocess.run(
        [sys.executable, "-m", "commoncanvas.cli", "caption", "work", str(job_file)],
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "3,5"},  # the device plugin's list; no CUDA here
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    layout = units.StageLayout.at(str(tmp_path / "captions"))
    docs = workqueue.read_progress(layout.output)
    assert report["replicas"] == 2 and len(docs) == 2
    assert sorted(doc["visibleDevices"] for doc in docs) == ["3", "5"], "one device each, disjoint"
    assert sorted(doc["replica"] for doc in docs) == [0, 1]
    assert all(doc["modelLoads"] == 1 for doc in docs) and report["modelLoads"] == 2
    planned = len(units.done_units(layout.output))
    assert planned > 2 and sum(len(doc["units"]) for doc in docs) == planned


def test_a_commercial_only_scrape_then_a_default_caption_job_runs_end_to_end(
    served_sample: tuple[Sample, LocalHTTPServer], tiny_blip2: Path, tmp_path: Path
) -> None:
    """CommonCanvas-C: no license allows NC, so that split is an empty catalog, not a missing one."""
    sample, server = served_sample
    catalog = tmp_path / "catalog"
    job = ScrapeJob.model_validate(
        {
            "metadata": {"name": "catalog-c"},
            "spec": {
                "source": {"uri": str(sample.metadata)},
                "output": {"uri": str(catalog)},
                "licenses": {"allow": ["cc-by", "cc-by-sa", "cc0"]},
                "fetch": {
                    **url_templates(server.base_url),
                    "retries": 0,
                    "allowPrivateNetworks": True,
                    "allowedHosts": ["127.0.0.1"],
                },
                "unitSize": 5,
            },
        }
    )
    scraped = LocalRun(show_progress=False).scrape(job)
    assert scraped["samples"]["noncommercial"] == 0 and scraped["samples"]["commercial"] > 0
    assert json.loads((catalog / "noncommercial" / "index.json").read_text())["shards"] == []
    captions = tmp_path / "captions"
    summary = LocalRun(show_progress=False).caption(
        caption_job(str(catalog), str(captions), tiny_blip2, parallelism=1)
    )
    assert summary["captions"] == {"commercial": scraped["samples"]["commercial"], "noncommercial": 0}
    assert set(summary["outputs"]) == {"commercial", "noncommercial"}
    assert json.loads((captions / "noncommercial" / "index.json").read_text())["shards"] == []
    assert (
        len(read_split(str(captions / "commercial"), tmp_path / "unused"))
        == summary["captions"]["commercial"]
    )
    for row in read_split(str(catalog / "commercial"), tmp_path / "unused-catalog"):
        assert (row["description"], row["capture_device"], row["date_taken"]) == (
            "Part of the CommonCanvas bundled sample",
            "SYNTHETIC camera",
            "2013-06-01 12:00:00",
        ), "the catalog carries every YFCC100M field read"
        assert row["date_uploaded"] == 1370088000 and f"/download/{row['photo_id']}." in row["download_url"]

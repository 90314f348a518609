"""The ND evaluation set end to end on the bundled sample: a ScrapeJob with licenses.evaluationSplit keeps
the NoDerivs photos apart, a CaptionJob writes their captions and attribution without image bytes, and
training refuses both the evaluation split and an ND sample hidden in a commercial shard."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from streaming import MDSWriter

from commoncanvas.caption.worker import CAPTION_COLUMNS
from commoncanvas.licenses import BY_CODE, EVALUATION_LICENSES
from commoncanvas.mds import read_split
from commoncanvas.runner import LocalRun
from commoncanvas.sample import Sample, synthetic_jpeg
from commoncanvas.sample.server import LocalHTTPServer
from commoncanvas.scrape.worker import CATALOG_COLUMNS, blank_catalog_row
from commoncanvas.specs import CaptionJob, ScrapeJob, TrainRun
from commoncanvas.specs.caption import EVALUATION_CAPTIONS_FILE
from commoncanvas.specs.common import SpecError
from commoncanvas.train.data import CaptionedImages, make_streams, plan_streams
from commoncanvas.train.datacard import LicenseViolation

pytestmark = pytest.mark.integration
ND_EXCLUSIONS = {f"license-not-allowed:{code}" for code in EVALUATION_LICENSES}


def scrape(sample: Sample, server: LocalHTTPServer, output: Path) -> dict[str, Any]:
    from commoncanvas.sample import url_templates

    job = ScrapeJob.model_validate(
        {
            "metadata": {"name": "catalog"},
            "spec": {
                "source": {"uri": str(sample.metadata)},
                "output": {"uri": str(output)},
                "licenses": {"evaluationSplit": True},
                "fetch": {
                    **url_templates(server.base_url),
                    "retries": 0,
                    "allowPrivateNetworks": True,  # the sample server is on loopback
                    "allowedHosts": ["127.0.0.1"],
                },
                "unitSize": 5,
                "parallelism": 1,
            },
        }
    )
    return LocalRun(show_progress=False).scrape(job)


def train_run(uri: str, split: str = "commercial", out: str = "/nonexistent/out") -> TrainRun:
    return TrainRun.model_validate(
        {
            "metadata": {"name": "refused"},
            "spec": {
                "dataset": {"uris": [uri], "mix": [{"split": split}], "loaderWorkers": 0},
                "output": {"uri": f"{out}/train"},
                "checkpoint": {"uri": f"{out}/checkpoints"},
                "model": {"architecture": "tiny"},
                "distributed": {"gpusPerNode": 0},
            },
        }
    )


def test_nd_photos_become_an_attributed_evaluation_set_that_training_refuses(
    served_sample: tuple[Sample, LocalHTTPServer], tiny_blip2: Path, tmp_path: Path
) -> None:
    sample, server = served_sample
    nd_rows = {row.photo_id: row for row in sample.rows if row.expect in ND_EXCLUSIONS}
    assert {BY_CODE[str(r.license_code)].code for r in nd_rows.values()} == set(EVALUATION_LICENSES)

    summary = scrape(sample, server, tmp_path / "catalog")

    assert summary["samples"]["evaluation"] == len(nd_rows)
    assert not ND_EXCLUSIONS & set(summary["excluded"]), "ND photos are kept for evaluation, not dropped"
    evaluation = read_split(tmp_path / "catalog" / "evaluation")
    assert {int(r["photo_id"]) for r in evaluation} == set(nd_rows)
    for row in evaluation:
        lic = BY_CODE[row["license_code"]]
        assert not lic.derivatives and row["split"] == "evaluation"
        assert row["license_url"] == lic.url and row["author"] == nd_rows[int(row["photo_id"])].author
        assert row["page_url"].endswith(f"/photos/{row['photo_id']}/")
    for split in ("commercial", "noncommercial"):
        codes = {r["license_code"] for r in read_split(tmp_path / "catalog" / split)}
        assert codes and all(BY_CODE[c].derivatives for c in codes), f"ND entered the {split} split"

    job = CaptionJob.model_validate(
        {
            "metadata": {"name": "evaluation-captions"},
            "spec": {
                "input": {"uris": [str(tmp_path / "catalog")], "splits": ["evaluation"]},
                "output": {"uri": str(tmp_path / "captions")},
                "model": {"source": str(tiny_blip2)},
                "prompt": "a photo of",
                # No repeated n-grams: the random tiny captioner would repeat one word (a degenerate caption).
                "decoding": {"maxNewTokens": 8, "minNewTokens": 3, "noRepeatNgramSize": 2},
                "batchSize": 4,
                "loaderWorkers": 0,
            },
        }
    )
    captioned = LocalRun(show_progress=False).caption(job)
    rerun = LocalRun(show_progress=False).caption(job)

    lines = (tmp_path / "captions" / EVALUATION_CAPTIONS_FILE).read_text().splitlines()
    assert captioned["evaluationCaptions"]["photos"] == rerun["evaluationCaptions"]["photos"] == len(lines)
    entries = [json.loads(line) for line in lines]
    assert sorted(e["id"] for e in entries) == sorted(nd_rows), "one line per photo, none twice"
    by_id = {int(r["photo_id"]): r for r in evaluation}
    for entry in entries:
        source = by_id[entry["id"]]
        assert entry["caption"].strip()
        assert (entry["license"], entry["license_url"], entry["author"], entry["source_url"]) == (
            source["license_code"],
            source["license_url"],
            source["author"],
            source["page_url"],
        )
    for row in read_split(tmp_path / "captions" / "evaluation"):
        assert "image" not in row, "no evaluation image bytes in a caption output"
    shards = (tmp_path / "captions" / "evaluation").rglob("*.mds")
    images = {bytes(r["image"]) for r in evaluation}
    assert not any(image in shard.read_bytes() for shard in shards for image in images)

    with pytest.raises(SpecError, match=r"evaluation split: its NoDerivs photos are for evaluation only"):
        LocalRun(show_progress=False).train(
            train_run(str(tmp_path / "captions" / "evaluation"), out=str(tmp_path))
        )
    assert not (tmp_path / "train").exists() and not (tmp_path / "checkpoints").exists()
    with pytest.raises(ValidationError, match="'evaluation' is the NoDerivs evaluation set"):
        train_run(str(tmp_path / "captions"), split="evaluation")


def test_an_nd_sample_smuggled_into_a_commercial_shard_is_refused_naming_dataset_shard_and_license(
    tmp_path: Path,
) -> None:
    root = tmp_path / "smuggled"
    with MDSWriter(out=str(root / "commercial"), columns={**CATALOG_COLUMNS, **CAPTION_COLUMNS}) as writer:
        for number, code in enumerate(["cc-by", "cc-by-nd"]):
            writer.write(
                {
                    **blank_catalog_row(),
                    "image": synthetic_jpeg(number, (64, 64)),
                    "photo_id": 500 + number,
                    "split": "commercial",
                    "license_code": code,
                    "caption": "a gradient",
                    "caption_model": "tiny-blip2",
                    "caption_model_revision": "",
                    "caption_prompt": "",
                    "also_credited": [],
                }
            )
    run = train_run(str(root))
    streams = make_streams(plan_streams([str(root)], run.spec, "dataset.uris[0]"), tmp_path / "cache")
    dataset = CaptionedImages(
        streams=streams, micro_batch=1, seed=0, caption_dropout=0, resolution=64, tokenizer=None
    )
    with pytest.raises(LicenseViolation) as refused:
        for index in range(len(dataset)):
            dataset._checked(index, 0)  # the guard every get_item runs first, before any decoding
    message = str(refused.value)
    assert "\n" not in message
    assert f"dataset {root / 'commercial'}, shard shard.00000.mds: photo 501" in message
    assert "license cc-by-nd forbids derivatives" in message

"""The latents phase on CPU with the tiny SD2 encoders, over real MDS shards on disk."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from streaming import MDSWriter

from commoncanvas import units
from commoncanvas.caption.unitplan import InputMissing
from commoncanvas.caption.worker import CAPTION_COLUMNS
from commoncanvas.mds import read_split
from commoncanvas.sample import synthetic_jpeg
from commoncanvas.scrape.worker import CATALOG_COLUMNS, blank_catalog_row
from commoncanvas.specs import TrainRun
from commoncanvas.train import latents, parts

pytestmark = pytest.mark.integration
ATTRIBUTION = ("photo_id", "split", "license_code", "license_name", "license_url", "author", "page_url")
SIZES = [(160, 120), (120, 160), (64, 64), (300, 90)]  # landscape, portrait, exact, panorama


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(autouse=True)
def _tiny_models_here(model_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The tiny pipeline is written once into this cache; subprocesses inherit the variable.
    monkeypatch.setenv("COMMONCANVAS_MODEL_CACHE", str(model_cache))


def write_captions(root: Path, count: int, shard_bytes: int = 1 << 26, license_code: str = "cc-by") -> None:
    """A captioned commercial split as a CaptionJob leaves it (an empty NC split beside it)."""
    columns = {**CATALOG_COLUMNS, **CAPTION_COLUMNS}
    with MDSWriter(out=str(root / "commercial"), columns=columns, size_limit=shard_bytes) as writer:
        for number in range(count):
            width, height = SIZES[number % len(SIZES)]
            writer.write(
                {
                    **blank_catalog_row(),
                    "image": synthetic_jpeg(number, (width, height)),
                    "photo_id": 500 + number,
                    "split": "commercial",
                    "license_code": license_code,
                    "license_name": "Attribution License",
                    "license_url": "https://creativecommons.org/licenses/by/2.0/",
                    "author": f"photographer {number}",
                    "author_nsid": f"{number}@N00",
                    "title": f"picture {number}",
                    "tags": ["test"],
                    "page_url": f"https://www.flickr.com/photos/{number}@N00/{500 + number}/",
                    "fetched_url": f"https://farm1.example/{500 + number}_o.jpg",
                    "width": width,
                    "height": height,
                    "sha256": "",
                    "caption": f"a colourful gradient number {number}",
                    "caption_model": "tiny-blip2",
                    "caption_model_revision": "",
                    "caption_prompt": "a photo of",
                    "also_credited": [],
                }
            )
    (root / "noncommercial").mkdir(parents=True)
    (root / "noncommercial" / "index.json").write_text('{"version": 2, "shards": []}')


def train_run(captions: Path, output: Path, **spec: Any) -> TrainRun:
    body = {
        "dataset": {"uris": [str(captions)]},
        "output": {"uri": str(output)},
        "checkpoint": {"uri": str(output / "checkpoints")},
        "resolution": 64,
        "model": {"architecture": "tiny"},
        # One unit per input shard: several units from small inputs.
        "optimizations": {"precomputeLatents": True, "latentsSamplesPerUnit": 1},
        "schedule": {"microBatchSize": 3},
        **spec,
    }
    return TrainRun.model_validate({"metadata": {"name": "tiny-latents"}, "spec": body})


def test_precomputed_latents_match_on_the_fly_encoding_and_keep_attribution(tmp_path: Path) -> None:
    write_captions(tmp_path / "captions", 10, shard_bytes=40_000)
    run = train_run(tmp_path / "captions", tmp_path / "out")
    summary = latents.run_latents(run.spec, "test", processes=2, show_progress=False)

    plan = json.loads((tmp_path / "out" / "latents" / "_plan" / "units.json").read_text())
    assert len(plan["units"]) > 1, "the captioned split has several shards, so several units"
    assert {u["split"] for u in plan["units"]} == {"commercial"}, "only the splits of dataset.mix"
    assert summary["samples"] == {"commercial": 10} and summary["excluded"] == {}
    source = {int(r["photo_id"]): r for r in read_split(tmp_path / "captions" / "commercial")}
    rows = read_split(tmp_path / "out" / "latents" / "commercial")
    assert sorted(int(r["photo_id"]) for r in rows) == sorted(source)

    encoders = parts.load_encoders(run.spec, torch.device("cpu"))
    for row in rows:
        original = source[int(row["photo_id"])]
        assert {c: row[c] for c in ATTRIBUTION} == {c: original[c] for c in ATTRIBUTION}
        assert row["caption"] == original["caption"]
        assert "image" not in row, "the phase replaces pixels by latents"
        assert row["latents"].dtype == np.float16 and row["latents"].shape == (4, 8, 8)
        assert row["text_hidden"].dtype == np.float16 and row["text_hidden"].shape == (77, 32)
        pixels = latents.load_pixels(original["image"], 64)[None]
        fly_latents, fly_hidden = latents.encode_batch(
            encoders.vae, encoders.text_encoder, encoders.tokenizer, pixels, [original["caption"]]
        )
        np.testing.assert_allclose(row["latents"], fly_latents[0].numpy(), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(row["text_hidden"], fly_hidden[0].numpy(), rtol=2e-3, atol=2e-3)

    null = np.load(io.BytesIO((tmp_path / "out" / "latents" / latents.NULL_TEXT_KEY).read_bytes()))
    expected = latents.encode_captions(encoders.text_encoder, encoders.tokenizer, [""])[0].numpy()
    np.testing.assert_allclose(null, expected, rtol=2e-3, atol=2e-3)


def test_encoding_is_batch_independent_and_scaled_like_training_expects(tmp_path: Path) -> None:
    write_captions(tmp_path / "captions", 1)
    encoders = parts.load_encoders(train_run(tmp_path / "captions", tmp_path / "out").spec)
    pixels = torch.stack([latents.load_pixels(synthetic_jpeg(n, SIZES[n]), 64) for n in range(3)])
    assert pixels.shape == (3, 3, 64, 64) and pixels.min() >= -1 and pixels.max() <= 1
    captions = ["one", "two words", ""]
    together, hidden = latents.encode_batch(
        encoders.vae, encoders.text_encoder, encoders.tokenizer, pixels, captions
    )
    alone, _ = latents.encode_batch(
        encoders.vae, encoders.text_encoder, encoders.tokenizer, pixels[1:2], captions[1:2]
    )
    torch.testing.assert_close(together[1:2], alone, rtol=1e-4, atol=1e-5)
    unscaled = encoders.vae.encode(pixels).latent_dist.mean
    torch.testing.assert_close(together, unscaled * encoders.vae.config.scaling_factor)
    assert hidden.shape == (3, 77, 32)
    with pytest.raises(ValueError, match="3 images but 2 captions"):
        latents.encode_batch(encoders.vae, encoders.text_encoder, encoders.tokenizer, pixels, captions[:2])


def test_killed_latents_worker_then_rerun_gives_every_sample_exactly_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COMMONCANVAS_LEASE_SECONDS", "2")  # the killed worker's claim runs out soon
    count = 96
    write_captions(tmp_path / "captions", count)
    run = train_run(tmp_path / "captions", tmp_path / "out", resolution=128, schedule={"microBatchSize": 1})
    job_file = tmp_path / "train.yaml"
    job_file.write_text(yaml.safe_dump(run.model_dump(by_alias=True, exclude_none=True)))
    parts.tiny_sd2_dir()  # written before the worker starts, so the kill lands while it encodes
    process = subprocess.Popen([sys.executable, "-m", "commoncanvas.cli", "latents", "work", str(job_file)])
    # A local output is written in place, and the writer opens on the first encoded batch: once the
    # unit's directory exists the worker is mid-unit, samples encoded and none published.
    unit_output = tmp_path / "out" / "latents" / units.attempt_dir("commercial", 0, 0)
    deadline = time.monotonic() + 240
    while not unit_output.is_dir() and time.monotonic() < deadline:
        assert process.poll() is None, "the worker exited before it could be killed"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    layout = latents.layout_of(run.spec)
    assert not units.is_done(layout.output, 0)
    summary = latents.run_latents(run.spec, "test", processes=1, show_progress=False)
    rows = read_split(tmp_path / "out" / "latents" / "commercial")
    assert sorted(int(r["photo_id"]) for r in rows) == list(range(500, 500 + count))
    assert summary["licenses"] == {"cc-by": count}
    assert all(r["license_code"] == "cc-by" and r["author"] and r["page_url"] for r in rows)
    marker = units.read_marker(layout.output, 0)
    assert marker["written"] == count and marker["outcomes"] == {"ok": count}
    assert marker["attempt"] == 1, "the killed worker's claim was taken over once its lease ran out"
    killed = tmp_path / "out" / "latents" / units.attempt_dir("commercial", 0, 0)
    assert not [p for p in killed.rglob("*") if p.is_file()], "the killed attempt's files are removed"


def test_a_corrupt_image_is_excluded_with_its_reason(tmp_path: Path) -> None:
    bad = tmp_path / "captions"
    columns = {**CATALOG_COLUMNS, **CAPTION_COLUMNS}
    with MDSWriter(out=str(bad / "commercial"), columns=columns) as writer:
        for number in range(4):
            row = {
                **blank_catalog_row(),
                **{name: "" for name, enc in columns.items() if enc == "str"},
                "also_credited": [],
            }
            image = synthetic_jpeg(number, (80, 80))
            row.update(
                image=image[:150] if number == 2 else image,
                photo_id=number,
                split="commercial",
                license_code="cc0",
                tags=[],
                width=80,
                height=80,
                caption=f"caption {number}",
            )
            writer.write(row)
    run = train_run(bad, tmp_path / "out")
    summary = latents.run_latents(run.spec, "test", processes=1, show_progress=False)
    assert summary["samples"] == {"commercial": 3} and summary["excluded"] == {"corrupt-image": 1}
    (marker,) = units.read_markers(latents.layout_of(run.spec).output).values()
    assert marker["failures"][0]["photo_id"] == 2


def test_rerunning_with_another_resolution_into_the_same_output_is_refused(tmp_path: Path) -> None:
    write_captions(tmp_path / "captions", 2)
    latents.run_latents(train_run(tmp_path / "captions", tmp_path / "out").spec, "t", show_progress=False)
    other = train_run(tmp_path / "captions", tmp_path / "out", resolution=128)
    with pytest.raises(
        ValueError, match=r"made with spec\.resolution=64, this TrainRun latents has 128; use a new"
    ):
        latents.run_latents(other.spec, "t", show_progress=False)


def test_missing_captions_fail_clearly(tmp_path: Path) -> None:
    run = train_run(tmp_path / "never-captioned", tmp_path / "out")
    with pytest.raises(InputMissing, match=r"never-captioned/commercial/index\.json does not exist"):
        latents.run_latents(run.spec, "t", show_progress=False)


def test_prepare_plans_once_and_reports_the_unit_count_for_the_operator(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from commoncanvas.cli import main

    write_captions(tmp_path / "captions", 6, shard_bytes=40_000)
    run = train_run(tmp_path / "captions", tmp_path / "out")
    job_file = tmp_path / "train.yaml"
    job_file.write_text(yaml.safe_dump(run.model_dump(by_alias=True, exclude_none=True)))
    result = CliRunner().invoke(
        main, ["latents", "prepare", str(job_file), "--termination-log", str(tmp_path / "termination")]
    )
    assert result.exit_code == 0, result.output
    planned = len(latents.read_units(latents.layout_of(run.spec).plan))
    assert planned > 1 and json.loads(result.output) == {"units": planned}
    assert json.loads((tmp_path / "termination").read_text()) == {"units": planned}

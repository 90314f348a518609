"""TrainRun training on CPU with the tiny SD2 model at 64 px, over a captioned dataset built here."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file
from streaming import MDSWriter

from commoncanvas.caption.worker import CAPTION_COLUMNS
from commoncanvas.licenses import BY_CODE
from commoncanvas.mds import read_split
from commoncanvas.sample import synthetic_jpeg
from commoncanvas.scrape.worker import CATALOG_COLUMNS, blank_catalog_row
from commoncanvas.specs import TrainRun
from commoncanvas.specs.train import Optimizations
from commoncanvas.storage import open_storage
from commoncanvas.train import latents
from commoncanvas.train.datacard import LicenseViolation
from commoncanvas.train.loop import TERMINATED_EXIT_CODE, prediction_loss, run_training
from commoncanvas.train.model import ModelParts, build_model, compiled, configure_speedups

pytestmark = pytest.mark.integration
COMMERCIAL = ("cc-by", "cc0", "cc-by-sa")
NONCOMMERCIAL = ("cc-by-nc", "cc-by-nc-sa")
EPOCH_SAMPLES = 24  # commercial samples: 12 steps of 2 make one epoch


@pytest.fixture(scope="module", autouse=True)
def _tiny_models_and_caches(tmp_path_factory: pytest.TempPathFactory) -> Any:
    # The tiny pipeline is written once into this cache; subprocesses inherit the variables.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COMMONCANVAS_MODEL_CACHE", str(tmp_path_factory.mktemp("models")))
        patch.setenv("COMMONCANVAS_DATA_CACHE", str(tmp_path_factory.mktemp("data-cache")))
        yield


def write_split(root: Path, split: str, codes: list[str], first_id: int) -> None:
    columns = {**CATALOG_COLUMNS, **CAPTION_COLUMNS}
    # Small shards: several per split, as a real CaptionJob leaves them.
    with MDSWriter(out=str(root / split), columns=columns, size_limit=1 << 16) as writer:
        for number, code in enumerate(codes):
            photo = first_id + number
            width, height = [(96, 72), (72, 96), (64, 64)][number % 3]
            writer.write(
                {
                    **blank_catalog_row(),
                    "image": synthetic_jpeg(photo, (width, height)),
                    "photo_id": photo,
                    "split": split,
                    "license_code": code,
                    "license_name": BY_CODE[code].name,
                    "license_url": BY_CODE[code].url,
                    "author": f"photographer {photo}",
                    "author_nsid": f"{photo}@N00",
                    "title": f"picture {photo}",
                    "tags": ["test"],
                    "page_url": f"https://www.flickr.com/photos/{photo}@N00/{photo}/",
                    "fetched_url": f"https://farm1.example/{photo}_o.jpg",
                    "width": width,
                    "height": height,
                    "sha256": "",
                    "caption": f"a colourful gradient number {number}",
                    "caption_model": "tiny-blip2",
                    "caption_model_revision": "r1",
                    "caption_prompt": "a photo of",
                    "also_credited": [],
                }
            )


@pytest.fixture(scope="module")
def captions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A captioned dataset as a CaptionJob leaves it: 24 commercial and 8 non-commercial photos."""
    root = tmp_path_factory.mktemp("captions")
    write_split(root, "commercial", [COMMERCIAL[i % 3] for i in range(EPOCH_SAMPLES)], 1000)
    write_split(root, "noncommercial", [NONCOMMERCIAL[i % 2] for i in range(8)], 2000)
    return root


def train_run(name: str, data_uri: str, output_uri: str, checkpoint_uri: str, **spec: Any) -> TrainRun:
    body: dict[str, Any] = {
        "dataset": {"uris": [data_uri], "loaderWorkers": 0},
        "output": {"uri": output_uri},
        "checkpoint": {"uri": checkpoint_uri, "intervalSteps": 3, "keep": 2},
        "resolution": 64,
        "model": {"architecture": "tiny"},
        "schedule": {"globalBatchSize": 2, "microBatchSize": 2, "warmupSteps": 2, "maxSteps": 12},
        "distributed": {"gpusPerNode": 0},
        "samples": {"prompts": ["a cat"], "intervalSteps": 1000, "inferenceSteps": 2},
    }
    for key, value in spec.items():
        body[key] = {**body[key], **value} if isinstance(value, dict) and key in body else value
    return TrainRun.model_validate({"metadata": {"name": name}, "spec": body})


def seen_records(checkpoint: Path) -> list[dict[str, Any]]:
    state = json.loads(
        (checkpoint / json.loads((checkpoint / "latest").read_text())["path"] / "state.json").read_text()
    )
    return [
        json.loads(line)
        for part in state["seen_parts"]
        for line in (checkpoint / part).read_bytes().decode().split("\n")
        if line
    ]


# --- one run, interrupted by SIGTERM and resumed ------------------------------------------------------


@pytest.fixture(scope="module")
def resumed(captions: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`python -m commoncanvas.train` is stopped by SIGTERM after its first checkpoint; a second start
    (in this process) resumes and finishes the epoch, then exports the pipeline and the data card."""
    work = tmp_path_factory.mktemp("resumed")
    run = train_run(
        "resume",
        str(captions),
        str(work / "out"),
        str(work / "ckpt"),
        dataset={"loaderWorkers": 1},
        samples={"intervalSteps": 6},
        optimizations={"ema": {"startStep": 2}},
    )
    job = work / "train.yaml"
    job.write_text(yaml.safe_dump(run.model_dump(mode="json", by_alias=True, exclude_none=True)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with (work / "first.log").open("w") as log:
        first = subprocess.Popen(
            [sys.executable, "-m", "commoncanvas.train", str(job)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + 180
        latest = work / "ckpt" / "latest"
        while not latest.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)
    first_status = json.loads((work / "out" / "status.json").read_text())
    stopped_at = json.loads(latest.read_text())["step"]
    summary = run_training(run)
    return {
        "work": work,
        "first_exit": first.returncode,
        "first_log": (work / "first.log").read_text(),
        "first_status": first_status,
        "stopped_at": stopped_at,
        "summary": summary,
    }


def test_sigterm_stops_the_run_at_a_checkpoint_and_the_next_start_resumes_from_it(
    resumed: dict[str, Any],
) -> None:
    assert resumed["first_exit"] == TERMINATED_EXIT_CODE, resumed["first_log"][-3000:]
    assert 3 <= resumed["stopped_at"] < 12, "the first run must stop mid-epoch for this test to mean anything"
    assert resumed["first_status"]["phase"] == "Running"
    assert resumed["first_status"]["step"] == resumed["stopped_at"]
    assert resumed["summary"]["step"] == 12
    records = seen_records(resumed["work"] / "ckpt")
    # Every step trained once, in order, across both processes: the step count never went back.
    assert [r["step"] for r in records] == sorted(step for step in range(1, 13) for _ in range(2))
    status = json.loads((resumed["work"] / "out" / "status.json").read_text())
    assert (status["phase"], status["step"], status["imagesSeen"]) == ("Succeeded", 12, 24)


def test_the_epoch_trains_on_every_sample_exactly_once_across_the_interruption(
    resumed: dict[str, Any], captions: Path
) -> None:
    records = seen_records(resumed["work"] / "ckpt")
    before = {r["photo_id"] for r in records if r["step"] <= resumed["stopped_at"]}
    after = {r["photo_id"] for r in records if r["step"] > resumed["stopped_at"]}
    assert before and after
    photos = [r["photo_id"] for r in records if r["epoch"] == 0]
    assert sorted(photos) == sorted(s["photo_id"] for s in read_split(captions / "commercial"))


def test_only_the_newest_checkpoints_are_kept(resumed: dict[str, Any]) -> None:
    folders = sorted(p.name for p in (resumed["work"] / "ckpt").glob("step-*"))
    assert folders == ["step-00000009", "step-00000012"]


def test_sample_images_are_written_at_their_interval(resumed: dict[str, Any]) -> None:
    samples = resumed["work"] / "out" / "samples"
    assert sorted(p.name for p in samples.iterdir()) == ["step-00000006", "step-00000012"]
    assert (samples / "step-00000012" / "00.png").read_bytes().startswith(b"\x89PNG")


def test_the_exported_pipeline_holds_the_ema_weights_and_generates_offline(resumed: dict[str, Any]) -> None:
    from diffusers import StableDiffusionPipeline

    pipeline = resumed["work"] / "out" / "pipeline"
    pipe = StableDiffusionPipeline.from_pretrained(str(pipeline), local_files_only=True)
    image = pipe("a cat", num_inference_steps=2, height=64, width=64, output_type="np").images[0]
    assert image.shape == (64, 64, 3)
    exported = load_file(str(pipeline / "unet" / "diffusion_pytorch_model.safetensors"))
    ema = load_file(str(resumed["work"] / "ckpt" / "step-00000012" / "ema.safetensors"))
    trained = load_file(str(resumed["work"] / "ckpt" / "step-00000012" / "unet.safetensors"))
    assert all(torch.equal(exported[name], ema[name]) for name in ema)
    assert not all(torch.equal(ema[name], trained[name]) for name in ema)


def test_the_data_card_counts_equal_the_dataset_and_name_no_license_without_derivatives(
    resumed: dict[str, Any], captions: Path
) -> None:
    out = resumed["work"] / "out"
    card = json.loads((out / "datacard.json").read_text())
    dataset = Counter(s["license_code"] for s in read_split(captions / "commercial"))
    assert card["trained"]["bySplitAndLicense"] == {"commercial": dict(dataset)}
    assert card["dataset"]["samples"] == EPOCH_SAMPLES
    assert all(BY_CODE[code].derivatives for code in card["trained"]["byLicense"])
    assert card["captioner"] == [{"model": "tiny-blip2", "revision": "r1"}]
    manifest = [
        json.loads(line) for line in (out / "attribution.jsonl").read_bytes().decode().split("\n") if line
    ]
    assert len(manifest) == EPOCH_SAMPLES == len({m["photo_id"] for m in manifest})
    assert "| commercial | cc0 | 8 |" in (out / "datacard.md").read_text()


# --- object storage ----------------------------------------------------------------------------------


def test_data_checkpoints_and_outputs_on_minio_and_a_restart_resumes_from_there(
    s3_env: dict[str, str], bucket: str, captions: Path
) -> None:
    store = open_storage(f"s3://{bucket}")
    for path in sorted(p for p in captions.rglob("*") if p.is_file()):
        store.upload_file(f"captions/{path.relative_to(captions).as_posix()}", path)
    run = train_run(
        "minio",
        f"s3://{bucket}/captions",
        f"s3://{bucket}/out",
        f"s3://{bucket}/ckpt",
        checkpoint={"intervalSteps": 2},
        schedule={"maxSteps": 2},
    )
    assert run_training(run)["step"] == 2
    longer = run.model_copy(deep=True)
    longer.spec.schedule.max_steps = 4
    summary = run_training(longer)

    assert summary["step"] == 4
    keys = set(store.list(""))
    assert {"ckpt/latest", "ckpt/step-00000004/unet.safetensors", "ckpt/seen/upto-00000002.jsonl"} <= keys
    assert {
        "out/pipeline/model_index.json",
        "out/datacard.json",
        "out/attribution.jsonl",
        "out/status.json",
    } <= keys
    state = json.loads(store.read_text("ckpt/step-00000004/state.json"))
    steps = [
        json.loads(line)["step"]
        for part in state["seen_parts"]
        for line in store.read_text(f"ckpt/{part}").split("\n")
        if line
    ]
    assert steps == [1, 1, 2, 2, 3, 3, 4, 4]


# --- the speed-up switches ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fixed_batch(captions: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny model's parts and one batch of latents, text states, noise and timesteps."""
    work = tmp_path_factory.mktemp("switches")
    run = train_run("switches", str(captions), str(work / "o"), str(work / "c"))
    parts = build_model(run.spec, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    tokens = parts.tokenizer(["a cat", "a dog"], padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        text_hidden = parts.text_encoder(tokens.input_ids)[0]
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    return {
        "parts": parts,
        "inputs": (
            latents,
            text_hidden,
            torch.randn(2, 4, 8, 8, generator=generator),
            torch.tensor([10, 700]),
        ),
    }


OFF = Optimizations(sdpa=False, low_precision_norms=False, channels_last=False, compile=False)


def loss_and_grads(
    parts: ModelParts, opts: Optimizations, inputs: tuple[torch.Tensor, ...], autocast: torch.dtype | None
) -> tuple[float, list[torch.Tensor]]:
    """One training forward and backward of a copy of the UNet with `opts` applied."""
    mine = ModelParts(
        copy.deepcopy(parts.unet),
        copy.deepcopy(parts.vae),
        copy.deepcopy(parts.text_encoder),
        parts.tokenizer,
        parts.noise_scheduler,
    )
    configure_speedups(mine, opts)
    mine.unet.train()
    # aot_eager: compiles the graph (Dynamo + AOTAutograd) without minutes of C++ code generation.
    forward = compiled(mine.unet, opts.compile, backend="aot_eager")
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        loss = prediction_loss(forward, mine, *inputs)
    loss.backward()
    return loss.item(), [p.grad.clone() for p in mine.unet.parameters() if p.grad is not None]


@pytest.mark.parametrize(
    ("switch", "autocast", "tolerance"),
    [
        ("sdpa", None, 1e-5),
        ("channels_last", None, 1e-5),
        ("gradient_checkpointing", None, 1e-6),
        ("compile", None, 1e-5),
        # Under the same bf16 autocast, only the precision of the norms differs.
        ("low_precision_norms", torch.bfloat16, 2e-2),
    ],
)
def test_each_speedup_switch_changes_the_loss_of_one_step_only_within_tolerance(
    fixed_batch: dict[str, Any], switch: str, autocast: torch.dtype | None, tolerance: float
) -> None:
    parts, inputs = fixed_batch["parts"], fixed_batch["inputs"]
    reference_loss, reference_grads = loss_and_grads(parts, OFF, inputs, autocast)
    switched_loss, switched_grads = loss_and_grads(
        parts, OFF.model_copy(update={switch: True}), inputs, autocast
    )
    assert switched_loss == pytest.approx(reference_loss, rel=tolerance)
    # Gradients as one vector: some entries are rounding noise around zero (e.g. biases before a norm).
    reference, switched = (
        torch.cat([g.flatten() for g in reference_grads]),
        torch.cat([g.flatten() for g in switched_grads]),
    )
    assert (switched - reference).norm() <= 10 * tolerance * reference.norm()


# --- precomputed latents, and the license guard ------------------------------------------------------


def test_training_on_precomputed_latents_skips_the_encoders_and_records_what_it_saw(
    captions: Path, tmp_path: Path
) -> None:
    run = train_run(
        "latents",
        str(captions),
        str(tmp_path / "out"),
        str(tmp_path / "ckpt"),
        optimizations={"precomputeLatents": True},
        schedule={"maxSteps": 3},
    )
    latents.run_latents(run.spec, "test", processes=1, show_progress=False)

    summary = run_training(run)

    assert summary["step"] == 3
    seen = seen_records(tmp_path / "ckpt")
    assert len(seen) == 6 and {r["photo_id"] for r in seen} <= set(range(1000, 1000 + EPOCH_SAMPLES))
    card = json.loads((tmp_path / "out" / "datacard.json").read_text())
    assert card["dataset"]["streams"][0]["uri"] == f"{tmp_path / 'out'}/latents/commercial"
    assert card["trained"]["distinctSamples"] == 6


def test_a_sample_whose_license_forbids_derivatives_stops_training_before_it_is_used(tmp_path: Path) -> None:
    write_split(tmp_path / "bad", "commercial", ["cc-by", "cc-by-nd"] * 2, 3000)
    run = train_run(
        "bad", str(tmp_path / "bad"), str(tmp_path / "out"), str(tmp_path / "ckpt"), schedule={"maxSteps": 2}
    )
    with pytest.raises(LicenseViolation, match="license cc-by-nd forbids derivatives"):
        run_training(run)
    assert not (tmp_path / "ckpt" / "latest").exists()

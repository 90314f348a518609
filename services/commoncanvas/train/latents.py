"""The latents phase: the paper's "precomputed VAE and text latents" speed-up, as a sharded resumable job.

Units are groups of input shards of the captioned dataset, planned like captioning's (`shardplan`) and
run by the same loop (`unitloop`) with the encoders as the model step: unit `i` writes
`{output}/latents/{split}/unit-NNNNNN/` and then its marker; `finalize` merges each split's index.
Every sample keeps its license and attribution columns, so the data card can be built from latents too.

What is stored, and why:
- `latents`: the mean of the VAE's latent distribution, times `vae.config.scaling_factor`, as float16
  (4, R/8, R/8). The mean, not a sample: a sample would freeze one noise draw into the dataset for good,
  while SD's posterior std is tiny (a sample differs from the mean far less than the diffusion noise
  added on top), and the mean keeps precomputed and on-the-fly training identical. Already scaled:
  training uses them as x0 as is and must not scale again.
- `text_hidden`: the text encoder's last hidden states for the caption tokenized and padded to the
  tokenizer's max length (77), float16 (77, dim): what the SD2 pipeline conditions on at inference.

`encode_batch` (with its halves `encode_images` and `encode_captions`, and `load_pixels` before it) is
the one encoding: this phase and training's on-the-fly path both call it, so both train on the same x0.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from commoncanvas import shardplan, units
from commoncanvas.shardplan import ShardGroupUnit, ShardInput, Upstream
from commoncanvas.specs.train import TrainRunSpec
from commoncanvas.storage import Storage
from commoncanvas.unitloop import unit_work
from commoncanvas.units import StageLayout

log = logging.getLogger(__name__)
STAGE = "latents"
LATENTS_DIR = "latents"
# The empty caption's hidden states, for classifier-free guidance dropout without a text encoder.
NULL_TEXT_KEY = "null_text_hidden.npy"
SKIPPED_INPUT_COLUMNS = {"image"}


# --- encoding: shared with training's on-the-fly path ---------------------------------------------


def load_pixels(data: bytes, resolution: int) -> torch.Tensor:
    """Encoded image -> (3, R, R) float32 in [-1, 1]: EXIF-upright, shorter side resized, center-cropped.
    Decoded reduced (a large JPEG at up to 1/8 scale) but never below 2R on the shorter side; refused
    above the pixel limit (commoncanvas.images)."""
    from PIL import Image

    from commoncanvas.images import decode_reduced

    image = decode_reduced(data, resolution)
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def encode_batch(
    vae: Any, text_encoder: Any, tokenizer: Any, images: torch.Tensor, captions: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, R, R) pixels in [-1, 1] + B captions -> scaled latent means (B, 4, R/8, R/8) and the text
    encoder's last hidden states (B, max_length, dim), on the encoders' devices and in their dtypes."""
    if images.shape[0] != len(captions):
        raise ValueError(f"{images.shape[0]} images but {len(captions)} captions")
    return encode_images(vae, images), encode_captions(text_encoder, tokenizer, captions)


def encode_images(vae: Any, images: torch.Tensor) -> torch.Tensor:
    param = next(vae.parameters())
    with torch.no_grad():
        posterior = vae.encode(images.to(param.device, param.dtype)).latent_dist
        latents: torch.Tensor = posterior.mean * vae.config.scaling_factor
    return latents


def encode_captions(text_encoder: Any, tokenizer: Any, captions: Sequence[str]) -> torch.Tensor:
    tokens = tokenizer(
        list(captions),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        hidden: torch.Tensor = text_encoder(tokens.input_ids.to(next(text_encoder.parameters()).device))[0]
    return hidden


# --- the encoders ----------------------------------------------------------------------------------


@dataclass
class Encoders:
    vae: Any
    text_encoder: Any
    tokenizer: Any
    device: torch.device

    def encode(self, images: torch.Tensor, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        latents, hidden = encode_batch(self.vae, self.text_encoder, self.tokenizer, images, captions)
        return _float16(latents), _float16(hidden)


def _float16(tensor: torch.Tensor) -> np.ndarray:
    return tensor.float().cpu().numpy().astype(np.float16)


# Where a model's frozen parts come from when the spec names none: the SD2 releases, or for `tiny` a
# seeded random pipeline written once per machine (same seed, same weights, in every process).
DEFAULT_SOURCES = {
    "sd2-base": "stabilityai/stable-diffusion-2-base",
    "sd2": "stabilityai/stable-diffusion-2",
}
TINY_SEED = 0


def load_encoders(spec: TrainRunSpec, device: torch.device | None = None) -> Encoders:
    """The frozen VAE and text encoder training uses, in eval mode, fp32 (a one-off pass: accuracy
    matters more than speed, and fp16 SD VAEs can overflow)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    revision = spec.model.revision or "main"
    vae = load_part(AutoencoderKL, spec.model.vae, spec.model.architecture, "vae", revision=revision)
    text_encoder = load_part(
        CLIPTextModel, spec.model.text_encoder, spec.model.architecture, "text_encoder", revision=revision
    )
    tokenizer = load_part(
        CLIPTokenizer, spec.model.text_encoder, spec.model.architecture, "tokenizer", revision=revision
    )
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    return Encoders(
        vae.to(device, torch.float32).eval(), text_encoder.to(device, torch.float32).eval(), tokenizer, device
    )


def load_part(cls: Any, source: str | None, architecture: str, part: str, **kwargs: Any) -> Any:
    """Load one part; a source may be a whole pipeline (the part in its subfolder) or just that part."""
    from commoncanvas.models import resolve_model_dir

    if source is None:
        root = tiny_sd2_dir() if architecture == "tiny" else DEFAULT_SOURCES[architecture]
    else:
        root = resolve_model_dir(source)
    path = Path(root)
    if path.is_dir():
        return cls.from_pretrained(root, subfolder=part if (path / part).is_dir() else None, **kwargs)
    try:  # a hub id: a pipeline repo most often, else the part's own repo
        return cls.from_pretrained(root, subfolder=part, **kwargs)
    except OSError:
        return cls.from_pretrained(root, **kwargs)


# The name model.py imports; load_part is the public one.
_from_source = load_part


def tiny_sd2_dir() -> str:
    """The seeded tiny SD2 pipeline, written once under the model cache (a lock serialises processes)."""
    import os
    import shutil

    from filelock import FileLock

    from commoncanvas.models import default_model_cache, write_tiny_sd2

    cache = default_model_cache()
    target = cache / f"tiny-sd2-seed{TINY_SEED}"
    if (target / "model_index.json").is_file():
        return str(target)
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / f"{target.name}.lock")):
        if not (target / "model_index.json").is_file():
            part = Path(tempfile.mkdtemp(dir=cache, prefix=f".{target.name}.part-"))
            try:
                write_tiny_sd2(part, seed=TINY_SEED)
                shutil.rmtree(target, ignore_errors=True)
                os.replace(part, target)
            finally:
                shutil.rmtree(part, ignore_errors=True)
    return str(target)


# --- units -----------------------------------------------------------------------------------------


def layout_of(spec: TrainRunSpec) -> StageLayout:
    return StageLayout.at(latents_uri(spec))


def latents_uri(spec: TrainRunSpec) -> str:
    """Where training reads precomputed latents: `{this}/{split}/` per split, plus NULL_TEXT_KEY."""
    return f"{spec.output.uri.rstrip('/')}/{LATENTS_DIR}"


def splits_of(spec: TrainRunSpec) -> list[str]:
    return list(dict.fromkeys(stream.split for stream in spec.dataset.mix))


# A unit encodes each image with its caption: an input without either is no captioned dataset.
CAPTIONED = Upstream(
    "CaptionJob", "captioned dataset", "dataset.captionJobRef", "dataset.uris", ("caption", "image")
)


def latents_input(spec: TrainRunSpec) -> ShardInput:
    source = spec.dataset
    return ShardInput(
        CAPTIONED,
        source.caption_job_ref,
        source.uris,
        splits_of(spec),
        spec.optimizations.latents_samples_per_unit,
    )


def ensure_plan(spec: TrainRunSpec, layout: StageLayout, resolve_ref: Callable[[str], str] | None) -> Storage:
    # Latents from another resolution or other encoders must never be mixed into the same output.
    model = spec.model.model_dump(include={"architecture", "vae", "text_encoder", "revision"}, by_alias=True)
    settings = {
        "spec.resolution": spec.resolution,
        **{f"spec.model.{k}": v for k, v in sorted(model.items())},
    }
    return shardplan.ensure_plan(layout, latents_input(spec), resolve_ref, settings, kind="TrainRun latents")


read_units = shardplan.read_units


# --- one unit --------------------------------------------------------------------------------------


def output_columns(unit: ShardGroupUnit, latent_shape: tuple[int, ...], text_shape: tuple[int, ...]) -> dict:
    def ndarray(shape: tuple[int, ...]) -> str:
        return f"ndarray:float16:{','.join(str(n) for n in shape)}"

    carried = {name: enc for name, enc in unit.columns.items() if name not in SKIPPED_INPUT_COLUMNS}
    return {"latents": ndarray(latent_shape), "text_hidden": ndarray(text_shape), **carried}


class LatentsStage:
    """The latents phase's part of a worker (workqueue.StageWorker): the VAE and text encoder loaded
    once, on the first unit the worker claims, then every unit it claims is encoded with them."""

    stage = STAGE

    def __init__(
        self,
        spec: TrainRunSpec,
        resolve_ref: Callable[[str], str] | None = None,
        batch_size: int | None = None,
        loader_workers: int = 1,
    ) -> None:
        self.spec = spec
        layout = layout_of(spec)
        self.output = layout.output
        self.planned = read_units(ensure_plan(spec, layout, resolve_ref))
        self.batch_size = batch_size or spec.schedule.micro_batch_size
        self.loader_workers = loader_workers
        self.encoders: Encoders | None = None

    def total_units(self) -> int:
        return len(self.planned)

    def load_model(self) -> bool:
        self.encoders = load_encoders(self.spec)
        return True

    def model(self) -> Encoders:
        if self.encoders is None:
            self.load_model()
        assert self.encoders is not None
        return self.encoders

    def run_attempt(self, unit_index: int, attempt: int) -> dict[str, Any]:
        unit, encoders = self.planned[unit_index], self.model()
        to_pixels = partial(load_pixels, resolution=self.spec.resolution)
        with unit_work(STAGE, self.output, unit, attempt) as work:
            for inputs in work.batches(
                to_pixels, self.batch_size, self.loader_workers, dropped=SKIPPED_INPUT_COLUMNS
            ):
                good = [item for item in inputs["items"] if item["pixels"] is not None]
                if good:
                    captions = [item["row"]["caption"] for item in good]
                    latents, hidden = encoders.encode(inputs["pixels"], captions)
                    if work.writer is None:  # the columns' shapes come from the encoders' first output
                        work.open_writer(output_columns(unit, latents.shape[1:], hidden.shape[1:]))
                    for item, latent, text in zip(good, latents, hidden, strict=True):
                        work.write({**item["row"], "latents": latent, "text_hidden": text})
                for item in inputs["items"]:
                    work.record(item["row"], item["error"])
        return work.finish(resolution=self.spec.resolution)


def finalize(spec: TrainRunSpec, resolve_ref: Callable[[str], str] | None = None) -> dict[str, Any]:
    """Once every unit has its marker: merge each split's index, write the empty caption's hidden
    states (training's caption dropout needs them without a text encoder) and the summary."""
    layout = layout_of(spec)
    plan = ensure_plan(spec, layout, resolve_ref)
    merged = units.summarize(layout, {u.unit: u.split for u in read_units(plan)}, splits_of(spec))
    if not layout.output.exists(NULL_TEXT_KEY):
        encoders = load_encoders(spec)
        hidden = encode_captions(encoders.text_encoder, encoders.tokenizer, [""])[0]
        buffer = io.BytesIO()
        np.save(buffer, _float16(hidden))
        layout.output.write_bytes(NULL_TEXT_KEY, buffer.getvalue())
    excluded = merged.pop("failed")
    result = {**merged, "excluded": excluded, "null_text_hidden": layout.output.url(NULL_TEXT_KEY)}
    layout.output.write_text("summary.json", json.dumps(result, indent=1))
    return result


def run_latents(
    spec: TrainRunSpec,
    label: str,
    resolve_ref: Callable[[str], str] | None = None,
    processes: int = 1,
    show_progress: bool = True,
) -> dict[str, Any]:
    """The whole phase on this machine: plan, `processes` workers over the units, then finalize."""
    from commoncanvas.pool import run_workers

    layout = layout_of(spec)
    total = len(read_units(ensure_plan(spec, layout, resolve_ref)))
    run_workers(
        f"{label} latents",
        layout.output,
        total,
        partial(LatentsStage, spec, resolve_ref),
        processes,
        show_progress,
    )
    return finalize(spec, resolve_ref)

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
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch

from commoncanvas import shardplan, units
from commoncanvas.shardplan import ShardGroupUnit, ShardInput, Upstream
from commoncanvas.specs.train import TrainRunSpec
from commoncanvas.storage import Storage
from commoncanvas.train.parts import Encoders, load_encoders
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


# --- the encoders (loaded by commoncanvas.train.parts) ----------------------------------------------


def encode_to_float16(
    encoders: Encoders, images: torch.Tensor, captions: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """encode_batch with the loaded encoders, as the float16 arrays this phase stores."""
    latents, hidden = encode_batch(encoders.vae, encoders.text_encoder, encoders.tokenizer, images, captions)
    return _float16(latents), _float16(hidden)


def _float16(tensor: torch.Tensor) -> np.ndarray:
    return tensor.float().cpu().numpy().astype(np.float16)


# --- units -----------------------------------------------------------------------------------------


def layout_of(spec: TrainRunSpec) -> StageLayout:
    return StageLayout.at(latents_uri(spec))


def latents_uri(spec: TrainRunSpec) -> str:
    """Where training reads precomputed latents: `{this}/{split}/` per split, plus NULL_TEXT_KEY."""
    return f"{spec.output.uri.rstrip('/')}/{LATENTS_DIR}"


def stage_resolutions(spec: TrainRunSpec) -> list[int]:
    """Every resolution the run trains at, in stage order, each once: each gets its latents."""
    return list(dict.fromkeys(stage.resolution for stage in spec.stages))


def latents_column(spec: TrainRunSpec, resolution: int) -> str:
    """The column holding one stage's latents: `latents` at spec.resolution (the final one, which the
    model is sized for), `latents_{R}` at an earlier stage's resolution R.  One dataset holds them all
    beside one copy of the text states, which are the same at every resolution and 5-20x larger."""
    return "latents" if resolution == spec.resolution else f"latents_{resolution}"


def load_stage_pixels(data: bytes, resolutions: Sequence[int]) -> torch.Tensor:
    """The image at every resolution, each as `load_pixels` gives it, flattened into one vector: the
    unit's loader stacks one tensor per image (`split_stage_pixels` takes a batch apart)."""
    return torch.cat([load_pixels(data, resolution).flatten() for resolution in resolutions])


def split_stage_pixels(pixels: torch.Tensor, resolutions: Sequence[int]) -> list[torch.Tensor]:
    """A batch of `load_stage_pixels` vectors -> one (B, 3, R, R) batch per resolution."""
    chunks = pixels.split([3 * r * r for r in resolutions], dim=1)
    return [chunk.reshape(-1, 3, r, r) for chunk, r in zip(chunks, resolutions, strict=True)]


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
    if spec.schedule.stages:  # (absent for one stage: outputs made before stages keep their identity)
        settings["spec.schedule.stages[].resolution"] = stage_resolutions(spec)
    return shardplan.ensure_plan(layout, latents_input(spec), resolve_ref, settings, kind="TrainRun latents")


read_units = shardplan.read_units


# --- one unit --------------------------------------------------------------------------------------


def output_columns(
    unit: ShardGroupUnit, latent_shapes: dict[str, tuple[int, ...]], text_shape: tuple[int, ...]
) -> dict:
    """MDS columns: each latents column (see latents_column) with its shape, the text states, the rest."""

    def ndarray(shape: tuple[int, ...]) -> str:
        return f"ndarray:float16:{','.join(str(n) for n in shape)}"

    carried = {name: enc for name, enc in unit.columns.items() if name not in SKIPPED_INPUT_COLUMNS}
    latents = {column: ndarray(shape) for column, shape in latent_shapes.items()}
    return {**latents, "text_hidden": ndarray(text_shape), **carried}


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
        # Each image is read and decoded once for all stages' resolutions; its caption encoded once.
        resolutions = stage_resolutions(self.spec)
        columns = [latents_column(self.spec, resolution) for resolution in resolutions]
        to_pixels = partial(load_stage_pixels, resolutions=resolutions)
        with unit_work(STAGE, self.output, unit, attempt) as work:
            for inputs in work.batches(
                to_pixels, self.batch_size, self.loader_workers, dropped=SKIPPED_INPUT_COLUMNS
            ):
                good = [item for item in inputs["items"] if item["pixels"] is not None]
                if good:
                    captions = [item["row"]["caption"] for item in good]
                    first, *others = split_stage_pixels(inputs["pixels"], resolutions)
                    latents, hidden = encode_to_float16(encoders, first, captions)
                    others_latents = (_float16(encode_images(encoders.vae, p)) for p in others)
                    by_column = dict(zip(columns, [latents, *others_latents], strict=True))
                    if work.writer is None:  # the columns' shapes come from the encoders' first output
                        shapes = {column: array.shape[1:] for column, array in by_column.items()}
                        work.open_writer(output_columns(unit, shapes, hidden.shape[1:]))
                    for index, (item, text) in enumerate(zip(good, hidden, strict=True)):
                        stage_latents = {column: array[index] for column, array in by_column.items()}
                        work.write({**item["row"], **stage_latents, "text_hidden": text})
                for item in inputs["items"]:
                    work.record(item["row"], item["error"])
        return work.finish(resolution=self.spec.resolution, resolutions=resolutions)


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

"""One CaptionJob work unit: stream its catalog shards, caption every image with BLIP-2 in batches,
write the joined MDS (original bytes + every catalog column + caption), then the unit marker."""

from __future__ import annotations

import logging
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from streaming import MDSWriter
from torch.utils.data import DataLoader, Dataset

from commoncanvas import metrics, units
from commoncanvas.caption.text import caption_problem, clean_caption
from commoncanvas.caption.unitplan import CaptionLayout, CaptionUnit, ensure_caption_plan, read_caption_units
from commoncanvas.mds import shards_dataset
from commoncanvas.specs.caption import CaptionJobSpec

log = logging.getLogger(__name__)
STAGE = "caption"
CAPTION_COLUMNS = {
    "caption": "str",
    "caption_model": "str",
    "caption_model_revision": "str",
    "caption_prompt": "str",
}


def center_square(image: Any, size: int) -> Any:
    """Center crop to a square and resize to at most `size` px: for the captioner's eyes only."""
    from PIL import Image

    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    return square.resize((size, size), Image.Resampling.BICUBIC) if side > size else square


class CaptionInputs(Dataset[dict[str, Any]]):
    """Map-style view of a unit's shards: a DataLoader keeps the order and decodes in workers."""

    def __init__(self, dataset: Any, image_processor: Any, image_size: int) -> None:
        self.dataset = dataset
        self.image_processor = image_processor
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        import io

        from PIL import Image

        sample = self.dataset[index]
        try:
            with Image.open(io.BytesIO(sample["image"])) as opened:
                image = center_square(opened.convert("RGB"), self.image_size)
            pixels = self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
        except Exception as exc:  # any decoder error means the same thing: this image is unusable
            return {"sample": sample, "pixels": None, "error": f"corrupt-image: {type(exc).__name__}: {exc}"}
        return {"sample": sample, "pixels": pixels, "error": ""}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    good = [item for item in items if item["pixels"] is not None]
    return {
        "items": items,
        "pixels": torch.stack([item["pixels"] for item in good]) if good else None,
    }


@dataclass
class Captioner:
    """A loaded BLIP-2 with its processor, the prompt's token ids, and OOM back-off state."""

    model: Any
    processor: Any
    model_id: str
    revision: str
    device: torch.device
    dtype: torch.dtype
    prompt: str
    generate_kwargs: dict[str, Any]
    micro_batch: int
    prompt_ids: torch.Tensor | None = None
    oom_backoffs: int = 0

    def _generate(self, pixels: torch.Tensor) -> torch.Tensor:
        kwargs: dict[str, Any] = dict(self.generate_kwargs)
        if self.prompt_ids is not None:
            kwargs["input_ids"] = self.prompt_ids.repeat(pixels.shape[0], 1).to(self.device)
        with torch.inference_mode():
            out: torch.Tensor = self.model.generate(
                pixel_values=pixels.to(self.device, self.dtype, non_blocking=True), **kwargs
            )
        return out

    def caption(self, pixels: torch.Tensor) -> list[str]:
        """Captions in input order; on CUDA OOM halve the micro-batch and carry on."""
        texts: list[str] = []
        start = 0
        while start < pixels.shape[0]:
            chunk = pixels[start : start + self.micro_batch]
            try:
                generated = self._generate(chunk)
            except torch.OutOfMemoryError:
                if self.micro_batch == 1:
                    raise
                self.micro_batch = max(1, self.micro_batch // 2)
                self.oom_backoffs += 1
                metrics.OOM_BACKOFFS.labels(STAGE).inc()
                log.warning("CUDA out of memory: micro-batch halved to %d", self.micro_batch)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            if self.prompt_ids is not None and generated.shape[1] > self.prompt_ids.shape[1]:
                generated = generated[:, self.prompt_ids.shape[1] :]  # drop the echoed prompt tokens
            texts.extend(self.processor.batch_decode(generated, skip_special_tokens=True))
            start += chunk.shape[0]
        return texts


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype: torch.dtype = getattr(torch, name)
    return dtype


def load_captioner(spec: CaptionJobSpec, cache_dir: Path) -> Captioner:
    from PIL import Image
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    from commoncanvas.models import resolve_model_dir

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = pick_dtype(spec.model.dtype, device)
    location = resolve_model_dir(spec.model.source, spec.model.revision, cache_dir)
    revision = spec.model.revision or "main"
    processor = Blip2Processor.from_pretrained(location, revision=revision, use_fast=True)
    model = Blip2ForConditionalGeneration.from_pretrained(location, revision=revision, dtype=dtype)
    model.to(device).eval()
    decoding = spec.decoding
    generate_kwargs: dict[str, Any] = {
        "max_new_tokens": decoding.max_new_tokens,
        "min_new_tokens": decoding.min_new_tokens,
        "num_beams": decoding.num_beams,
        "do_sample": False,
    }
    if decoding.repetition_penalty != 1.0:
        generate_kwargs["repetition_penalty"] = decoding.repetition_penalty
    if decoding.no_repeat_ngram_size:
        generate_kwargs["no_repeat_ngram_size"] = decoding.no_repeat_ngram_size
    prompt_ids = None
    if spec.prompt:
        # The processor knows how many image tokens precede the text; ask it once with a blank image.
        probe = processor(images=Image.new("RGB", (8, 8)), text=spec.prompt, return_tensors="pt")
        prompt_ids = probe["input_ids"]
    return Captioner(
        model,
        processor,
        spec.model.source,
        spec.model.revision or "",
        device,
        dtype,
        spec.prompt,
        generate_kwargs,
        spec.batch_size,
        prompt_ids,
    )


def _streaming_view(unit: CaptionUnit, local: Path) -> Any:
    return shards_dataset(unit.split_root, unit.shards, local)


def iter_batches(spec: CaptionJobSpec, dataset: Any, image_processor: Any) -> Iterator[dict[str, Any]]:
    workers = spec.loader_workers
    loader = DataLoader(
        CaptionInputs(dataset, image_processor, spec.image_size),
        batch_size=spec.batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=2 if workers else None,
        persistent_workers=False,
    )
    yield from loader


def run_unit(
    spec: CaptionJobSpec, unit_index: int, resolve_ref: Callable[[str], str] | None = None
) -> dict[str, Any]:
    """Caption unit `unit_index`, or return its marker if it already finished."""
    layout = CaptionLayout.at(spec.output.uri)
    if units.is_done(layout.output, unit_index):
        return units.read_marker(layout.output, unit_index)
    plan = ensure_caption_plan(spec, layout, resolve_ref)
    unit = read_caption_units(plan)[unit_index]
    units.begin_unit(layout.output, [unit.split], unit_index)
    started = time.perf_counter()
    outcomes: Counter[str] = Counter()
    licenses: Counter[str] = Counter()
    failures: list[dict[str, Any]] = []
    batch_seconds: list[float] = []
    with tempfile.TemporaryDirectory(prefix=f"commoncanvas-caption-{unit_index:06d}-") as tmp:
        captioner = load_captioner(spec, Path(tmp).parent / "commoncanvas-models")
        dataset = _streaming_view(unit, Path(tmp) / "input")
        columns = {**unit.columns, **CAPTION_COLUMNS}
        local_out = units.staging_dir(layout.output, unit.split, unit_index, Path(tmp) / "output")
        with MDSWriter(out=str(local_out), columns=columns, size_limit="256mb") as writer:
            for batch in iter_batches(spec, dataset, captioner.processor.image_processor):
                batch_started = time.perf_counter()
                captions = iter(captioner.caption(batch["pixels"]) if batch["pixels"] is not None else [])
                for item in batch["items"]:
                    sample = item["sample"]
                    problem = item["error"]
                    caption = "" if problem else clean_caption(next(captions), spec.prompt)
                    problem = problem or caption_problem(caption)
                    outcome = problem.split(":", 1)[0] if problem else "ok"
                    outcomes[outcome] += 1
                    metrics.SAMPLES.labels(STAGE, unit.split, outcome).inc()
                    if problem:
                        failures.append(
                            {"photo_id": int(sample["photo_id"]), "reason": outcome, "detail": problem}
                        )
                        continue
                    row = {name: sample[name] for name in unit.columns}
                    row.update(
                        caption=caption,
                        caption_model=captioner.model_id,
                        caption_model_revision=captioner.revision,
                        caption_prompt=spec.prompt,
                    )
                    writer.write(row)
                    licenses[str(sample.get("license_code", ""))] += 1
                elapsed = time.perf_counter() - batch_started
                batch_seconds.append(elapsed)
                metrics.BATCH_SECONDS.labels(STAGE).observe(elapsed)
                if torch.cuda.is_available():
                    metrics.GPU_MEMORY_BYTES.labels(STAGE).set(torch.cuda.max_memory_allocated())
        if outcomes["ok"]:
            units.publish_unit(layout.output, unit.split, unit_index, local_out)
    seconds = time.perf_counter() - started
    stats = {
        "unit": unit_index,
        "split": unit.split,
        "input": len(dataset),
        "written": outcomes["ok"],
        "outcomes": dict(sorted(outcomes.items())),
        "licenses": dict(sorted(licenses.items())),
        "seconds": round(seconds, 3),
        "oom_backoffs": captioner.oom_backoffs,
        "final_micro_batch": captioner.micro_batch,
        "model": captioner.model_id,
        "failures": failures,
    }
    assert sum(outcomes.values()) == len(dataset), "every input sample must have an outcome"
    units.finish_unit(layout.output, unit_index, stats)
    metrics.unit_finished(STAGE, outcomes["ok"], seconds)
    log.info(
        "caption unit %d (%s): %d/%d captioned in %.1fs",
        unit_index,
        unit.split,
        outcomes["ok"],
        len(dataset),
        seconds,
    )
    return stats

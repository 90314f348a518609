"""One CaptionJob work unit: stream its catalog shards, caption every image with BLIP-2 in batches,
write the joined MDS (original bytes + every catalog column + caption), then the unit marker."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from commoncanvas import metrics
from commoncanvas.caption.text import caption_problem, clean_caption
from commoncanvas.caption.unitplan import (
    UNIT_EVALUATION_CAPTIONS,
    CaptionLayout,
    ensure_caption_plan,
    read_caption_units,
)
from commoncanvas.licenses import Split
from commoncanvas.scrape.dedup import CREDITS_COLUMN, read_duplicates
from commoncanvas.specs.caption import CaptionJobSpec
from commoncanvas.storage import open_storage
from commoncanvas.unitloop import unit_work

log = logging.getLogger(__name__)
STAGE = "caption"
CAPTION_COLUMNS = {
    "caption": "str",
    "caption_model": "str",
    "caption_model_revision": "str",
    "caption_prompt": "str",
    # Authors of identical copies the catalog dropped for this one (scrape.dedup): credited too.
    CREDITS_COLUMN: "json",
}


def output_columns(split: str, catalog_columns: dict[str, str]) -> dict[str, str]:
    """The captioned MDS columns of a split: the catalog's and the caption's. The NoDerivs evaluation
    split carries no image bytes: its photos are prompts and references, never a training input."""
    columns = {**catalog_columns, **CAPTION_COLUMNS}
    if split == Split.EVALUATION:
        columns.pop("image", None)
    return columns


def evaluation_caption_line(row: dict[str, Any]) -> str:
    """One photo of the evaluation split: its caption and attribution (the attribution manifest's
    fields, named for a reader of prompts), one JSON line."""
    entry: dict[str, Any] = {
        "id": int(row["photo_id"]),
        "caption": row["caption"],
        "license": row["license_code"],
        "license_url": row["license_url"],
        "author": row["author"],
        "source_url": row["page_url"],
    }
    if row.get(CREDITS_COLUMN):  # identical copies by other authors (scrape.dedup): credited too
        entry[CREDITS_COLUMN] = row[CREDITS_COLUMN]
    return json.dumps(entry, ensure_ascii=False) + "\n"


def center_square(image: Any, size: int) -> Any:
    """Center crop to a square and resize to at most `size` px: for the captioner's eyes only."""
    from PIL import Image

    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    return square.resize((size, size), Image.Resampling.BICUBIC) if side > size else square


def caption_pixels(data: bytes, image_processor: Any, size: int) -> torch.Tensor:
    """Encoded image -> the captioner's pixel values, of its center square. Decoded reduced (a large
    JPEG at up to 1/8 scale) but never below twice `size` on the shorter side; refused above the
    pixel limit (commoncanvas.images)."""
    from commoncanvas.images import decode_reduced

    # Upright (EXIF orientation applied), as training sees it: a caption describes the trained image.
    image = center_square(decode_reduced(data, size), size)
    pixels: torch.Tensor = image_processor(images=image, return_tensors="pt")["pixel_values"][0]
    return pixels


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


class CaptionStage:
    """The CaptionJob's part of a worker (workqueue.StageWorker): BLIP-2 loaded once, on the first unit
    the worker claims, then every unit it claims is captioned with it."""

    stage = STAGE

    def __init__(self, spec: CaptionJobSpec, resolve_ref: Callable[[str], str] | None = None) -> None:
        from commoncanvas.models import default_model_cache

        self.spec = spec
        self.output = CaptionLayout.at(spec.output.uri).output
        self.planned = read_caption_units(
            ensure_caption_plan(spec, CaptionLayout.at(spec.output.uri), resolve_ref)
        )
        self.cache_dir = default_model_cache()
        self.captioner: Captioner | None = None
        self._duplicates: dict[str, dict[str, Any]] = {}

    def total_units(self) -> int:
        return len(self.planned)

    def load_model(self) -> bool:
        self.captioner = load_captioner(self.spec, self.cache_dir)
        return True

    def duplicates(self, split_root: str) -> dict[str, Any]:
        """The catalog's duplicates (scrape.dedup), read once per catalog root."""
        root = split_root.rstrip("/").rsplit("/", 1)[0]
        if root not in self._duplicates:
            found = read_duplicates(open_storage(root))
            # As sets, once: every unit's DataLoader looks its samples up in them.
            found["dropped"] = {split: frozenset(ids) for split, ids in found["dropped"].items()}
            self._duplicates[root] = found
        return self._duplicates[root]

    def model(self) -> Captioner:
        if self.captioner is None:
            self.load_model()
        assert self.captioner is not None
        return self.captioner

    def run_attempt(self, unit_index: int, attempt: int) -> dict[str, Any]:
        spec, unit = self.spec, self.planned[unit_index]
        captioner = self.model()
        backoffs_before = captioner.oom_backoffs
        columns = output_columns(unit.split, unit.columns)
        evaluation_lines: list[str] = []
        with unit_work(STAGE, self.output, unit, attempt) as work:
            work.open_writer(columns)
            to_pixels = partial(
                caption_pixels, image_processor=captioner.processor.image_processor, size=spec.image_size
            )
            on_cuda = torch.cuda.is_available()
            duplicates = self.duplicates(unit.split_root)
            batches = work.batches(
                to_pixels,
                spec.batch_size,
                spec.loader_workers,
                duplicates=duplicates["dropped"].get(unit.split, ()),
                pin_memory=on_cuda,
            )
            for batch in batches:
                captions = iter(captioner.caption(batch["pixels"]) if batch["pixels"] is not None else [])
                for item in batch["items"]:
                    sample, problem = item["row"], item["error"]
                    caption = "" if problem else clean_caption(next(captions), spec.prompt)
                    problem = problem or caption_problem(caption)
                    work.record(sample, problem)
                    if problem:
                        continue
                    row = {name: sample[name] for name in unit.columns if name in columns}
                    row.update(
                        caption=caption,
                        caption_model=captioner.model_id,
                        caption_model_revision=captioner.revision,
                        caption_prompt=spec.prompt,
                    )
                    row[CREDITS_COLUMN] = duplicates["credits"].get(str(sample["photo_id"]), [])
                    work.write(row)
                    if unit.split == Split.EVALUATION:
                        evaluation_lines.append(evaluation_caption_line(row))
                if on_cuda:
                    metrics.GPU_MEMORY_BYTES.labels(STAGE).set(torch.cuda.max_memory_allocated())
            if evaluation_lines:  # uploaded with the attempt's shards, published by its marker
                (work.staging / UNIT_EVALUATION_CAPTIONS).write_text(
                    "".join(evaluation_lines), encoding="utf-8"
                )
        return work.finish(
            oom_backoffs=captioner.oom_backoffs - backoffs_before,
            final_micro_batch=captioner.micro_batch,
            model=captioner.model_id,
        )

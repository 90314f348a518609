"""One EvalRun work unit: generate its prompts' images at its guidance scale and seed (or read its
reference images), compute their Inception and CLIP features (and the generated ones' CLIP scores),
write `features.npz` and a few PNGs under the attempt's prefix; the worker then publishes the marker."""

from __future__ import annotations

import io
import logging
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from commoncanvas import metrics, units
from commoncanvas.eval.features import (
    Extractors,
    clip_scores,
    load_extractors,
    load_pipeline,
    reference_image,
)
from commoncanvas.eval.plan import (
    FEATURES_FILE,
    GENERATED,
    EvalUnit,
    ensure_plan,
    read_planned_prompts,
    read_units,
    resolved,
)
from commoncanvas.specs.eval import EvalRunSpec
from commoncanvas.storage import open_storage
from commoncanvas.units import StageLayout

log = logging.getLogger(__name__)
STAGE = "eval"
PREVIEWS_PER_UNIT = 4  # PNGs kept per generation unit: enough to look at, not 120k files
# Each image's own seed (prompt index, run seed): the same image whatever the unit size or batch.
SEED_STRIDE = 10_000_000  # > prompts.limit's maximum


def image_seed(seed: int, prompt_index: int) -> int:
    return seed * SEED_STRIDE + prompt_index


def chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def to_uint8(images: np.ndarray) -> list[np.ndarray]:
    """The pipeline's float images in [0, 1] as the uint8 images a saved PNG holds (diffusers'
    numpy_to_pil rounding)."""
    return list((images * 255).round().clip(0, 255).astype(np.uint8))


class EvalStage:
    """The EvalRun's part of a worker (workqueue.StageWorker): the pipeline and extractors loaded once,
    on the first unit the worker claims."""

    stage = STAGE

    def __init__(self, spec: EvalRunSpec, resolve: Callable[[str, str], str] | None = None) -> None:
        from commoncanvas.models import default_model_cache

        self.spec = resolved(spec, resolve)
        layout = StageLayout.at(self.spec.output.uri)
        self.output = layout.output
        plan = ensure_plan(self.spec, layout)
        self.planned = read_units(plan)
        self.prompts: list[dict[str, Any]] = read_planned_prompts(plan)["prompts"]
        self.cache_dir = default_model_cache()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.pipe: Any = None
        self.extractors: Extractors | None = None

    def total_units(self) -> int:
        return len(self.planned)

    def load_model(self) -> bool:
        spec = self.spec
        assert spec.model.pipeline_uri
        self.pipe = load_pipeline(spec.model.pipeline_uri, self.cache_dir, self.device)
        self.extractors = load_extractors(
            spec.extractors.inception, spec.extractors.clip, self.cache_dir, self.device
        )
        return True

    def run_attempt(self, unit_index: int, attempt: int) -> dict[str, Any]:
        if self.extractors is None:
            self.load_model()
        unit = self.planned[unit_index]
        units.begin_attempt(self.output, [unit.split], unit.unit, attempt)
        prefix = units.attempt_dir(unit.split, unit.unit, attempt)
        started = time.perf_counter()
        run = self._generate if unit.split == GENERATED else self._references
        arrays, outcomes, licenses = run(unit, prefix)
        written = int(outcomes["ok"])
        if written:
            buffer = io.BytesIO()
            np.savez(buffer, **arrays)
            self.output.write_bytes(f"{prefix}/{FEATURES_FILE}", buffer.getvalue())
        if self.device.type == "cuda":
            metrics.GPU_MEMORY_BYTES.labels(STAGE).set(torch.cuda.max_memory_allocated())
        return {
            "unit": unit.unit,
            "split": unit.split,
            "input": sum(outcomes.values()),
            "written": written,
            "outcomes": dict(sorted(outcomes.items())),
            "licenses": dict(sorted(licenses.items())),
            "seconds": round(time.perf_counter() - started, 3),
            "guidanceScale": unit.guidance_scale,
            "seed": unit.seed,
        }

    def _features(self, images: list[np.ndarray]) -> dict[str, np.ndarray]:
        assert self.extractors is not None
        return {
            "inception": self.extractors.inception_features(images),
            "clip": self.extractors.clip_image_features(images),
        }

    def _generate(
        self, unit: EvalUnit, prefix: str
    ) -> tuple[dict[str, np.ndarray], Counter[str], Counter[str]]:
        from PIL import Image

        spec, extractors = self.spec, self.extractors
        assert extractors is not None
        parts: dict[str, list[np.ndarray]] = {"inception": [], "clip": [], "clipScore": [], "prompt": []}
        licenses: Counter[str] = Counter()
        indexes = list(range(unit.start, unit.end))
        for batch in chunks(indexes, spec.batch_size):
            started = time.perf_counter()
            texts = [self.prompts[index]["caption"] for index in batch]
            generators = [torch.Generator(self.device).manual_seed(image_seed(unit.seed, i)) for i in batch]
            output = self.pipe(
                prompt=texts,
                guidance_scale=unit.guidance_scale,
                num_inference_steps=spec.inference_steps,
                height=spec.resolution,
                width=spec.resolution,
                generator=generators,
                output_type="np",
            )
            images = to_uint8(np.asarray(output.images, dtype=np.float32))
            features = self._features(images)
            parts["inception"].append(features["inception"])
            parts["clip"].append(features["clip"])
            parts["clipScore"].append(clip_scores(features["clip"], extractors.clip_text_features(texts)))
            parts["prompt"].append(np.asarray(batch, dtype=np.int64))
            for index, image in zip(batch, images, strict=True):
                licenses[str(self.prompts[index].get("license_code", ""))] += 1
                if index - unit.start < PREVIEWS_PER_UNIT:
                    png = io.BytesIO()
                    Image.fromarray(image).save(png, format="PNG")
                    self.output.write_bytes(f"{prefix}/images/{index:07d}.png", png.getvalue())
            metrics.BATCH_SECONDS.labels(STAGE).observe(time.perf_counter() - started)
            metrics.SAMPLES.labels(STAGE, GENERATED, "ok").inc(len(batch))
        arrays = {name: np.concatenate(values) for name, values in parts.items()}
        return arrays, Counter(ok=len(indexes)), licenses

    def _references(
        self, unit: EvalUnit, prefix: str
    ) -> tuple[dict[str, np.ndarray], Counter[str], Counter[str]]:
        spec = self.spec
        outcomes: Counter[str] = Counter()
        licenses: Counter[str] = Counter()
        parts: dict[str, list[np.ndarray]] = {"inception": [], "clip": []}
        pending: list[np.ndarray] = []

        def flush() -> None:
            if pending:
                features = self._features(pending)
                parts["inception"].append(features["inception"])
                parts["clip"].append(features["clip"])
                pending.clear()

        for data, license_code in self._reference_bytes(unit):
            try:
                pending.append(reference_image(data, spec.resolution))
            except Exception as exc:  # any decoder error means the same thing: this image is unusable
                outcomes["corrupt-image"] += 1
                log.warning(
                    "eval reference unit %d: unusable image: %s: %s", unit.unit, type(exc).__name__, exc
                )
                continue
            outcomes["ok"] += 1
            licenses[license_code] += 1
            if len(pending) >= spec.batch_size:
                flush()
        flush()
        arrays = {name: np.concatenate(values) for name, values in parts.items() if values}
        return arrays, outcomes, licenses

    def _reference_bytes(self, unit: EvalUnit) -> Iterator[tuple[bytes, str]]:
        """(encoded image, license code) of the unit's reference images, at most `unit.limit`."""
        if unit.files is not None:
            storage = open_storage(unit.source)
            for key in unit.files[: unit.limit]:
                yield storage.read_bytes(key), ""
            return
        from commoncanvas.mds import UnitShards

        assert unit.shards is not None
        with tempfile.TemporaryDirectory(prefix=f"commoncanvas-eval-{unit.unit:06d}-") as tmp:
            dataset = UnitShards(unit.source, unit.shards, Path(tmp) / "input")
            for index in range(min(len(dataset), unit.limit)):
                row = dataset[index]
                yield row["image"], str(row.get("license_code", ""))

"""Where a TrainRun's model parts load from: one loader for every part (UNet, VAE, text encoder,
tokenizer), from a spec's `model.*` source, else SD2's release, else (for `tiny`) a seeded random
pipeline written once per machine.  Training (`model.build_model`) and the LATENTS phase
(`latents.LatentsStage`) both load here, so both see the same frozen encoders.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from commoncanvas.specs.train import TrainRunSpec

# Where a model's parts come from when the spec names none: the SD2 releases, or for `tiny` a seeded
# random pipeline written once per machine (same seed, same weights, in every process).
DEFAULT_SOURCES = {
    "sd2-base": "stabilityai/stable-diffusion-2-base",
    "sd2": "stabilityai/stable-diffusion-2",
}
TINY_SEED = 0


@dataclass
class Encoders:
    """The frozen VAE and text encoder (with its tokenizer), on `device`."""

    vae: Any  # diffusers.AutoencoderKL
    text_encoder: Any  # transformers.CLIPTextModel
    tokenizer: Any  # transformers.CLIPTokenizer
    device: torch.device


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


def tiny_sd2_dir() -> str:
    """The seeded tiny SD2 pipeline, written once under the model cache (a lock serialises processes)."""
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

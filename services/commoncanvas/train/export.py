"""What a training run leaves beside its checkpoints: sample images during the run and, at the end,
a diffusers pipeline directory with the EMA weights."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from torch import nn

from commoncanvas.specs.train import TrainRunSpec
from commoncanvas.storage import Storage
from commoncanvas.train.checkpoint import gather_weights
from commoncanvas.train.model import ModelParts, inference_pipeline
from commoncanvas.train.world import World


def write_samples(
    parts: ModelParts,
    unet: nn.Module,
    spec: TrainRunSpec,
    step: int,
    output: Storage,
    world: World,
    amp_dtype: torch.dtype | None,
) -> None:
    """Images for the sample prompts, from the current weights, to `samples/step-NNNNNNNN/` (rank 0).
    Under FSDP every rank runs the UNet (its forward gathers the shards); under DDP rank 0 alone does."""
    sharded = world.distributed and spec.optimizations.fsdp != "off"
    if not (world.is_main or sharded):
        return
    pipe = inference_pipeline(parts, unet)
    unet.eval()
    try:
        with (
            torch.no_grad(),
            torch.autocast(world.device.type, dtype=amp_dtype, enabled=amp_dtype is not None),
        ):
            images = pipe(
                spec.samples.prompts,
                height=spec.resolution,
                width=spec.resolution,
                num_inference_steps=spec.samples.inference_steps,
                guidance_scale=spec.samples.guidance_scale,
                generator=torch.Generator("cpu").manual_seed(spec.schedule.seed),
            ).images
    finally:
        unet.train()
    if world.is_main:
        folder = f"samples/step-{step:08d}"
        for index, image in enumerate(images):
            png = io.BytesIO()
            image.save(png, format="PNG")
            output.write_bytes(f"{folder}/{index:02d}.png", png.getvalue())
        output.write_text(f"{folder}/prompts.txt", "\n".join(spec.samples.prompts) + "\n")


def export_pipeline(parts: ModelParts, unet: nn.Module, ema: Any, output: Storage, world: World) -> str:
    """`pipeline/`: a StableDiffusionPipeline directory with the EMA weights (the UNet's own without EMA).
    Collective (the weights are gathered to rank 0); rank 0 writes, model_index.json last."""
    import tempfile

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    weights = gather_weights(unet, ema)
    if not world.is_main:
        return ""
    # Fresh modules: plain norms, default attention, contiguous weights, whatever the switches did.
    final_unet = UNet2DConditionModel.from_config(parts.unet.config)
    final_unet.load_state_dict(weights)
    vae = AutoencoderKL.from_config(parts.vae.config)
    vae.load_state_dict(parts.vae.state_dict())
    text_encoder = CLIPTextModel(parts.text_encoder.config)
    text_encoder.load_state_dict(parts.text_encoder.state_dict())
    fresh = ModelParts(final_unet, vae, text_encoder, parts.tokenizer, parts.noise_scheduler)
    pipe = inference_pipeline(fresh, final_unet)  # the one constructor, as write_samples' pipeline
    with tempfile.TemporaryDirectory(prefix="commoncanvas-pipeline-") as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        files = sorted(p for p in Path(tmp).rglob("*") if p.is_file())
        # model_index.json makes the directory a pipeline: written last, it is never half there.
        for path in sorted(files, key=lambda p: p.name == "model_index.json"):
            output.upload_file(f"pipeline/{path.relative_to(tmp).as_posix()}", path)
    return output.url("pipeline")

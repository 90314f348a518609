"""TrainRun speed-ups on this CPU, tiny SD2-architecture model: training step time with each switch
off and on, measured in one run from the same weights and batch.

- precomputed latents vs on-the-fly encoding (VAE encode + text encoder every step);
- PyTorch SDPA vs the classic attention path (diffusers' AttnProcessor).

On a GPU the same switches apply to the SD2-base UNet (`--architecture sd2-base`), where they matter
most; this machine has none, so the default measures the tiny model.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

console = Console()


def make_parts(architecture: str, resolution: int, sdpa: bool) -> Any:
    from commoncanvas.specs.train import TrainRunSpec
    from commoncanvas.train.model import build_model, configure_speedups

    spec = TrainRunSpec.model_validate(
        {
            "dataset": {"uris": ["unused"]},
            "output": {"uri": "unused"},
            "checkpoint": {"uri": "unused"},
            "resolution": resolution,
            "model": {"architecture": architecture},
            "optimizations": {"sdpa": sdpa, "lowPrecisionNorms": False, "channelsLast": False},
        }
    )
    parts = build_model(spec, torch.device("cpu"))
    configure_speedups(parts, spec.optimizations)
    return parts


def step_seconds(parts: Any, images: torch.Tensor, ids: torch.Tensor, precomputed: bool, steps: int) -> float:
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(parts.unet.parameters(), lr=1e-4)
    with torch.no_grad():
        latents_cache = parts.vae.encode(images).latent_dist.mean * parts.vae.config.scaling_factor
        hidden_cache = parts.text_encoder(ids)[0]

    def one_step() -> None:
        if precomputed:
            latents, hidden = latents_cache, hidden_cache
        else:
            with torch.no_grad():
                latents = parts.vae.encode(images).latent_dist.mean * parts.vae.config.scaling_factor
                hidden = parts.text_encoder(ids)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, parts.noise_scheduler.config.num_train_timesteps, (latents.shape[0],))
        noisy = parts.noise_scheduler.add_noise(latents, noise, t)
        loss = F.mse_loss(parts.unet(noisy, t, hidden).sample, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up
        one_step()
    started = time.perf_counter()
    for _ in range(steps):
        one_step()
    return (time.perf_counter() - started) / steps


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="bench train_speedups")
    parser.add_argument("--architecture", default=os.environ.get("BENCH_TRAIN_ARCH", "tiny"))
    parser.add_argument("--train-resolution", type=int, default=int(os.environ.get("BENCH_TRAIN_RES", "128")))
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--train-steps", type=int, default=int(os.environ.get("BENCH_TRAIN_STEPS", "10")))
    args, _ = parser.parse_known_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    images = torch.rand(args.train_batch, 3, args.train_resolution, args.train_resolution) * 2 - 1
    rows: dict[str, float] = {}
    for sdpa in (False, True):
        parts = make_parts(args.architecture, args.train_resolution, sdpa)
        ids = parts.tokenizer(
            ["a photo of a cat"] * args.train_batch,
            padding="max_length",
            max_length=parts.tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids
        for precomputed in (False, True):
            key = f"{'sdpa' if sdpa else 'classic'}+{'latents' if precomputed else 'on-the-fly'}"
            rows[key] = step_seconds(parts, images, ids, precomputed, args.train_steps)
    n = args.train_batch
    result = {
        "benchmark": "train_speedups",
        "architecture": args.architecture,
        "resolution": args.train_resolution,
        "batch": n,
        "step_seconds": {k: round(v, 4) for k, v in rows.items()},
        "latents_ratio": round(rows["sdpa+on-the-fly"] / rows["sdpa+latents"], 2),
        "sdpa_ratio": round(rows["classic+latents"] / rows["sdpa+latents"], 2),
        "combined_ratio": round(rows["classic+on-the-fly"] / rows["sdpa+latents"], 2),
    }
    table = Table(
        title=f"TrainRun speed-ups, {args.architecture} model, {args.train_resolution} px, batch {n}, CPU"
    )
    for column in ("attention", "encoders", "step s", "images/s"):
        table.add_column(column)
    for key, seconds in rows.items():
        attention, encoders = key.split("+")
        table.add_row(attention, encoders, f"{seconds:.3f}", f"{n / seconds:.1f}")
    console.print(table)
    console.print(
        f"precomputed latents vs on-the-fly: {result['latents_ratio']:.2f}x; SDPA vs classic: "
        f"{result['sdpa_ratio']:.2f}x; both vs neither: {result['combined_ratio']:.2f}x"
    )
    print(json.dumps(result))
    return result

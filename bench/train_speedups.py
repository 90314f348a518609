"""TrainRun speed-ups on this CPU, tiny SD2-architecture model: training step time with each switch
off and on, from the same weights and batch, through the project's own `build_model` and
`configure_speedups`.

- precomputed latents vs on-the-fly encoding (VAE encode + text encoder every step);
- PyTorch SDPA vs the classic attention path (diffusers' AttnProcessor).

    python -m bench train_speedups [--train-resolution 128] [--train-steps 5] [--rounds 5]

Each round measures all four combinations (2 warm-up + `--train-steps` timed steps each), in reverse
order every other round; the table gives the median [min-max] over rounds, and each ratio's spread from
its per-round ratios.  The GPU figures (SD2-base, every speed-up, MFU) are `python -m bench gpu`'s.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import torch
import torch.nn.functional as F

from bench.report import MIN_ROUNDS, Table, alternate, ratio_spread, ratios, rounded, spread, stats

COMBINATIONS = ("classic+on-the-fly", "classic+latents", "sdpa+on-the-fly", "sdpa+latents")
# (label, numerator, denominator) of each reported ratio of step times: slower / faster = the speed-up.
RATIOS = (
    ("precomputed latents (SDPA on)", "sdpa+on-the-fly", "sdpa+latents"),
    ("SDPA (latents precomputed)", "classic+latents", "sdpa+latents"),
    ("both vs neither", "classic+on-the-fly", "sdpa+latents"),
)


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
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="bench train_speedups")
    parser.add_argument("--architecture", default=env("BENCH_TRAIN_ARCH", "tiny"))
    parser.add_argument("--train-resolution", type=int, default=int(env("BENCH_TRAIN_RES", "128")))
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--train-steps", type=int, default=int(env("BENCH_TRAIN_STEPS", "5")))
    parser.add_argument("--rounds", type=int, default=int(env("BENCH_ROUNDS", str(MIN_ROUNDS))))
    parser.add_argument(
        "--threads",
        type=int,
        default=int(env("BENCH_TRAIN_THREADS", "0")),
        help="torch CPU threads (0: torch's default); on a loaded machine OpenMP's spinning threads "
        "contend with other processes and 1 gives steadier step times",
    )
    args, _ = parser.parse_known_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n = args.train_batch
    images = torch.rand(n, 3, args.train_resolution, args.train_resolution) * 2 - 1
    contenders = {}
    for sdpa in (False, True):
        parts = make_parts(args.architecture, args.train_resolution, sdpa)
        ids = parts.tokenizer(
            ["a photo of a cat"] * n,
            padding="max_length",
            max_length=parts.tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids
        for precomputed in (False, True):
            key = f"{'sdpa' if sdpa else 'classic'}+{'latents' if precomputed else 'on-the-fly'}"
            contenders[key] = lambda parts=parts, ids=ids, precomputed=precomputed: step_seconds(
                parts, images, ids, precomputed, args.train_steps
            )
    results = alternate(
        {key: contenders[key] for key in COMBINATIONS},
        args.rounds,
        lambda r, key, seconds: print(f"round {r + 1} {key}: {seconds:.3f} s/step", flush=True),
    )
    result: dict[str, Any] = {
        "benchmark": "train_speedups",
        "architecture": args.architecture,
        "resolution": args.train_resolution,
        "batch": n,
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "step_seconds": {k: rounded(stats(v), 4) for k, v in results.items()},
        "ratios": {
            label: rounded(stats(ratios(results[slow], results[fast])), 3) for label, slow, fast in RATIOS
        },
    }
    table = Table(
        f"TrainRun speed-ups, {args.architecture} model, {args.train_resolution} px, batch {n}, CPU; "
        f"{torch.get_num_threads()} threads; median [min-max] of {args.rounds} rounds, "
        f"{args.train_steps} timed steps each",
        ["attention", "encoders", "step s", "images/s"],
    )
    for key in COMBINATIONS:
        attention, encoders = key.split("+")
        table.add_row(attention, encoders, spread(results[key], ".3f"), spread([n / s for s in results[key]]))
    table.print()
    speedups = Table("Speed-ups (step time without / with; spread of the per-round ratios)", ["", "ratio"])
    for label, slow, fast in RATIOS:
        speedups.add_row(label, ratio_spread(results[slow], results[fast]))
    speedups.print()
    print(json.dumps(result))
    return result

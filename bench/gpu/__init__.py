"""`python -m bench gpu`: the GPU figures, on one GPU, in one short run (about 8 minutes on an H100/H200).

    bench/gpu/prepare.sh          # once, where the package index is: the wheels torch alone lacks
    bench/gpu/run.sh [--option]   # on the bare GPU machine: installs them offline, then runs this

Full-size architectures with random weights (models.FULL): captioning with BLIP-2 OPT-2.7B in bf16 from
512 px images (a batch sweep, min = max new tokens, with and without JPEG decode); training steps of
SD2-base's UNet at 256 and 512 px with each speed-up turned on in turn; the latents phase (VAE encode +
text encoder at 512 px).  Images/s, peak memory, MFU against the GPU's bf16 peak, and images/s per
A100-equivalent (scaled by the bf16 peaks).  A global `--budget` skips whatever would not fit, and says
so.  One table, and JSON to `--out`.  `--smoke` runs the same code at toy sizes on a CPU in seconds.

Imports only torch, transformers, diffusers and the standard library (plus Pillow for JPEG decode, and
bench.report, which is standard library): the GPU machine has nothing else.

Not measured here: the CaptionJob worker end to end and the pipeline peer (they need the commoncanvas
package and its dependencies), and FSDP (it needs more than one GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
# Dense bf16 tensor-core peaks, TFLOPS (no sparsity).  Matched in order against the device name.
BF16_PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("A100", 312.0),
)
# The figures to beat, per A100 (from the issue: the paper, and mosaicml/diffusion's README).
REFERENCE = {
    "captioning_images_per_s_per_a100": {"paper": 17.0, "goal": 100.0},
    "training_images_per_s_per_a100": {
        "256": {"mosaicml": 137.0, "goal": 178.0},
        "512": {"mosaicml": 36.0, "goal": 47.0},
    },
    "mfu_goal": 0.40,
}
NOT_MEASURED = [
    "CaptionJob worker end to end on synthetic 4K JPEGs, and the transformers pipeline peer: they need the "
    "commoncanvas package and its dependencies, which a bare GPU machine lacks",
    "FSDP: one GPU",
]


def peak_for(name: str) -> float | None:
    return next((peak for key, peak in BF16_PEAK_TFLOPS if key.lower() in name.lower()), None)


def default_out(smoke: bool) -> Path:
    root = Path(os.environ.get("CC_CACHE_DIR", REPO / ".cache")).resolve() / "bench"
    return root / ("gpu-smoke.json" if smoke else "gpu.json")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench gpu", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="toy sizes, on the CPU unless --device says")
    parser.add_argument("--out", type=Path, help="JSON file to write (default .cache/bench/gpu.json)")
    parser.add_argument(
        "--budget",
        type=float,
        default=float(os.environ.get("BENCH_GPU_BUDGET", "400")),
        help="seconds for all measurements; what would not fit is skipped and listed (BENCH_GPU_BUDGET)",
    )
    parser.add_argument("--device", help="default: cuda when present, else cpu")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], help="default: bf16 on a GPU, fp32 on a CPU")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, if not in the table")
    parser.add_argument("--sections", default="captioning,latents,training", help="comma-separated")
    parser.add_argument("--caption-batches", help="comma-separated batch sizes, e.g. 16,32,64,128,256")
    parser.add_argument("--caption-tokens", type=int, help="new tokens per caption (min = max)")
    parser.add_argument("--train-batches", help="resolution:batch pairs, e.g. 256:64,512:16")
    parser.add_argument("--steps", type=int, help="timed steps per measurement")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rungs")
    args, _ = parser.parse_known_args(argv)  # `python -m bench` hands every benchmark the same options
    return args


def sizes_for(args: argparse.Namespace) -> Any:
    from dataclasses import replace

    from bench.gpu.models import FULL, SMOKE

    sizes = SMOKE if args.smoke else FULL
    changes: dict[str, Any] = {}
    if args.caption_batches:
        changes["caption_batches"] = tuple(int(b) for b in args.caption_batches.split(","))
    if args.caption_tokens:
        changes["caption_tokens"] = args.caption_tokens
    if args.train_batches:
        pairs = (pair.split(":") for pair in args.train_batches.split(","))
        changes["train_batches"] = {int(r): int(b) for r, b in pairs}
    if args.steps:
        changes["steps"] = args.steps
    return replace(sizes, **changes)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    started = time.monotonic()
    try:
        import diffusers
        import torch
        import transformers
    except ImportError as error:
        raise SystemExit(
            f"{error}: on a machine with torch only, run bench/gpu/run.sh (after bench/gpu/prepare.sh)"
        ) from error
    from bench.gpu import measure

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    if device.type == "cpu" and args.smoke:
        torch.set_num_threads(1)  # toy sizes gain nothing from threads; on a shared CPU they spin-wait
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak = args.peak_tflops or (peak_for(name) if device.type == "cuda" else None)
    sizes = sizes_for(args)
    budget = measure.Budget(args.budget)
    # bf16 as in production on a GPU; fp32 on a CPU, whose bf16 kernels would make the smoke run crawl.
    choice = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if choice == "bf16" else torch.float32
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    result: dict[str, Any] = {
        "benchmark": "gpu",
        "smoke": args.smoke,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": name,
        "device_count": torch.cuda.device_count() if device.type == "cuda" else 0,
        "bf16_peak_tflops": peak,
        "a100_equivalents_per_gpu": round(peak / measure.A100_BF16_TFLOPS, 3) if peak else None,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "diffusers": diffusers.__version__,
            "cuda": torch.version.cuda,
        },
        "dtype": str(dtype).removeprefix("torch."),
        "budget_s": args.budget,
        "warmup_steps": sizes.warmup,
        "timed_steps": sizes.steps,
        "reference": REFERENCE,
        "not_measured": NOT_MEASURED,
    }
    print(f"bench gpu on {name} ({device}), budget {args.budget:.0f}s", flush=True)
    runs = {
        # Captioning's sweep and the latents phase get a share, so training's rungs always get a turn.
        "captioning": lambda: measure.captioning(sizes, device, dtype, budget.share(0.3)),
        "latents": lambda: measure.latents(sizes, device, dtype, budget.share(0.1)),
        "training": lambda: measure.training(
            sizes, device, dtype, budget, peak, compile_rungs=not args.no_compile
        ),
    }
    result["section_s"] = {}
    for section in (s for s in runs if s in sections):
        began = time.monotonic()
        result[section] = runs[section]()
        measure.free(device)  # the section's models died with its frame
        result["section_s"][section] = round(time.monotonic() - began, 1)
    add_a100_equivalents(result, peak)
    result["skipped"] = budget.skipped
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    print_table(result)
    out = args.out or default_out(args.smoke)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}", flush=True)
    return result


def add_a100_equivalents(result: dict[str, Any], peak: float | None) -> None:
    from bench.gpu.measure import a100_equivalent

    caption = result.get("captioning") or {}
    for window in [*caption.get("sweep", {}).values(), caption.get("with_jpeg_decode") or {}]:
        if "images_per_s" in window:
            window["per_a100"] = a100_equivalent(window["images_per_s"], peak)
    if "latents" in result and "images_per_s" in result["latents"]:
        result["latents"]["per_a100"] = a100_equivalent(result["latents"]["images_per_s"], peak)
    for entry in (result.get("training") or {}).get("resolutions", {}).values():
        for window in entry["rungs"].values():
            if "images_per_s" in window:
                window["per_a100"] = a100_equivalent(window["images_per_s"], peak)


def print_table(result: dict[str, Any]) -> None:
    from bench.report import Table, spread

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    def num(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    table = Table(
        f"bench gpu: {result['device']}, bf16 peak {result['bf16_peak_tflops'] or '?'} TFLOPS, "
        f"{result['date']}" + (" (smoke: toy sizes)" if result["smoke"] else ""),
        ["section", "setting", "images/s [min-max of steps]", "per A100-eq", "MFU", "peak GB", "note"],
        caption=(
            f"{result['warmup_steps']} warm-up + {result['timed_steps']} timed steps per row; "
            f"per A100-eq = images/s x 312 / bf16 peak. Elapsed {result['elapsed_s']}s of "
            f"{result['budget_s']:.0f}s budget; skipped: {len(result['skipped'])}."
        ),
    )

    def add(section: str, setting: str, window: dict[str, Any], note: str = "") -> None:
        if "images_per_s" not in window:
            reason = window.get("skipped") or window.get("error") or "not measured"
            table.add_row(section, setting, "-", "-", "-", "-", reason)
            return
        table.add_row(
            section,
            setting,
            spread(window["images_per_s_steps"]),
            num(window.get("per_a100")),
            pct(window.get("mfu")),
            num(window.get("peak_gb")),
            note,
        )

    caption = result.get("captioning")
    if caption:
        for batch, window in caption["sweep"].items():
            best = " best" if str(caption.get("best_batch")) == batch else ""
            add("captioning", f"batch {batch}, {caption['new_tokens']} tokens", window, best.strip())
        if "with_jpeg_decode" in caption:
            add("captioning", "best batch + JPEG decode", caption["with_jpeg_decode"])
    if "latents" in result:
        add("latents", f"VAE + text encoder {result['latents'].get('resolution', '')}px", result["latents"])
    for resolution, entry in (result.get("training") or {}).get("resolutions", {}).items():
        gains = entry.get("gain_over_previous", {})
        for rung, window in entry["rungs"].items():
            note = f"{gains[rung]:.2f}x over previous" if rung in gains else ""
            add(f"training {resolution}px", f"{rung} (batch {entry['batch']})", window, note)
    table.print()
    for item in result["skipped"]:
        print(f"skipped {item['what']}: needed ~{item['estimate_s']}s, {item['left_s']}s left")


if __name__ == "__main__":
    main(sys.argv[1:])

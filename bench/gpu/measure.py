"""The three measured sections: captioning, training speed-ups, latents.  Each returns plain dicts (JSON)
and takes a Budget, skipping (and saying so) whatever would not fit in what is left of it."""

from __future__ import annotations

import gc
import io
import itertools
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.nn.functional as F

from bench.gpu import models
from bench.gpu.models import Sizes


class Budget:
    """One deadline for the whole run: a step that its estimate says would cross it is skipped."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.skipped: list[dict[str, Any]] = []

    def share(self, fraction: float) -> Budget:
        """A section's part: at most `fraction` of the whole from now, never past the whole's deadline;
        its skips are reported with the whole's."""
        part = Budget(fraction * self.seconds)
        part.deadline = min(part.deadline, self.deadline)
        part.skipped = self.skipped
        return part

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def fits(self, what: str, estimate: float) -> bool:
        if estimate <= self.left():
            return True
        self.skipped.append({"what": what, "estimate_s": round(estimate, 1), "left_s": round(self.left(), 1)})
        print(f"  skipped {what}: needs ~{estimate:.0f}s, {max(self.left(), 0):.0f}s left", flush=True)
        return False


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def timed(step: Callable[[], None], device: torch.device, warmup: int, steps: int) -> dict[str, Any]:
    """Warm-up steps (first-call costs, compilation: reported apart), then `steps` timed one by one."""
    started = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    warm = time.perf_counter() - started
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - began)
    return {"warmup_s": round(warm, 3), "step_s": [round(t, 5) for t in times]}


def per_second(window: dict[str, Any], items: int) -> dict[str, Any]:
    """Items/s over the window, and per step (for the spread)."""
    times = window["step_s"]
    window["images_per_s"] = round(items * len(times) / sum(times), 2)
    window["images_per_s_steps"] = [round(items / t, 2) for t in times]
    return window


def mixed(device: torch.device, dtype: torch.dtype) -> torch.autocast:
    """Autocast to the run's dtype; off for fp32 (a CPU smoke run: bf16 kernels crawl on most CPUs)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


# ---------------------------------------------------------------- captioning


def _pixels(images: torch.Tensor, side: int, dtype: torch.dtype) -> torch.Tensor:
    """BLIP's processor on the device: uint8 -> resize to the ViT's side (bicubic) -> CLIP normalisation."""
    x = images.float().div_(255)
    x = F.interpolate(x, size=(side, side), mode="bicubic", align_corners=False, antialias=True)
    mean = torch.tensor(models.CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(models.CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return ((x - mean) / std).to(dtype)


def _jpegs(count: int, side: int) -> list[bytes] | None:
    """Photo-like JPEGs (smooth colour fields with noise); None without Pillow."""
    try:
        import numpy as np
        from PIL import Image
    except ImportError:
        return None
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        grid = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(grid).resize((side, side), Image.Resampling.BICUBIC), np.int16)
        noisy = np.clip(field + rng.integers(-12, 13, field.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(noisy).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def captioning(sizes: Sizes, device: torch.device, dtype: torch.dtype, budget: Budget) -> dict[str, Any]:
    vision_side = int(sizes.blip2["vision_config"]["image_size"])
    tokens = sizes.caption_tokens
    built = time.perf_counter()
    model = models.blip2(sizes, device, dtype)
    result: dict[str, Any] = {
        "model": "BLIP-2 OPT-2.7B architecture, random weights" if sizes.name == "full" else "tiny BLIP-2",
        "parameters_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
        "dtype": str(dtype).removeprefix("torch."),
        "attention": models.set_attention(model, "sdpa"),
        "input_px": sizes.caption_input_px,
        "vit_px": vision_side,
        "new_tokens": tokens,
        "build_s": round(time.perf_counter() - built, 1),
        "sweep": {},
    }
    largest = max(sizes.caption_batches)
    source = torch.randint(
        0, 256, (largest, 3, sizes.caption_input_px, sizes.caption_input_px), dtype=torch.uint8, device=device
    )

    def generate(pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out: torch.Tensor = model.generate(
                pixel_values=pixel_values,
                min_new_tokens=tokens,
                max_new_tokens=tokens,
                do_sample=False,
                num_beams=1,
            )
        return out

    last: tuple[int, float] | None = None  # (batch, seconds per step) of the previous batch size
    for batch in sizes.caption_batches:
        # Time grows about linearly with the batch once the GPU is full: a safe estimate.
        estimate = (sizes.warmup + sizes.steps + 1) * (last[1] * batch / last[0] if last else 5.0)
        if not budget.fits(f"captioning batch {batch}", estimate):
            break
        reset_peak(device)
        images = source[:batch]
        try:
            generated = generate(_pixels(images, vision_side, dtype))
            window = timed(
                lambda images=images: generate(_pixels(images, vision_side, dtype)),
                device,
                sizes.warmup,
                sizes.steps,
            )
        except RuntimeError as error:
            if not is_oom(error):
                raise
            result["sweep"][str(batch)] = {"error": "out of memory"}
            free(device)
            break
        window = per_second(window, batch)
        window["output_length"] = int(generated.shape[-1])  # prompt included on some versions
        window["peak_gb"] = peak_gb(device)
        result["sweep"][str(batch)] = window
        last = (batch, sum(window["step_s"]) / len(window["step_s"]))
        print(f"  captioning batch {batch}: {window['images_per_s']:.1f} images/s", flush=True)
    measured = {int(b): w for b, w in result["sweep"].items() if "images_per_s" in w}
    if measured:
        best = max(measured, key=lambda b: measured[b]["images_per_s"])
        result["best_batch"] = best
        result["images_per_s"] = measured[best]["images_per_s"]
        result["with_jpeg_decode"] = _with_decode(
            sizes, device, dtype, budget, generate, best, measured[best]
        )
    return result  # the caller frees the model with this frame


def _with_decode(
    sizes: Sizes,
    device: torch.device,
    dtype: torch.dtype,
    budget: Budget,
    generate: Callable[[torch.Tensor], torch.Tensor],
    batch: int,
    without: dict[str, Any],
) -> dict[str, Any]:
    """The best batch again, now from JPEG bytes: Pillow decodes on a thread pool (it releases the GIL),
    the next batch while the GPU generates this one, as the worker's DataLoader does."""
    import numpy as np

    jpegs = _jpegs(16, sizes.caption_input_px)
    if jpegs is None:
        return {"skipped": "Pillow is not installed"}
    step_s = sum(without["step_s"]) / len(without["step_s"])
    if not budget.fits("captioning with JPEG decode", (sizes.warmup + sizes.steps + 1) * step_s * 1.5):
        return {"skipped": "time budget"}
    from PIL import Image

    workers = os.cpu_count() or 1
    vision_side = int(sizes.blip2["vision_config"]["image_size"])
    files = [jpegs[i % len(jpegs)] for i in range(batch)]

    def decode_one(data: bytes) -> Any:
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    with ThreadPoolExecutor(workers) as pool, ThreadPoolExecutor(1) as prefetch:

        def decode_batch() -> torch.Tensor:
            array = np.stack(list(pool.map(decode_one, files)))
            tensor = torch.from_numpy(array).permute(0, 3, 1, 2)
            return tensor.pin_memory() if device.type == "cuda" else tensor

        pending = prefetch.submit(decode_batch)

        def step() -> None:
            nonlocal pending
            host = pending.result()
            pending = prefetch.submit(decode_batch)
            generate(_pixels(host.to(device, non_blocking=True), vision_side, dtype))

        window = per_second(timed(step, device, sizes.warmup, sizes.steps), batch)
        pending.result()
    window.update({"batch": batch, "decode_threads": workers, "jpeg_kb": round(len(files[0]) / 1024, 1)})
    print(f"  captioning with JPEG decode, batch {batch}: {window['images_per_s']:.1f} images/s", flush=True)
    return window


# ---------------------------------------------------------------- training

# Each rung turns one more speed-up on, so rung / previous rung is that speed-up's own gain.
RUNGS = (
    ("baseline", "eager attention, VAE + text encoder every step, fp32 norms, contiguous, eager mode"),
    ("+sdpa", "PyTorch scaled_dot_product_attention"),
    ("+precomputed_latents", "latents and text states read, not computed"),
    ("+low_precision_norms", "GroupNorm/LayerNorm in bf16"),
    ("+channels_last", "UNet and its inputs in channels-last memory format"),
    ("+compile", "torch.compile of the UNet"),
)


def unet_train_flops(
    unet: Any, resolution: int, text_states: torch.Tensor, device: torch.device, dtype: torch.dtype
) -> float:
    """FLOPs of one image's forward + backward through the UNet (torch's FLOP counter on a batch of one;
    eager attention, so attention's matmuls are counted on any backend)."""
    from torch.utils.flop_counter import FlopCounterMode

    models.set_unet_attention(unet, sdpa=False)
    latents = torch.randn(1, 4, resolution // 8, resolution // 8, device=device)
    t = torch.tensor([500], device=device)
    with FlopCounterMode(display=False) as counter:
        with mixed(device, dtype):
            out = unet(latents, t, text_states[:1]).sample
        out.float().square().mean().backward()
    unet.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def training(
    sizes: Sizes,
    device: torch.device,
    dtype: torch.dtype,
    budget: Budget,
    peak_tflops: float | None,
    compile_rungs: bool = True,
) -> dict[str, Any]:
    """The SD2-base UNet's training step at each resolution, rung by rung (see RUNGS); torch.compile's
    rungs run last, after every resolution's other rungs, since they cost the most to warm up."""
    result: dict[str, Any] = {"resolutions": {}}
    text = models.text_encoder(sizes, device, torch.float32)
    vae = models.vae(sizes, device, torch.float32)
    alphas = models.noise_schedule(device)
    pending_compile: list[Callable[[], None]] = []
    for resolution, batch in sizes.train_batches.items():
        entry = _train_resolution(
            sizes, device, dtype, budget, peak_tflops, resolution, batch, text, vae, alphas
        )
        result["resolutions"][str(resolution)] = entry
        if "_compile" in entry:
            pending_compile.append(entry.pop("_compile"))
    for run_compiled in pending_compile if compile_rungs else []:
        run_compiled()
    return result


def _train_resolution(
    sizes: Sizes,
    device: torch.device,
    dtype: torch.dtype,
    budget: Budget,
    peak_tflops: float | None,
    resolution: int,
    batch: int,
    text: Any,
    vae: Any,
    alphas: torch.Tensor,
) -> dict[str, Any]:
    unet = models.unet(sizes, resolution, device)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5, fused=device.type == "cuda")
    generator = torch.Generator(device).manual_seed(0)
    images = torch.rand(batch, 3, resolution, resolution, device=device, generator=generator) * 2 - 1
    ids = torch.randint(0, int(sizes.text["vocab_size"]), (batch, sizes.text_tokens), device=device)
    with torch.no_grad(), mixed(device, dtype):
        cached_latents = (vae.encode(images).latent_dist.sample() * 0.18215).float()
        cached_states = text(ids)[0].float()
    flops = unet_train_flops(unet, resolution, cached_states, device, dtype)
    entry: dict[str, Any] = {
        "batch": batch,
        "unet_parameters_m": round(sum(p.numel() for p in unet.parameters()) / 1e6, 1),
        "unet_train_flops_per_image": int(flops),
        "rungs": {},
    }
    state: dict[str, Any] = {"fn": unet, "precomputed": False, "channels_last": False}

    def step() -> None:
        if state["precomputed"]:
            latents, states = cached_latents, cached_states
        else:
            with torch.no_grad(), mixed(device, dtype):
                latents = vae.encode(images).latent_dist.sample() * 0.18215
                states = text(ids)[0]
        if state["channels_last"]:
            latents = latents.contiguous(memory_format=torch.channels_last)
        noise = torch.randn_like(latents)
        t = torch.randint(0, alphas.numel(), (batch,), device=device)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        with mixed(device, dtype):
            prediction = state["fn"](noisy, t, states).sample
        F.mse_loss(prediction.float(), noise.float()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def measure(rung: str, warmup: int, estimate: float) -> bool:
        if not budget.fits(f"training {resolution}px {rung}", estimate):
            entry["rungs"][rung] = {"skipped": "time budget"}
            return False
        reset_peak(device)
        try:
            window = per_second(timed(step, device, warmup, sizes.steps), batch)
        except RuntimeError as error:
            if not is_oom(error):
                raise
            entry["rungs"][rung] = {"error": "out of memory"}
            free(device)
            return False
        window["peak_gb"] = peak_gb(device)
        window["mfu"] = _mfu(flops, window["images_per_s"], peak_tflops)
        window["what"] = dict(RUNGS)[rung]
        entry["rungs"][rung] = window
        print(f"  training {resolution}px {rung}: {window['images_per_s']:.1f} images/s", flush=True)
        return True

    def switch(rung: str) -> None:
        if rung == "baseline":
            models.set_unet_attention(unet, sdpa=False)
            models.set_unet_attention(vae, sdpa=False)
            models.set_attention(text, "eager")
        elif rung == "+sdpa":
            models.set_unet_attention(unet, sdpa=True)
            models.set_unet_attention(vae, sdpa=True)
            models.set_attention(text, "sdpa")
        elif rung == "+precomputed_latents":
            state["precomputed"] = True
        elif rung == "+low_precision_norms":
            models.low_precision_norms(unet)
        elif rung == "+channels_last":
            unet.to(memory_format=torch.channels_last)
            state["channels_last"] = True
        elif rung == "+compile":
            state["fn"] = torch.compile(unet, backend=sizes.compile_backend)

    last_step = 5.0
    for rung, _ in RUNGS[:-1]:
        switch(rung)
        if measure(rung, sizes.warmup, (sizes.warmup + sizes.steps) * last_step * 1.5):
            last_step = sum(entry["rungs"][rung]["step_s"]) / sizes.steps

    def compiled() -> None:
        switch("+compile")
        # Compiling the forward and backward of the full UNet takes a minute or two on a GPU host.
        compile_s = 150.0 if sizes.compile_backend == "inductor" else 20.0
        # Inductor may compile the backward again on the second call; a plain dynamo trace does not.
        warmup = sizes.warmup + 1 if sizes.compile_backend == "inductor" else sizes.warmup
        measure("+compile", warmup, compile_s + (sizes.warmup + sizes.steps) * last_step)
        if "images_per_s" in entry["rungs"]["+compile"]:
            entry["rungs"]["+compile"]["compile_backend"] = sizes.compile_backend
        _ratios(entry)
        state.clear()
        free(device)

    _ratios(entry)
    entry["_compile"] = compiled
    return entry


def _ratios(entry: dict[str, Any]) -> None:
    """Each rung over the one before it (its own speed-up), and the last measured over the baseline."""
    speeds = [(r, w["images_per_s"]) for r, w in entry["rungs"].items() if "images_per_s" in w]
    gains = {}
    for (_, before), (rung, after) in itertools.pairwise(speeds):
        gains[rung] = round(after / before, 3)
    entry["gain_over_previous"] = gains
    if len(speeds) > 1:
        entry["all_measured_over_baseline"] = round(speeds[-1][1] / speeds[0][1], 3)
        entry["best_images_per_s"] = max(s for _, s in speeds)


def _mfu(flops_per_image: float, images_per_s: float, peak_tflops: float | None) -> float | None:
    return round(flops_per_image * images_per_s / (peak_tflops * 1e12), 4) if peak_tflops else None


# ---------------------------------------------------------------- latents


def latents(sizes: Sizes, device: torch.device, dtype: torch.dtype, budget: Budget) -> dict[str, Any]:
    """The latents phase: VAE encode + text encoder per image at the training resolution, no gradients."""
    if not budget.fits("latents phase", 30.0 if sizes.name == "full" else 5.0):
        return {"skipped": "time budget"}
    resolution, batch = sizes.latents_resolution, sizes.latents_batch
    vae = models.vae(sizes, device, dtype)
    text = models.text_encoder(sizes, device, dtype)
    models.set_unet_attention(vae, sdpa=True)
    attention = models.set_attention(text, "sdpa")
    images = (torch.rand(batch, 3, resolution, resolution, device=device) * 2 - 1).to(dtype)
    ids = torch.randint(0, int(sizes.text["vocab_size"]), (batch, sizes.text_tokens), device=device)

    def step() -> None:
        with torch.inference_mode():
            vae.encode(images).latent_dist.sample()
            text(ids)

    reset_peak(device)
    window = per_second(timed(step, device, sizes.warmup, sizes.steps), batch)
    window.update(
        {
            "resolution": resolution,
            "batch": batch,
            "dtype": str(dtype).removeprefix("torch."),
            "text_attention": attention,
            "peak_gb": peak_gb(device),
        }
    )
    print(f"  latents {resolution}px: {window['images_per_s']:.1f} images/s", flush=True)
    return window


def a100_equivalent(images_per_s: float | None, peak_tflops: float | None) -> float | None:
    """Per A100: scaled by the bf16 peaks (an H100/H200 counts as 989/312 = 3.17 A100s)."""
    if images_per_s is None or not peak_tflops:
        return None
    return round(images_per_s * A100_BF16_TFLOPS / peak_tflops, 2)


A100_BF16_TFLOPS = 312.0

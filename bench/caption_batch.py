"""CaptionJob worker vs transformers' image-to-text pipeline at its best batch size: the same JPEGs, the
same tiny BLIP-2, the same number of new tokens (min = max), on this CPU.

    python -m bench caption_batch [--caption-images 48] [--caption-batch 32] [--rounds 5]

- ours: one unit of the CaptionJob worker (`commoncanvas.caption.worker`) reading an MDS catalog
  (DataLoader decode workers, batched `generate`, MDS output with every catalog column), model load
  included;
- the peer: `pipeline("image-to-text")` built from the same model folder, given the decoded images as
  one list with `batch_size`, captions kept in a list; building the pipeline and decoding (Pillow) are
  timed too.  Its batch size is the best of a sweep (`--peer-batches`, one pass each) run first.

Then `--rounds` alternating rounds (ours, peer, peer, ours, ...); the table gives median [min-max].
Options also come from the environment: BENCH_CAPTION_IMAGES, BENCH_CAPTION_BATCH, BENCH_ROUNDS.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.report import MIN_ROUNDS, Table, alternate, ratio_spread, rounded, spread, stats


def build_catalog(root: Path, count: int) -> list[bytes]:
    from streaming import MDSWriter

    from commoncanvas.sample import synthetic_jpeg
    from commoncanvas.scrape.worker import CATALOG_COLUMNS, blank_catalog_row

    images = [synthetic_jpeg(n, (640, 480)) for n in range(count)]
    with MDSWriter(out=str(root / "commercial"), columns=CATALOG_COLUMNS) as writer:
        for number, image in enumerate(images):
            writer.write(
                {
                    **blank_catalog_row(),
                    "image": image,
                    "photo_id": number,
                    "split": "commercial",
                    "license_code": "cc0",
                    "license_name": "Public Domain Dedication (CC0)",
                    "license_url": "https://creativecommons.org/publicdomain/zero/1.0/",
                    "author": "bench",
                    "author_nsid": "0@N00",
                    "title": "",
                    "tags": [],
                    "page_url": "",
                    "fetched_url": "",
                    "width": 640,
                    "height": 480,
                    "sha256": "",
                }
            )
    return images


def run_ours(catalog: Path, output: Path, model: Path, batch: int, tokens: int) -> float:
    from commoncanvas.caption import worker
    from commoncanvas.specs import CaptionJob

    job = CaptionJob.model_validate(
        {
            "metadata": {"name": "bench"},
            "spec": {
                "input": {"uris": [str(catalog)], "splits": ["commercial"]},
                "output": {"uri": str(output)},
                "model": {"source": str(model)},
                "batchSize": batch,
                "loaderWorkers": 1,
                "decoding": {"maxNewTokens": tokens, "minNewTokens": tokens},
            },
        }
    )
    started = time.perf_counter()
    if hasattr(worker, "CaptionStage"):  # a work-queue worker: model load included in its first attempt
        outcome = worker.CaptionStage(job.spec).run_attempt(0, 0)
    else:
        outcome = worker.run_unit(job.spec, 0)
    elapsed = time.perf_counter() - started
    assert sum(outcome["outcomes"].values()) > 0, outcome
    return elapsed


def run_peer(images: list[bytes], model: Path, tokens: int, batch: int) -> float:
    from PIL import Image
    from transformers import pipeline

    started = time.perf_counter()
    captioner = pipeline("image-to-text", model=str(model), device="cpu")
    decoded = [Image.open(io.BytesIO(data)).convert("RGB") for data in images]
    generate = {"max_new_tokens": tokens, "min_new_tokens": tokens}
    captions = [
        out[0]["generated_text"] for out in captioner(decoded, batch_size=batch, generate_kwargs=generate)
    ]
    assert len(captions) == len(images)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict[str, Any]:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="bench caption_batch")
    parser.add_argument("--caption-images", type=int, default=int(env("BENCH_CAPTION_IMAGES", "48")))
    parser.add_argument("--caption-batch", type=int, default=int(env("BENCH_CAPTION_BATCH", "32")))
    parser.add_argument("--caption-tokens", type=int, default=20)
    parser.add_argument("--peer-batches", default="8,16,32", help="the pipeline's batch sizes to sweep")
    parser.add_argument("--rounds", type=int, default=int(env("BENCH_ROUNDS", str(MIN_ROUNDS))))
    args, _ = parser.parse_known_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from commoncanvas.models import write_tiny_blip2

    n, tokens = args.caption_images, args.caption_tokens
    with tempfile.TemporaryDirectory(prefix="bench-caption-") as tmp:
        root = Path(tmp)
        model = write_tiny_blip2(root / "blip2")
        images = build_catalog(root / "catalog", n)
        sweep = {int(b): n / run_peer(images, model, tokens, int(b)) for b in args.peer_batches.split(",")}
        best = max(sweep, key=lambda b: sweep[b])
        print("peer sweep, images/s by batch size: " + ", ".join(f"{b}: {v:.1f}" for b, v in sweep.items()))
        outputs = iter(range(args.rounds))
        results = alternate(
            {
                "ours": lambda: run_ours(
                    root / "catalog", root / f"out-{next(outputs)}", model, args.caption_batch, tokens
                ),
                "peer": lambda: run_peer(images, model, tokens, best),
            },
            args.rounds,
            lambda r, side, seconds: print(f"round {r + 1} {side}: {n / seconds:.1f} images/s", flush=True),
        )
    speed = {side: [n / seconds for seconds in results[side]] for side in results}
    result = {
        "benchmark": "caption_batch",
        "images": n,
        "tokens": tokens,
        "batch": args.caption_batch,
        "peer_batch": best,
        "peer_sweep_images_per_s": {str(b): round(v, 2) for b, v in sweep.items()},
        "rounds": args.rounds,
        "ours_images_per_s": rounded(stats(speed["ours"]), 2),
        "peer_images_per_s": rounded(stats(speed["peer"]), 2),
        "ratio": rounded(stats([a / b for a, b in zip(speed["ours"], speed["peer"], strict=True)]), 3),
    }
    table = Table(
        f"CaptionJob worker vs transformers image-to-text pipeline at its best batch (tiny BLIP-2, CPU, "
        f"{n} images, {tokens} tokens); median [min-max] of {args.rounds} rounds",
        ["", f"ours (batch {args.caption_batch}, MDS out)", f"pipeline (batch {best})", "ours / pipeline"],
    )
    table.add_row(
        "images/s", spread(speed["ours"]), spread(speed["peer"]), ratio_spread(speed["ours"], speed["peer"])
    )
    table.add_row("seconds", spread(results["ours"], ".2f"), spread(results["peer"], ".2f"), "")
    table.print()
    print(json.dumps(result))
    return result

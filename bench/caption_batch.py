"""CaptionJob worker vs a naive loop, same images, same tiny BLIP-2, on this CPU.

Ours: `commoncanvas.caption.worker.run_unit` (batched `generate`, DataLoader decode workers, MDS output
with every catalog column).  Naive: transformers' image-to-text pipeline called one image at a time
(what a script would do), captions kept in a list.  Both decode the same JPEG bytes and generate the
same number of tokens.
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

from rich.console import Console
from rich.table import Table

console = Console()


def build_catalog(root: Path, count: int) -> list[bytes]:
    from streaming import MDSWriter

    from commoncanvas.sample import synthetic_jpeg
    from commoncanvas.scrape.worker import CATALOG_COLUMNS

    images = [synthetic_jpeg(n, (640, 480)) for n in range(count)]
    with MDSWriter(out=str(root / "commercial"), columns=CATALOG_COLUMNS) as writer:
        for number, image in enumerate(images):
            writer.write(
                {
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
    stats = worker.run_unit(job.spec, 0)
    elapsed = time.perf_counter() - started
    assert stats["outcomes"].get("ok", 0) + sum(v for k, v in stats["outcomes"].items() if k != "ok") > 0
    return elapsed


def run_naive(images: list[bytes], model: Path, tokens: int) -> float:
    from PIL import Image
    from transformers import pipeline

    started = time.perf_counter()
    captioner = pipeline("image-to-text", model=str(model), device="cpu")
    captions = []
    for data in images:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        out = captioner(image, generate_kwargs={"max_new_tokens": tokens, "min_new_tokens": tokens})
        captions.append(out[0]["generated_text"])
    assert len(captions) == len(images)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="bench caption_batch")
    parser.add_argument(
        "--caption-images", type=int, default=int(os.environ.get("BENCH_CAPTION_IMAGES", "96"))
    )
    parser.add_argument("--caption-batch", type=int, default=int(os.environ.get("BENCH_CAPTION_BATCH", "32")))
    parser.add_argument("--caption-tokens", type=int, default=20)
    args, _ = parser.parse_known_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from commoncanvas.models import write_tiny_blip2

    with tempfile.TemporaryDirectory(prefix="bench-caption-") as tmp:
        root = Path(tmp)
        model = write_tiny_blip2(root / "blip2")
        images = build_catalog(root / "catalog", args.caption_images)
        ours = run_ours(root / "catalog", root / "out", model, args.caption_batch, args.caption_tokens)
        naive = run_naive(images, model, args.caption_tokens)
    n = args.caption_images
    result = {
        "benchmark": "caption_batch",
        "images": n,
        "tokens": args.caption_tokens,
        "batch": args.caption_batch,
        "ours_images_per_s": round(n / ours, 2),
        "naive_images_per_s": round(n / naive, 2),
        "ratio": round(naive / ours, 2),
    }
    table = Table(title=f"CaptionJob worker vs naive image-to-text loop (tiny BLIP-2, CPU, {n} images)")
    for column in ("", "images/s", "seconds"):
        table.add_column(column)
    table.add_row(f"ours (batch {args.caption_batch}, MDS out)", f"{n / ours:.1f}", f"{ours:.1f}")
    table.add_row("naive pipeline, 1 image at a time", f"{n / naive:.1f}", f"{naive:.1f}")
    table.add_row("ratio ours/naive", f"{result['ratio']:.2f}x", "")
    console.print(table)
    print(json.dumps(result))
    return result

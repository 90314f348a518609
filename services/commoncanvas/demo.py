"""`make demo`: the whole pipeline on this machine, on the bundled CC sample, then where the outputs are."""

from __future__ import annotations

import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from commoncanvas.runner import run_file
from commoncanvas.sample import build_sample, url_templates
from commoncanvas.sample.server import LocalHTTPServer

console = Console()


def scrape_job(name: str, metadata: Path, output: Path, base_url: str) -> dict[str, object]:
    return {
        "apiVersion": "commoncanvas.dev/v1alpha1",
        "kind": "ScrapeJob",
        "metadata": {"name": name},
        "spec": {
            "source": {"uri": str(metadata)},
            "output": {"uri": str(output)},
            "fetch": {**url_templates(base_url), "concurrency": 16, "retries": 1, "backoffSeconds": 0.1},
            "unitSize": 8,
            "parallelism": 2,
        },
    }


def caption_job(name: str, scrape_name: str, output: Path, model: Path) -> dict[str, object]:
    return {
        "apiVersion": "commoncanvas.dev/v1alpha1",
        "kind": "CaptionJob",
        "metadata": {"name": name},
        "spec": {
            "input": {"scrapeJobRef": scrape_name},
            "output": {"uri": str(output)},
            "model": {"source": str(model)},
            "prompt": "a photo of",
            # A random-weight model repeats itself; these keep its captions readable.
            "decoding": {"maxNewTokens": 12, "minNewTokens": 4, "noRepeatNgramSize": 2},
            "batchSize": 8,
            "loaderWorkers": 1,
            "parallelism": 2,
        },
    }


def read_split(uri: str) -> list[dict[str, object]]:
    from streaming import StreamingDataset

    dataset = StreamingDataset(local=uri, shuffle=False, batch_size=1)
    return [dataset[i] for i in range(len(dataset))]


def main(out: Path = Path("demo-output")) -> None:
    from commoncanvas.models import write_tiny_blip2

    out = out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    www = out / "sample"
    www.mkdir(parents=True)
    blip2 = write_tiny_blip2(out / "models" / "blip2")
    with LocalHTTPServer(root=www / "www") as server:
        sample = build_sample(www, server.base_url)
        pipeline = out / "pipeline.yaml"
        documents = [
            scrape_job("demo-scrape", sample.metadata, out / "catalog", server.base_url),
            caption_job("demo-caption", "demo-scrape", out / "captions", blip2),
        ]
        pipeline.write_text(yaml.safe_dump_all(documents, sort_keys=False))
        console.print(f"[bold]Pipeline[/] {pipeline} (sample served at {server.base_url})")
        scraped, captioned = run_file(pipeline)
    show_catalog(scraped)
    show_captions(captioned)
    console.print("Outputs:")
    for stage, summary in (("catalog", scraped), ("captions", captioned)):
        for split, uri in summary["outputs"].items():
            console.print(f"  {stage:>8} {split:>14}: {uri}")
    for stage in ("catalog", "captions"):
        console.print(f"  {stage:>8} {'summary':>14}: {out / stage / 'summary.json'}")
    console.print(
        f"  read a split with: streaming.StreamingDataset(local={scraped['outputs']['commercial']!r})"
    )


def show_catalog(summary: dict[str, object]) -> None:
    table = Table(title="Catalog (ScrapeJob demo-scrape)")
    for column in ("split", "license", "samples"):
        table.add_column(column)
    for split, uri in summary["outputs"].items():  # type: ignore[attr-defined]
        rows = read_split(uri)
        for code, count in sorted(Counter(str(r["license_code"]) for r in rows).items()):
            table.add_row(split, code, str(count))
    console.print(table)
    console.print("Excluded:", json.dumps(summary["excluded"]))


def show_captions(summary: dict[str, object], per_split: int = 3) -> None:
    table = Table(title="Captions (CaptionJob demo-caption, tiny random-weight BLIP-2)")
    for column in ("split", "photo", "license", "author", "caption"):
        table.add_column(column)
    for split, uri in summary["outputs"].items():  # type: ignore[attr-defined]
        for row in read_split(uri)[:per_split]:
            table.add_row(
                split, str(row["photo_id"]), str(row["license_code"]), str(row["author"]), str(row["caption"])
            )
    console.print(table)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("demo-output"))

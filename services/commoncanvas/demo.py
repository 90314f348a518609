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


def read_split(uri: str) -> list[dict[str, object]]:
    from streaming import StreamingDataset

    dataset = StreamingDataset(local=uri, shuffle=False, batch_size=1)
    return [dataset[i] for i in range(len(dataset))]


def main(out: Path = Path("demo-output")) -> None:
    out = out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    www = out / "sample"
    www.mkdir(parents=True)
    with LocalHTTPServer(root=www / "www") as server:
        sample = build_sample(www, server.base_url)
        job_file = out / "scrapejob.yaml"
        job_file.write_text(
            yaml.safe_dump(
                scrape_job("demo-scrape", sample.metadata, out / "catalog", server.base_url), sort_keys=False
            )
        )
        console.print(f"[bold]1/1 ScrapeJob[/] {job_file} (sample served at {server.base_url})")
        (summary,) = run_file(job_file)
    table = Table(title="Catalog (ScrapeJob demo-scrape)")
    for column in ("split", "license", "samples"):
        table.add_column(column)
    for split, uri in summary["outputs"].items():
        rows = read_split(uri)
        for code, count in sorted(Counter(str(r["license_code"]) for r in rows).items()):
            table.add_row(split, code, str(count))
    console.print(table)
    console.print("Excluded:", json.dumps(summary["excluded"]))
    console.print("Outputs:")
    for split, uri in summary["outputs"].items():
        console.print(f"  {split:>14}: {uri}  (streaming.StreamingDataset(local={uri!r}))")
    console.print(f"  {'summary':>14}: {out / 'catalog' / 'summary.json'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("demo-output"))

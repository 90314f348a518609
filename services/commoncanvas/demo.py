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

from commoncanvas.mds import read_split
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
            "fetch": {
                **url_templates(base_url),
                "concurrency": 16,
                "retries": 1,
                "backoffSeconds": 0.1,
                # The sample server is on loopback, which a ScrapeJob refuses unless told otherwise.
                "allowPrivateNetworks": True,
                "allowedHosts": ["127.0.0.1"],
            },
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
            # Small units, so the demo shows workers pulling several units each (default: 8,192).
            "samplesPerUnit": 4,
            "parallelism": 2,
        },
    }


def train_run(name: str, caption_name: str, out: Path) -> dict[str, object]:
    return {
        "apiVersion": "commoncanvas.dev/v1alpha1",
        "kind": "TrainRun",
        "metadata": {"name": name},
        "spec": {
            "dataset": {
                "captionJobRef": caption_name,
                "loaderWorkers": 0,
                "mix": [{"split": "commercial", "weight": 3}, {"split": "noncommercial", "weight": 1}],
            },
            "output": {"uri": str(out / "model")},
            "checkpoint": {"uri": str(out / "checkpoints"), "intervalSteps": 10, "keep": 2},
            "resolution": 64,
            "model": {"architecture": "tiny"},
            "optimizations": {"precomputeLatents": True, "ema": {"startStep": 5, "every": 1, "decay": 0.9}},
            "schedule": {
                "globalBatchSize": 4,
                "microBatchSize": 2,
                "warmupSteps": 2,
                "maxSteps": 20,
                "learningRate": 1e-3,
            },
            "distributed": {"minNodes": 1, "maxNodes": 2, "gpusPerNode": 0, "maxRestarts": 1},
            "samples": {"prompts": ["a photo of a rocket launch"], "intervalSteps": 10, "inferenceSteps": 2},
        },
    }


# What the demo's EvalRun generates from: a few prompts, like COCO's captions (30k at paper scale).
EVAL_PROMPTS = (
    "a photo of a rocket launch",
    "a photo of a cat sleeping on a sofa",
    "a photo of a red bicycle against a wall",
    "a photo of a bowl of fruit on a table",
    "a photo of a mountain lake at sunrise",
    "a photo of a busy city street at night",
)


def eval_run(
    name: str, train_name: str, references: Path, out: Path, models: dict[str, Path]
) -> dict[str, object]:
    """A tiny EvalRun of the trained model: 6 prompts at 2 guidance scales over 2 workers, tiny random
    extractors (their numbers show the machinery, not quality), the captioned photos as references."""
    prompts = out / "prompts.jsonl"
    prompts.parent.mkdir(parents=True, exist_ok=True)
    prompts.write_text(
        "".join(json.dumps({"id": i, "caption": c}) + "\n" for i, c in enumerate(EVAL_PROMPTS))
    )
    return {
        "apiVersion": "commoncanvas.dev/v1alpha1",
        "kind": "EvalRun",
        "metadata": {"name": name},
        "spec": {
            "model": {"trainRunRef": train_name},
            "prompts": {"uri": str(prompts)},
            "references": {"uri": str(references)},
            "extractors": {"inception": str(models["inception"]), "clip": str(models["clip"])},
            "output": {"uri": str(out / "results")},
            "resolution": 64,
            "guidanceScales": [1.5, 7.5],
            "inferenceSteps": 2,
            "samplesPerUnit": 3,
            "parallelism": 2,
            "gpusPerPod": 0,
        },
    }


def main(out: Path = Path("demo-output")) -> None:
    from commoncanvas.models import TINY_CLIP_SEED, write_tiny_blip2, write_tiny_clip, write_tiny_inception

    out = out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    www = out / "sample"
    www.mkdir(parents=True)
    blip2 = write_tiny_blip2(out / "models" / "blip2")
    extractors = {
        "clip": write_tiny_clip(out / "models" / "clip", seed=TINY_CLIP_SEED),
        "inception": write_tiny_inception(out / "models" / "inception"),
    }
    with LocalHTTPServer(root=www / "www") as server:
        sample = build_sample(www, server.base_url)
        pipeline = out / "pipeline.yaml"
        documents = [
            scrape_job("demo-scrape", sample.metadata, out / "catalog", server.base_url),
            caption_job("demo-caption", "demo-scrape", out / "captions", blip2),
            train_run("demo-train", "demo-caption", out),
            eval_run("demo-eval", "demo-train", out / "captions" / "commercial", out / "eval", extractors),
        ]
        pipeline.write_text(yaml.safe_dump_all(documents, sort_keys=False))
        console.print(f"[bold]Pipeline[/] {pipeline} (sample served at {server.base_url})")
        scraped, captioned, trained, evaluated = run_file(pipeline)
    show_catalog(scraped)
    show_captions(captioned)
    show_workers({"scrape": scraped, "caption": captioned, "latents": latents_summary(out)})
    image = generate(out / "model" / "pipeline", "a photo of a rocket launch", out / "generated.png")
    console.print("Outputs:")
    for stage, summary in (("catalog", scraped), ("captions", captioned)):
        for split, uri in summary["outputs"].items():
            console.print(f"  {stage:>8} {split:>14}: {uri}")
    for stage in ("catalog", "captions"):
        console.print(f"  {stage:>8} {'summary':>14}: {out / stage / 'summary.json'}")
    status = trained["status"]
    console.print(
        f"  {'model':>8} {'training':>14}: {status['step']} steps, {status['imagesSeen']} images, "
        f"loss {status['loss']:.4f}, logs {trained['logDir']}"
    )
    for name, uri in sorted(trained["outputs"].items()):
        console.print(f"  {'model':>8} {name:>14}: {uri}")
    console.print(f"  {'image':>8} {'generated':>14}: {image}")
    show_evaluation(evaluated)
    console.print(
        f"  read a split with: streaming.StreamingDataset(local={scraped['outputs']['commercial']!r})"
    )


def generate(pipeline_dir: Path, prompt: str, target: Path) -> Path:
    """One image from the exported diffusers pipeline: what any user of the model would do."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(pipeline_dir), safety_checker=None)
    generator = torch.Generator().manual_seed(0)
    result = pipe(prompt, num_inference_steps=4, height=64, width=64, generator=generator)
    result.images[0].save(target)
    return target


def latents_summary(out: Path) -> dict[str, object]:
    path = out / "model" / "latents" / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def show_workers(summaries: dict[str, dict[str, object]]) -> None:
    """Workers, not units, are pods (or processes here): each loads its model once."""
    console.print("Workers:")
    for stage, summary in summaries.items():
        if summary:
            console.print(
                f"  {stage:>8}: {summary.get('units')} units by {summary.get('workers')} workers, "
                f"{summary.get('modelLoads')} model loads"
            )


def show_evaluation(results: dict[str, object]) -> None:
    """The EvalRun's numbers, one row per guidance scale, and where its results and plot are."""
    prompts, references = results["prompts"], results["references"]
    table = Table(
        title=f"Evaluation (EvalRun demo-eval: {prompts['count']} prompts, "  # type: ignore[index]
        f"{references['count']} reference images, tiny random extractors)"  # type: ignore[index]
    )
    for column in ("guidance", "FID", "KID", "CLIP-FID", "CLIP score"):
        table.add_column(column)
    for row in results["rows"]:  # type: ignore[attr-defined]
        table.add_row(
            f"{row['guidanceScale']:g}",
            *(f"{row[name]:.4g}" for name in ("fid", "kid", "clipFid", "clipScore")),
        )
    console.print(table)
    for name, uri in results["outputs"].items():  # type: ignore[attr-defined]
        console.print(f"  {'eval':>8} {name:>14}: {uri}")


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

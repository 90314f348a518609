"""`commoncanvas`: the command line for people, pods and the local runner."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from commoncanvas.specs.common import SpecError


def _echo_json(data: object) -> None:
    click.echo(json.dumps(data, indent=None, sort_keys=False))


class _UserErrors(click.Group):
    """Errors a person can act on print as one clear message instead of a traceback (-v keeps it).
    SpecError covers resource files (YAML, schema, references, URIs) and PlanMismatch (OutputReused) an
    output made with other settings; a bare ValueError is a bug and keeps its traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        from commoncanvas.caption.unitplan import InputMissing
        from commoncanvas.metadata import MetadataError
        from commoncanvas.runner import UnitsFailed
        from commoncanvas.storage import InvalidURI, StorageError
        from commoncanvas.workqueue import UnitsGivenUp

        try:
            return super().invoke(ctx)
        except (
            SpecError,
            MetadataError,
            UnitsFailed,
            UnitsGivenUp,
            InputMissing,
            StorageError,
            InvalidURI,
            LookupError,
            FileNotFoundError,
        ) as exc:
            if logging.getLogger().isEnabledFor(logging.DEBUG):
                raise
            raise click.ClickException(str(exc)) from None


@click.group(cls=_UserErrors)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """CommonCanvas: CC-licensed images -> captions -> a text-to-image model."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--no-progress", is_flag=True, help="No progress bar (logs only).")
def run(file: Path, no_progress: bool) -> None:
    """Run the custom resources in FILE on this machine and print a JSON summary per resource."""
    from commoncanvas.runner import run_file

    for summary in run_file(file, show_progress=not no_progress):
        _echo_json(summary)


@main.group()
def scrape() -> None:
    """The ScrapeJob stage, step by step."""


@scrape.command("plan")
@click.option(
    "--metadata", "metadata", required=True, help="YFCC100M TSV (plain/bz2/gz) or SQLite; path or s3://"
)
@click.option("--output", required=True, help="Directory (or s3:// prefix) for the plan")
@click.option("--unit-size", default=None, type=click.IntRange(min=1), help="Default: the spec's unitSize")
@click.option(
    "--allow", multiple=True, help="License code to keep (repeatable); default: all allowing derivatives"
)
def scrape_plan(metadata: str, output: str, unit_size: int | None, allow: tuple[str, ...]) -> None:
    """Plan a scrape: prints one JSON object with counts per split and exclusions by reason."""
    from pydantic import ValidationError

    from commoncanvas.metadata import MetadataError
    from commoncanvas.scrape.plan import write_plan
    from commoncanvas.specs.common import format_validation_error
    from commoncanvas.specs.scrape import ScrapeJobSpec
    from commoncanvas.storage import open_storage

    body: dict[str, object] = {"source": {"uri": metadata}, "output": {"uri": output}}
    if unit_size is not None:
        body["unitSize"] = unit_size
    if allow:
        body["licenses"] = {"allow": list(allow)}
    try:
        spec = ScrapeJobSpec.model_validate(body)
        _echo_json(write_plan(spec, open_storage(output)).to_dict())
    except ValidationError as exc:
        raise click.ClickException(format_validation_error(exc, "the options")) from None
    except MetadataError as exc:
        raise click.ClickException(str(exc)) from None


def _load_one(file: Path, kind: str) -> Any:
    from commoncanvas.specs import KINDS, load_resources

    found = [r for r in load_resources(file, KINDS) if r.kind == kind]
    if len(found) != 1:
        raise click.ClickException(f"{file} must hold exactly one {kind}, found {len(found)}")
    return found[0]


_FILE = click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
_WORKER = click.option(
    "--worker",
    "worker",
    type=click.IntRange(min=0),
    default=lambda: int(os.environ.get("JOB_COMPLETION_INDEX") or 0),
    help="This worker's index among the stage's workers (default: $JOB_COMPLETION_INDEX, else 0)",
)


def _work(make_stage: Any, stage: str, workers: int, gpus: int, worker: int, metrics_port: int) -> None:
    """A pod's part of a stage: one worker per GPU (one on CPU), each claiming units until none is left."""
    from commoncanvas import metrics
    from commoncanvas.workqueue import Identity, run_replicas, visible_devices

    metrics.serve(metrics_port, stage=stage)
    reports = run_replicas(make_stage, Identity(worker, workers), visible_devices(gpus))
    _echo_json(
        {
            "stage": stage,
            "replicas": len(reports),
            "units": sum(r["units"] for r in reports),
            "written": sum(r["written"] for r in reports),
            "modelLoads": sum(r["modelLoads"] for r in reports),
        }
    )


_METRICS_PORT = click.option(
    "--metrics-port",
    type=int,
    default=lambda: int(os.environ.get("METRICS_PORT", "0")),
    help="Serve Prometheus metrics on this port (default: $METRICS_PORT, 0 = off)",
)


_TERMINATION_LOG = click.option(
    "--termination-log",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the unit count here (a pod's /dev/termination-log, read by the operator)",
)


def _report_units(count: int, termination_log: Path | None) -> None:
    body = json.dumps({"units": count})
    if termination_log is not None:
        termination_log.write_text(body)
    click.echo(body)


@scrape.command("work")
@_FILE
@_WORKER
@_METRICS_PORT
def scrape_work(file: Path, worker: int, metrics_port: int) -> None:
    """Be one worker of the ScrapeJob in FILE: claim and fetch units until none is left (a pod of the
    stage's Indexed Job runs this)."""
    from functools import partial

    from commoncanvas.scrape.worker import STAGE, ScrapeStage

    spec = _load_one(file, "ScrapeJob").spec
    _work(partial(ScrapeStage, spec), STAGE, spec.parallelism, 0, worker, metrics_port)


@scrape.command("prepare")
@_FILE
@_TERMINATION_LOG
def scrape_prepare(file: Path, termination_log: Path | None) -> None:
    """Plan the ScrapeJob in FILE once (kept under its output), add retry units for samples an earlier
    run left transient, and print {"units": N}."""
    from commoncanvas.scrape.worker import prepare

    _report_units(prepare(_load_one(file, "ScrapeJob").spec), termination_log)


@scrape.command("finalize")
@_FILE
def scrape_finalize(file: Path) -> None:
    """Merge the finished units' indexes and print the job summary."""
    from commoncanvas.scrape.worker import finalize

    _echo_json(finalize(_load_one(file, "ScrapeJob").spec))


@main.group()
def caption() -> None:
    """The CaptionJob stage, step by step."""


@caption.command("work")
@_FILE
@_WORKER
@_METRICS_PORT
def caption_work(file: Path, worker: int, metrics_port: int) -> None:
    """Be one worker of the CaptionJob in FILE (input.uris resolved): BLIP-2 loaded once per GPU,
    then units claimed and captioned until none is left."""
    from functools import partial

    from commoncanvas.caption.worker import STAGE, CaptionStage

    spec = _load_one(file, "CaptionJob").spec
    _work(partial(CaptionStage, spec), STAGE, spec.parallelism, spec.gpus_per_pod, worker, metrics_port)


@caption.command("prepare")
@_FILE
@_TERMINATION_LOG
def caption_prepare(file: Path, termination_log: Path | None) -> None:
    """Plan the CaptionJob in FILE once (input.uris must be resolved) and print {"units": N}."""
    from commoncanvas.caption.unitplan import CaptionLayout, ensure_caption_plan, read_caption_units

    spec = _load_one(file, "CaptionJob").spec
    plan = ensure_caption_plan(spec, CaptionLayout.at(spec.output.uri), None)
    _report_units(len(read_caption_units(plan)), termination_log)


@caption.command("finalize")
@_FILE
def caption_finalize(file: Path) -> None:
    """Merge the finished units' indexes and print the job summary."""
    from commoncanvas.caption.unitplan import finalize

    _echo_json(finalize(_load_one(file, "CaptionJob").spec))


@main.group()
def latents() -> None:
    """The TrainRun's latents phase (optimizations.precomputeLatents), step by step."""


@latents.command("work")
@_FILE
@_WORKER
@_METRICS_PORT
def latents_work(file: Path, worker: int, metrics_port: int) -> None:
    """Be one worker of the TrainRun's latents phase in FILE (dataset.uris resolved): the encoders
    loaded once, then units claimed and encoded until none is left."""
    from functools import partial

    from commoncanvas.train.latents import STAGE, LatentsStage

    spec = _load_one(file, "TrainRun").spec
    # A pod's DataLoader processes (decode, resize) are the run's dataset.loaderWorkers.
    make = partial(LatentsStage, spec, None, None, spec.dataset.loader_workers)
    gpus = 1 if spec.distributed.gpus_per_node else 0
    _work(make, STAGE, spec.distributed.latents_workers, gpus, worker, metrics_port)


@latents.command("prepare")
@_FILE
@_TERMINATION_LOG
def latents_prepare(file: Path, termination_log: Path | None) -> None:
    """Plan the latents phase of the TrainRun in FILE once (dataset.uris resolved); print {"units": N}."""
    from commoncanvas.train.latents import ensure_plan, layout_of, read_units

    spec = _load_one(file, "TrainRun").spec
    _report_units(len(read_units(ensure_plan(spec, layout_of(spec), None))), termination_log)


@latents.command("finalize")
@_FILE
def latents_finalize(file: Path) -> None:
    """Merge the finished units' indexes and print the phase summary."""
    from commoncanvas.train.latents import finalize

    _echo_json(finalize(_load_one(file, "TrainRun").spec))


@main.group("eval")
def eval_stage() -> None:
    """The EvalRun stage (FID, KID, CLIP-FID, CLIP score), step by step."""


@eval_stage.command("prepare")
@_FILE
@_TERMINATION_LOG
def eval_prepare(file: Path, termination_log: Path | None) -> None:
    """Sample the prompts and plan the EvalRun in FILE once (references resolved); print {"units": N}."""
    from commoncanvas.eval.plan import ensure_plan, read_units, resolved
    from commoncanvas.units import StageLayout

    spec = resolved(_load_one(file, "EvalRun").spec, None)
    _report_units(len(read_units(ensure_plan(spec, StageLayout.at(spec.output.uri)))), termination_log)


@eval_stage.command("work")
@_FILE
@_WORKER
@_METRICS_PORT
def eval_work(file: Path, worker: int, metrics_port: int) -> None:
    """Be one worker of the EvalRun in FILE: the pipeline and extractors loaded once per GPU, then units
    claimed (images generated, features computed) until none is left."""
    from functools import partial

    from commoncanvas.eval.worker import STAGE, EvalStage

    spec = _load_one(file, "EvalRun").spec
    _work(partial(EvalStage, spec), STAGE, spec.parallelism, spec.gpus_per_pod, worker, metrics_port)


@eval_stage.command("finalize")
@_FILE
@_METRICS_PORT
def eval_finalize(file: Path, metrics_port: int) -> None:
    """FID, KID, CLIP-FID and CLIP score per guidance scale from the units' features; write results.json
    and the plot, export the numbers as gauges, print the results."""
    from commoncanvas import metrics
    from commoncanvas.eval.score import finalize

    run = _load_one(file, "EvalRun")
    metrics.serve(metrics_port)
    results = finalize(run.spec, None, run.metadata.name)
    metrics.record_evaluation(run.metadata.name, results["rows"])
    _echo_json(results)


@main.command()
@click.option(
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("manifests/crds"),
    show_default=True,
)
def crds(output: Path) -> None:
    """Write the CustomResourceDefinitions generated from the spec models."""
    from commoncanvas.crd import write_crds

    for path in write_crds(output):
        click.echo(str(path))


@main.group()
def models() -> None:
    """Model weights: tiny random-weight models for the demo and tests."""


@models.command("tiny")
@click.option(
    "--kind", type=click.Choice(["blip2", "sd2", "clip", "inception"]), required=True, help="Which tiny model"
)
@click.option("--output", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the random weights")
def models_tiny(kind: str, output: Path, seed: int) -> None:
    """Write a tiny random-weight BLIP-2 captioner, SD2 pipeline, CLIP (save_pretrained layout) or
    InceptionV3 stand-in (a TorchScript file); no download."""
    from commoncanvas.models import TINY_WRITERS

    click.echo(str(TINY_WRITERS[kind](output, seed=seed)))


if __name__ == "__main__":
    main()

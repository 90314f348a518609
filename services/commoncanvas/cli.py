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
    """Errors a person can act on print as one clear message instead of a traceback (-v keeps it)."""

    def invoke(self, ctx: click.Context) -> Any:
        from commoncanvas.caption.unitplan import InputMissing
        from commoncanvas.metadata import MetadataError
        from commoncanvas.runner import UnitsFailed
        from commoncanvas.storage import StorageError

        try:
            return super().invoke(ctx)
        except (
            SpecError,
            MetadataError,
            UnitsFailed,
            InputMissing,
            StorageError,
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
@click.option("--unit-size", default=1000, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--allow", multiple=True, help="License code to keep (repeatable); default: all allowing derivatives"
)
def scrape_plan(metadata: str, output: str, unit_size: int, allow: tuple[str, ...]) -> None:
    """Plan a scrape: prints one JSON object with counts per split and exclusions by reason."""
    from pydantic import ValidationError

    from commoncanvas.metadata import MetadataError
    from commoncanvas.scrape.plan import write_plan
    from commoncanvas.specs.common import format_validation_error
    from commoncanvas.specs.scrape import ScrapeJobSpec
    from commoncanvas.storage import open_storage

    body: dict[str, object] = {"source": {"uri": metadata}, "output": {"uri": output}, "unitSize": unit_size}
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


def _unit_index(unit: int | None) -> int:
    if unit is not None:
        return unit
    if "JOB_COMPLETION_INDEX" not in os.environ:
        raise click.ClickException("give --unit N or set JOB_COMPLETION_INDEX")
    return int(os.environ["JOB_COMPLETION_INDEX"])


_FILE = click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
_UNIT = click.option("--unit", type=int, default=None, help="Unit index (default: $JOB_COMPLETION_INDEX)")
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


@scrape.command("unit")
@_FILE
@_UNIT
@_METRICS_PORT
def scrape_unit(file: Path, unit: int | None, metrics_port: int) -> None:
    """Run one work unit of the ScrapeJob in FILE (what a pod of the Indexed Job runs)."""
    from commoncanvas import metrics
    from commoncanvas.scrape.worker import STAGE, run_unit

    metrics.serve(metrics_port, stage=STAGE)
    stats = run_unit(_load_one(file, "ScrapeJob").spec, _unit_index(unit))
    _echo_json({k: v for k, v in stats.items() if k != "failures"})


@scrape.command("prepare")
@_FILE
@_TERMINATION_LOG
def scrape_prepare(file: Path, termination_log: Path | None) -> None:
    """Plan the ScrapeJob in FILE once (kept under its output) and print {"units": N}."""
    from commoncanvas.scrape.worker import ensure_plan, layout_of

    spec = _load_one(file, "ScrapeJob").spec
    _report_units(int(ensure_plan(spec, layout_of(spec))["units"]), termination_log)


@scrape.command("finalize")
@_FILE
def scrape_finalize(file: Path) -> None:
    """Merge the finished units' indexes and print the job summary."""
    from commoncanvas.scrape.worker import finalize

    _echo_json(finalize(_load_one(file, "ScrapeJob").spec))


@main.group()
def caption() -> None:
    """The CaptionJob stage, step by step."""


@caption.command("unit")
@_FILE
@_UNIT
@_METRICS_PORT
def caption_unit(file: Path, unit: int | None, metrics_port: int) -> None:
    """Caption one work unit of the CaptionJob in FILE (input.uris must be resolved)."""
    from commoncanvas import metrics
    from commoncanvas.caption.worker import STAGE, run_unit

    metrics.serve(metrics_port, stage=STAGE)
    stats = run_unit(_load_one(file, "CaptionJob").spec, _unit_index(unit))
    _echo_json({k: v for k, v in stats.items() if k != "failures"})


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


@latents.command("unit")
@_FILE
@_UNIT
@_METRICS_PORT
def latents_unit(file: Path, unit: int | None, metrics_port: int) -> None:
    """Encode one work unit of the TrainRun in FILE to VAE and text latents (dataset.uris resolved)."""
    from commoncanvas import metrics
    from commoncanvas.train.latents import STAGE, run_unit

    metrics.serve(metrics_port, stage=STAGE)
    spec = _load_one(file, "TrainRun").spec
    # A pod runs one unit: its DataLoader processes (decode, resize) are the run's dataset.loaderWorkers.
    stats = run_unit(spec, _unit_index(unit), loader_workers=spec.dataset.loader_workers)
    _echo_json({k: v for k, v in stats.items() if k != "failures"})


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
@click.option("--kind", type=click.Choice(["blip2", "sd2"]), required=True, help="Which tiny model")
@click.option("--output", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the random weights")
def models_tiny(kind: str, output: Path, seed: int) -> None:
    """Write a tiny random-weight BLIP-2 captioner or SD2 pipeline (save_pretrained layout, no download)."""
    from commoncanvas.models import TINY_WRITERS

    click.echo(str(TINY_WRITERS[kind](output, seed=seed)))


if __name__ == "__main__":
    main()

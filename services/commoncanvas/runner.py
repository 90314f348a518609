"""The embedded default: run custom resources from a YAML file on this machine, no cluster needed."""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from commoncanvas import units
from commoncanvas.scrape import worker as scrape_worker
from commoncanvas.specs import KINDS, ScrapeJob, load_resources

console = Console(stderr=True)


class UnitsFailed(RuntimeError):
    """Some units raised; the others finished and kept their markers, so a rerun does only these."""


def local_processes(parallelism: int) -> int:
    return max(1, min(parallelism, os.cpu_count() or 1))


def worker_context() -> multiprocessing.context.BaseContext:
    """Fork workers from a clean server that imported the stage workers once (torch and friends take
    seconds to import): no inherited boto3 clients or event loops, and no import cost per run."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["commoncanvas.scrape.worker"])
    return context


def run_scrape(job: ScrapeJob, show_progress: bool = True) -> dict[str, Any]:
    spec = job.spec
    layout = scrape_worker.ScrapeLayout.of(spec)
    plan = scrape_worker.ensure_plan(spec, layout)
    done = units.done_units(layout.output)
    todo = [u for u in range(plan["units"]) if u not in done]
    errors: dict[int, str] = {}
    columns = (
        TextColumn(f"[bold]{job.metadata.name}[/] scrape"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("units  {task.fields[images]} images"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, disable=not show_progress) as progress:
        task = progress.add_task("units", total=plan["units"], completed=len(done), images=0)
        with ProcessPoolExecutor(local_processes(spec.parallelism), mp_context=worker_context()) as pool:
            pending: dict[Future[dict[str, Any]], int] = {
                pool.submit(scrape_worker.run_unit, spec, u): u for u in todo
            }
            images = 0
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    unit = pending.pop(future)
                    try:
                        images += future.result()["written"]
                    except Exception as exc:
                        errors[unit] = f"{type(exc).__name__}: {exc}"
                    progress.update(task, advance=1, images=images)
    if errors:
        listing = "\n".join(f"  unit {u}: {e}" for u, e in sorted(errors.items()))
        raise UnitsFailed(
            f"{len(errors)} of {plan['units']} units failed (rerun to retry only those):\n{listing}"
        )
    return scrape_worker.finalize(spec)


RUNNERS = {"ScrapeJob": run_scrape}


def run_file(path: str | Path, show_progress: bool = True) -> list[dict[str, Any]]:
    """Validate every resource in the file first, then run them in order."""
    resources = load_resources(path, KINDS)
    return [{"kind": r.kind, "name": r.metadata.name, **RUNNERS[r.kind](r, show_progress)} for r in resources]

"""The embedded default: run custom resources from a YAML file on this machine, no cluster needed.

Every stage runs the same way: plan its units once, run the unfinished ones in a process pool (the
same function a pod of the Indexed Job runs), then merge.  Units that fail keep nothing; the others
keep their markers, so a rerun does only what is left.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from commoncanvas import units
from commoncanvas.specs import KINDS, CaptionJob, ScrapeJob, TrainRun, load_resources

console = Console(stderr=True)
# Light modules only: a model stage's workers import torch themselves, once per worker process.
WORKER_MODULES = ["commoncanvas.scrape.worker"]


class UnitsFailed(RuntimeError):
    """Some units raised; the others finished and kept their markers, so a rerun does only these."""


def local_processes(parallelism: int) -> int:
    return max(1, min(parallelism, os.cpu_count() or 1))


def worker_context() -> multiprocessing.context.BaseContext:
    """Fork workers from a clean server that imported the scrape worker once: no inherited boto3
    clients or event loops, and no import cost per unit."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(WORKER_MODULES)
    return context


def run_units(
    label: str,
    total: int,
    done: set[int],
    run_unit: Callable[[int], dict[str, Any]],
    processes: int,
    show_progress: bool,
) -> None:
    todo = [u for u in range(total) if u not in done]
    errors: dict[int, str] = {}
    columns = (
        TextColumn(f"[bold]{label}[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("units  {task.fields[samples]} samples"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, disable=not show_progress) as progress:
        task = progress.add_task("units", total=total, completed=len(done), samples=0)
        with ProcessPoolExecutor(processes, mp_context=worker_context()) as pool:
            pending: dict[Future[dict[str, Any]], int] = {pool.submit(run_unit, u): u for u in todo}
            written = 0
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    unit = pending.pop(future)
                    try:
                        written += future.result()["written"]
                    except Exception as exc:
                        errors[unit] = f"{type(exc).__name__}: {exc}"
                    progress.update(task, advance=1, samples=written)
    if errors:
        listing = "\n".join(f"  unit {u}: {e}" for u, e in sorted(errors.items()))
        raise UnitsFailed(
            f"{label}: {len(errors)} of {total} units failed (rerun to retry only those):\n{listing}"
        )


@dataclass(frozen=True)
class References:
    """Outputs of earlier resources of one kind, by name; picklable so worker processes get it too."""

    kind: str
    referrer: str
    outputs: dict[str, str]

    def __call__(self, name: str) -> str:
        if name not in self.outputs:
            raise LookupError(
                f"{self.referrer} references {self.kind} {name!r}, which is not in this file or has not "
                f"run; put the {self.kind} before it in the same file, or give input.uris"
            )
        return self.outputs[name]


@dataclass
class LocalRun:
    """Resources of one file, run in order; later ones may reference earlier ones by name."""

    show_progress: bool = True
    outputs: dict[tuple[str, str], str] = field(default_factory=dict)

    def references(self, kind: str, referrer: str) -> References:
        return References(kind, referrer, {name: uri for (k, name), uri in self.outputs.items() if k == kind})

    def scrape(self, job: ScrapeJob) -> dict[str, Any]:
        from commoncanvas.scrape import worker

        layout = worker.layout_of(job.spec)
        plan = worker.ensure_plan(job.spec, layout)
        run_units(
            f"{job.metadata.name} scrape",
            plan["units"],
            units.done_units(layout.output),
            partial(worker.run_unit, job.spec),
            local_processes(job.spec.parallelism),
            self.show_progress,
        )
        self.outputs[("ScrapeJob", job.metadata.name)] = job.spec.output.uri
        return worker.finalize(job.spec)

    def caption(self, job: CaptionJob) -> dict[str, Any]:
        from commoncanvas.caption import unitplan, worker

        resolve = self.references("ScrapeJob", f"CaptionJob {job.metadata.name!r}")
        layout = unitplan.CaptionLayout.at(job.spec.output.uri)
        plan = unitplan.ensure_caption_plan(job.spec, layout, resolve)
        total = len(unitplan.read_caption_units(plan))
        run_units(
            f"{job.metadata.name} caption",
            total,
            units.done_units(layout.output),
            partial(worker.run_unit, job.spec, resolve_ref=resolve),
            local_processes(job.spec.parallelism),
            self.show_progress,
        )
        self.outputs[("CaptionJob", job.metadata.name)] = job.spec.output.uri
        return unitplan.finalize(job.spec, resolve)

    def train(self, run: TrainRun) -> dict[str, Any]:
        """Optional latents phase, then torchrun through TorchX's local scheduler (the same AppDef the
        operator materialises on a cluster), over a job file with the CaptionJob reference resolved."""
        import tempfile

        import yaml

        from commoncanvas.train import latents, launch

        resolve = self.references("CaptionJob", f"TrainRun {run.metadata.name!r}")
        spec = run.spec
        if spec.dataset.caption_job_ref:
            uris = [resolve(spec.dataset.caption_job_ref)]
            spec = spec.model_copy(
                update={"dataset": spec.dataset.model_copy(update={"caption_job_ref": None, "uris": uris})}
            )
            run = run.model_copy(update={"spec": spec})
        if spec.optimizations.precompute_latents:
            latents.run_latents(spec, run.metadata.name, None, local_processes(2), self.show_progress)
        workdir = Path(tempfile.mkdtemp(prefix=f"commoncanvas-train-{run.metadata.name}-"))
        job_file = workdir / "trainrun.yaml"
        job_file.write_text(yaml.safe_dump(run.model_dump(mode="json", by_alias=True, exclude_none=True)))
        console.print(f"[bold]{run.metadata.name}[/] train: torchrun via TorchX, logs in {workdir}")
        result = launch.run_local(run, job_file, log_dir=workdir / "logs")
        if not result["succeeded"]:
            raise UnitsFailed(
                f"TrainRun {run.metadata.name!r} failed ({result['state']}); logs in "
                f"{result['log_dir']}:\n{result.get('error', '')}"
            )
        from commoncanvas.storage import open_storage

        status = json.loads(open_storage(spec.output.uri).read_text("status.json"))
        return {"status": status, "logDir": str(result["log_dir"]), "outputs": status.get("outputs", {})}

    def run(self, resource: Any) -> dict[str, Any]:
        runners: dict[str, Callable[[Any], dict[str, Any]]] = {
            "ScrapeJob": self.scrape,
            "CaptionJob": self.caption,
            "TrainRun": self.train,
        }
        return {"kind": resource.kind, "name": resource.metadata.name, **runners[resource.kind](resource)}


def run_scrape(job: ScrapeJob, show_progress: bool = True) -> dict[str, Any]:
    return LocalRun(show_progress).scrape(job)


def run_file(path: str | Path, show_progress: bool = True) -> list[dict[str, Any]]:
    """Validate every resource in the file first, then run them in order."""
    resources = load_resources(path, KINDS)
    local = LocalRun(show_progress)
    return [local.run(resource) for resource in resources]

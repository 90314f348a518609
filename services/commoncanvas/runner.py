"""The embedded default: run custom resources from a YAML file on this machine, no cluster needed.

Every stage runs the same way: plan its units once, run `parallelism` worker processes that claim
and run units (the same loop a pod of the stage's Indexed Job runs, `workqueue`), then merge. Units
that fail keep nothing; the others keep their markers, so a rerun does only what is left.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from rich.console import Console

from commoncanvas.pool import UnitsFailed as UnitsFailed  # where the CLI and tests import it
from commoncanvas.pool import local_processes, run_workers
from commoncanvas.specs import KINDS, CaptionJob, ScrapeJob, TrainRun, load_resources

console = Console(stderr=True)


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
        run_workers(
            f"{job.metadata.name} scrape",
            layout.output,
            plan["units"],
            partial(worker.ScrapeStage, job.spec),
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
        run_workers(
            f"{job.metadata.name} caption",
            layout.output,
            len(unitplan.read_caption_units(plan)),
            partial(worker.CaptionStage, job.spec, resolve),
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

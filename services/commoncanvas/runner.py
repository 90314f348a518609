"""The embedded default: run custom resources from a YAML file on this machine, no cluster needed.

Every stage runs the same way: plan its units once, run `parallelism` worker processes that claim
and run units (the same loop a pod of the stage's Indexed Job runs, `workqueue`), then merge. Units
that fail keep nothing; the others keep their markers, so a rerun does only what is left.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

from rich.console import Console

from commoncanvas.pool import UnitsFailed as UnitsFailed  # where the CLI and tests import it
from commoncanvas.pool import local_processes, run_workers
from commoncanvas.specs import KINDS, CaptionJob, EvalRun, ScrapeJob, TrainRun, load_resources
from commoncanvas.specs.common import SpecError

console = Console(stderr=True)


# Per referenced kind: the field that names it by reference, and the field that gives URIs instead.
REFERENCE_FIELDS = {
    "ScrapeJob": ("spec.input.scrapeJobRef", "spec.input.uris"),
    "CaptionJob": ("spec.dataset.captionJobRef", "spec.dataset.uris"),
    "TrainRun": ("spec.model.trainRunRef", "spec.model.pipelineUri"),
}
# An EvalRun names a CaptionJob in another field than a TrainRun does.
EVAL_CAPTION_FIELDS = ("spec.prompts.captionJobRef", "spec.prompts.uri")


@dataclass(frozen=True)
class References:
    """Outputs of earlier resources of one kind, by name; picklable so worker processes get it too.
    The one place a reference is checked: before anything runs (`LocalRun.check`) and when resolved."""

    kind: str
    referrer: str
    outputs: dict[str, str]
    later: frozenset[str] = frozenset()  # names of that kind further down the file, for the message
    fields: tuple[str, str] | None = None  # (reference field, URIs field) where not REFERENCE_FIELDS'

    def check(self, name: str) -> None:
        if name in self.outputs:
            return
        ref_field, uris_field = self.fields or REFERENCE_FIELDS.get(self.kind, ("the reference", "URIs"))
        if name in self.later:
            problem = f"which comes after it in this file; move that {self.kind} before it"
        else:
            problem = (
                f"which is not before it in this file; put that {self.kind} before it, "
                f"or give {uris_field} instead"
            )
        raise LookupError(f"{self.referrer}: {ref_field} references {self.kind} {name!r}, {problem}")

    def __call__(self, name: str) -> str:
        self.check(name)
        return self.outputs[name]


def _normalized(uri: str) -> str:
    from commoncanvas.storage import open_storage

    return open_storage(uri).uri.rstrip("/")


def _under(uri: str, roots: list[str]) -> bool:
    """Whether `uri` is one of `roots` or under one (an earlier resource's output, not written yet)."""
    target = _normalized(uri)
    return any(target == root or target.startswith(f"{root}/") for root in map(_normalized, roots))


def missing_split_index(root: str, splits: Sequence[str], local_only: bool) -> str | None:
    """The first `{root}/{split}/index.json` that does not exist (a dataset not there, or unfinished);
    with `local_only`, s3:// roots are not looked at (they are checked when their stage starts)."""
    from commoncanvas.storage import open_storage

    for split in splits:
        storage = open_storage(f"{root.rstrip('/')}/{split}")
        if local_only and storage.local_path("index.json") is None:
            return None
        if not storage.exists("index.json"):
            return storage.url("index.json")
    return None


def check_dataset(
    referrer: str,
    roots: list[tuple[str, str]],
    splits: Sequence[str],
    local_only: bool,
    upstream: str = "CaptionJob",
) -> None:
    """Fail before a stage starts when an input root (URI, where it came from) lacks a split's
    index.json: InputMissing naming the field and the path. `upstream` is the kind that writes it."""
    from commoncanvas.licenses import evaluation_root_problem
    from commoncanvas.shardplan import InputMissing

    for root, origin in roots:
        if evaluation_root_problem(root):
            raise SpecError(f"{referrer}: {origin}: {evaluation_root_problem(root)}")
        missing = missing_split_index(root, splits, local_only)
        if missing:
            raise InputMissing(
                f"{referrer}: {origin} is not a finished {upstream}'s output: {missing} does not exist; "
                f"give the output of a finished {upstream} (it holds {{split}}/index.json for every split "
                "the resource reads)"
            )


@dataclass
class LocalRun:
    """Resources of one file, run in order; later ones may reference earlier ones by name."""

    show_progress: bool = True
    outputs: dict[tuple[str, str], str] = field(default_factory=dict)

    def references(self, kind: str, referrer: str) -> References:
        return References(kind, referrer, {name: uri for (k, name), uri in self.outputs.items() if k == kind})

    @staticmethod
    def check(resources: list[Any], source: str | Path) -> None:
        """Everything that can be known before the first resource runs, for every resource of the file:
        each reference names a resource of the right kind earlier in the file, each storage URI parses,
        and each local input read by path is there (or is an earlier resource's output). Raises
        SpecError naming the file, the resource and the field (LookupError for a reference)."""
        from commoncanvas.shardplan import InputMissing
        from commoncanvas.storage import InvalidURI, check_uri, open_storage

        if not resources:
            raise SpecError(
                f"{source} holds no resources; give a file with a ScrapeJob, CaptionJob, TrainRun or EvalRun"
            )
        outputs: dict[tuple[str, str], str] = {}
        for index, resource in enumerate(resources):
            kind, name, spec = resource.kind, resource.metadata.name, resource.spec
            referrer = f"{source}: {kind} {name!r}"

            def fail(message: str, referrer: str = referrer) -> NoReturn:
                raise SpecError(f"{referrer}: {message}")

            uris: list[tuple[str, str]] = [("spec.output.uri", spec.output.uri)]
            later = resources[index + 1 :]
            if isinstance(resource, ScrapeJob):
                uris.append(("spec.source.uri", spec.source.uri))
            elif isinstance(resource, CaptionJob):
                uris += [(f"spec.input.uris.{n}", uri) for n, uri in enumerate(spec.input.uris)]
                uris.append(("spec.model.source", spec.model.source))
                ref = spec.input.scrape_job_ref
                if ref:
                    _references("ScrapeJob", referrer, outputs, later).check(ref)
            elif isinstance(resource, TrainRun):
                uris += [(f"spec.dataset.uris.{n}", uri) for n, uri in enumerate(spec.dataset.uris)]
                uris.append(("spec.checkpoint.uri", spec.checkpoint.uri))
                model = spec.model
                uris += [
                    (f"spec.model.{field_name}", value)
                    for field_name, value in (
                        ("unet", model.unet),
                        ("vae", model.vae),
                        ("textEncoder", model.text_encoder),
                    )
                    if value
                ]
                ref = spec.dataset.caption_job_ref
                if ref:
                    _references("CaptionJob", referrer, outputs, later).check(ref)
            elif isinstance(resource, EvalRun):
                uris += [
                    (f"spec.{field_name}", value)
                    for field_name, value in (
                        ("model.pipelineUri", spec.model.pipeline_uri),
                        ("prompts.uri", spec.prompts.uri),
                        ("references.uri", spec.references.uri),
                        ("extractors.inception", spec.extractors.inception),
                    )
                    if value
                ]
                if spec.model.train_run_ref:
                    _references("TrainRun", referrer, outputs, later).check(spec.model.train_run_ref)
                if spec.prompts.caption_job_ref:
                    refs = _references("CaptionJob", referrer, outputs, later, EVAL_CAPTION_FIELDS)
                    refs.check(spec.prompts.caption_job_ref)
            for field_name, uri in uris:
                # Model sources may be hub ids; only the s3:// ones are storage URIs.
                if field_name.startswith("spec.model.") and not uri.startswith("s3://"):
                    continue
                try:
                    check_uri(uri)
                except InvalidURI as exc:
                    fail(f"{field_name}: {exc}")
            # Inputs given by local path must be there already, unless an earlier resource writes them.
            produced = list(outputs.values())
            if isinstance(resource, ScrapeJob):
                metadata = open_storage(spec.source.uri)
                path = metadata.local_path("")
                if path is not None and not path.is_file():
                    fail(f"spec.source.uri: {path} does not exist or is not a file; give the metadata file")
            elif isinstance(resource, CaptionJob | TrainRun):
                if isinstance(resource, CaptionJob):
                    field_name, given, splits, upstream = (
                        "spec.input.uris",
                        spec.input.uris,
                        spec.input.splits,
                        "ScrapeJob",
                    )
                else:
                    field_name, given, upstream = "spec.dataset.uris", spec.dataset.uris, "CaptionJob"
                    splits = [mix.split for mix in spec.dataset.mix]
                roots = [
                    (uri, f"{field_name}.{n} {uri!r}")
                    for n, uri in enumerate(given)
                    if not _under(uri, produced)
                ]
                try:
                    check_dataset(referrer, roots, splits, True, upstream)
                except InputMissing as exc:
                    raise SpecError(str(exc)) from None
            outputs[(kind, name)] = spec.output.uri

    def scrape(self, job: ScrapeJob) -> dict[str, Any]:
        from commoncanvas.scrape import worker

        layout = worker.layout_of(job.spec)
        total = worker.prepare(job.spec)
        run_workers(
            f"{job.metadata.name} scrape",
            layout.output,
            total,
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
        origins = [f"spec.dataset.uris.{n} {uri!r}" for n, uri in enumerate(spec.dataset.uris)]
        if spec.dataset.caption_job_ref:
            uris = [resolve(spec.dataset.caption_job_ref)]
            ref = spec.dataset.caption_job_ref
            origins = [f"the output {uris[0]!r} of spec.dataset.captionJobRef {ref!r}"]
            spec = spec.model_copy(
                update={"dataset": spec.dataset.model_copy(update={"caption_job_ref": None, "uris": uris})}
            )
            run = run.model_copy(update={"spec": spec})
        roots = list(zip(spec.dataset.uris, origins, strict=True))
        check_dataset(f"TrainRun {run.metadata.name!r}", roots, [m.split for m in spec.dataset.mix], False)
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
        self.outputs[("TrainRun", run.metadata.name)] = spec.output.uri
        return {"status": status, "logDir": str(result["log_dir"]), "outputs": status.get("outputs", {})}

    def evaluate(self, run: EvalRun) -> dict[str, Any]:
        """Plan (prompts sampled once), workers generating and extracting features, then the metrics."""
        from commoncanvas.eval import plan, score, worker
        from commoncanvas.units import StageLayout

        referrer = f"EvalRun {run.metadata.name!r}"
        by_kind = {
            "TrainRun": self.references("TrainRun", referrer),
            "CaptionJob": replace(self.references("CaptionJob", referrer), fields=EVAL_CAPTION_FIELDS),
        }
        # Resolved here, once: the workers get URIs (and a picklable spec).
        spec = plan.resolved(run.spec, lambda kind, name: by_kind[kind](name))
        layout = StageLayout.at(spec.output.uri)
        total = len(plan.read_units(plan.ensure_plan(spec, layout)))
        run_workers(
            f"{run.metadata.name} eval",
            layout.output,
            total,
            partial(worker.EvalStage, spec),
            local_processes(spec.parallelism),
            self.show_progress,
        )
        self.outputs[("EvalRun", run.metadata.name)] = spec.output.uri
        return score.finalize(spec, None, run.metadata.name)

    def run(self, resource: Any) -> dict[str, Any]:
        runners: dict[str, Callable[[Any], dict[str, Any]]] = {
            "ScrapeJob": self.scrape,
            "CaptionJob": self.caption,
            "TrainRun": self.train,
            "EvalRun": self.evaluate,
        }
        return {"kind": resource.kind, "name": resource.metadata.name, **runners[resource.kind](resource)}


def run_scrape(job: ScrapeJob, show_progress: bool = True) -> dict[str, Any]:
    return LocalRun(show_progress).scrape(job)


def run_file(path: str | Path, show_progress: bool = True) -> list[dict[str, Any]]:
    """Validate every resource in the file first, then run them in order."""
    resources = load_resources(path, KINDS)
    LocalRun.check(resources, path)
    local = LocalRun(show_progress)
    return [local.run(resource) for resource in resources]


def _references(
    kind: str,
    referrer: str,
    outputs: dict[tuple[str, str], str],
    later: list[Any],
    fields: tuple[str, str] | None = None,
) -> References:
    earlier = {name: uri for (k, name), uri in outputs.items() if k == kind}
    names = frozenset(r.metadata.name for r in later if r.kind == kind)
    return References(kind, referrer, earlier, names, fields)

"""kopf handlers: glue between the API server and the pure builders and reducers.

A stage's life, every ``reconcileSeconds`` (a kopf timer, so an operator restarted at any moment picks
up where the cluster is): observe (upstream, children, plan pod, store) -> ``next_steps`` -> apply those
children with server-side apply -> ``reduce_stage`` -> status patch and Events on transitions. A
TrainRun's is the same with ``train_steps`` and ``reduce_train``; its latents phase is observed
(``observe_sharded``) and built (``sharded_job``) as a stage's Jobs are.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from datetime import UTC, datetime
from typing import Any

import kopf
from prometheus_client import start_http_server

from commoncanvas.specs.common import GROUP, PLURALS, VERSION, Phase
from commoncanvas.storage import StorageError
from commoncanvas_operator import builders, metrics, reducers, store
from commoncanvas_operator.builders import STAGES
from commoncanvas_operator.kube import Kube, KubeError, collection_path
from commoncanvas_operator.settings import Settings

Obj = dict[str, Any]
Logger = logging.Logger | logging.LoggerAdapter[Any]
PHASES = tuple(phase.value for phase in Phase)
SETTINGS = Settings.load()
_connection: list[kopf.ConnectionInfo] = []
_clients: dict[int, Kube] = {}


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Our status is our own schema: keep kopf's bookkeeping in annotations, where nothing prunes it.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    settings.posting.level = logging.WARNING
    settings.peering.lifetime = SETTINGS.peering_lifetime_seconds
    # No wait on the API server is unbounded: kopf's own requests and watches time out and reconnect.
    settings.networking.request_timeout = 30
    settings.networking.connect_timeout = 10
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 10
    if SETTINGS.operator_metrics_port:
        start_http_server(SETTINGS.operator_metrics_port)


_login_settings: list[kopf.OperatorSettings] = []


def credentials(settings: kopf.OperatorSettings) -> kopf.ConnectionInfo | None:
    """The ServiceAccount's token in a pod, else the kubeconfig's: read from disk each time."""
    info = kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(settings=settings)
    if info is not None:
        _connection[:] = [info]
        _login_settings[:] = [settings]
    return info


@kopf.on.login()
def login(settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo | None:
    return credentials(settings)


def relogin() -> kopf.ConnectionInfo | None:
    """The credentials as they are now: a projected ServiceAccount token is rotated on disk by the
    kubelet (and a kubeconfig may be rewritten), so they are read again."""
    if not _login_settings:
        return None
    return credentials(_login_settings[0])


@kopf.on.cleanup()
async def close_clients(**_: Any) -> None:
    for client in _clients.values():
        await client.close()
    _clients.clear()


def kube() -> Kube:
    """One client per event loop (kopf runs one), made once kopf has logged in."""
    loop = id(asyncio.get_running_loop())
    if loop not in _clients:
        if not _connection:
            raise kopf.TemporaryError("not logged in to the API server yet", delay=1)
        _clients[loop] = Kube(_connection[0], relogin)
    return _clients[loop]


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def read_upstream(kind: str, spec: Obj, namespace: str) -> reducers.Upstream | None:
    ref = builders.upstream_ref(kind, spec)
    if ref is None:
        return None
    upstream_kind, name = ref
    path = f"{collection_path(f'{GROUP}/{VERSION}', upstream_kind, namespace)}/{name}"
    body = await kube().get(path)
    if body is None:
        return reducers.Upstream(upstream_kind, name, found=False)
    status = body.get("status") or {}
    failed: Obj = next((c for c in status.get("conditions") or [] if c.get("type") == "Failed"), {})
    return reducers.Upstream(
        upstream_kind,
        name,
        phase=status.get("phase") or "",
        message=failed.get("message", ""),
        output_uri=((body.get("spec") or {}).get("output") or {}).get("uri"),
    )


# Child Jobs as kopf's watch last saw them, keyed (namespace, name): a running resource's pass reads
# its Jobs here instead of a GET each (3 per stage per pass). kopf fills every index before any
# handler runs, so a restarted operator never mistakes a Job it has not seen yet for a missing one.
JOB_INDEX: contextvars.ContextVar[kopf.Index[tuple[str | None, str], Obj] | None] = contextvars.ContextVar(
    "JOB_INDEX", default=None
)


@kopf.index("batch", "v1", "jobs", labels={"app.kubernetes.io/managed-by": builders.MANAGER})
def child_jobs(
    namespace: str | None, name: str, body: kopf.Body, **_: Any
) -> dict[tuple[str | None, str], Obj]:
    # The status and no pod template (~10 kB): ~3 kB of memory a Job. Conditions only as JobView reads
    # them (the true ones, without their timestamps).
    status = dict(body.get("status") or {})
    status["conditions"] = [
        {key: c.get(key, "") for key in ("type", "status", "reason", "message")}
        for c in status.get("conditions") or []
        if c.get("status") == "True"
    ]
    return {
        (namespace, name): {
            "metadata": {"name": name, "uid": body["metadata"].get("uid", "")},
            "spec": {"suspend": (body.get("spec") or {}).get("suspend")},
            "status": status,
        }
    }


async def read_job(namespace: str, name: str) -> Obj | None:
    """A child Job from the index in a reconcile pass (no request), else from the API server."""
    index = JOB_INDEX.get()
    if index is None:
        return await kube().get(f"{collection_path('batch/v1', 'Job', namespace)}/{name}")
    return next(iter(index.get((namespace, name), ())), None)


# A finished plan Job's (message, unit count), by its uid: neither changes once it has finished, so
# each plan's pods (and, where the kubelet keeps no message, its plan in the store) are read once per
# operator life, not once per pass.
_FINISHED_PLANS: dict[str, tuple[str, int | None]] = {}
_FINISHED_PLANS_KEPT = 10_000  # plans remembered (~100 B each); the oldest is forgotten first


async def finished_plan(work: builders.ShardedWork, namespace: str, plan: Obj) -> tuple[str, int | None]:
    """A finished plan Job's pod message and, where it completed, the unit count it planned."""
    uid = str(plan["metadata"].get("uid") or "")
    if uid in _FINISHED_PLANS:
        return _FINISHED_PLANS[uid]
    message = await plan_pod_message(namespace, plan["metadata"]["name"])
    view = reducers.JobView.of(plan)
    complete = view is not None and view.complete
    units = reducers.parse_unit_count(message) if complete else None
    if complete and units is None:
        # A kubelet that does not keep the termination message: the plan itself is in the store.
        units = await asyncio.to_thread(store.planned_units, work.kind, work.output_uri)
    if uid and (units is not None or not complete):
        if len(_FINISHED_PLANS) >= _FINISHED_PLANS_KEPT:
            del _FINISHED_PLANS[next(iter(_FINISHED_PLANS))]
        _FINISHED_PLANS[uid] = (message, units)
    return message, units


async def plan_pod_message(namespace: str, job_name: str) -> str:
    """The termination message of a plan Job's last finished pod (the unit count, or why it failed)."""
    pods = await kube().list(
        collection_path("v1", "Pod", namespace), f"batch.kubernetes.io/job-name={job_name}"
    )
    finished = [p for p in pods if (p.get("status") or {}).get("phase") in ("Succeeded", "Failed")]
    finished.sort(key=lambda p: (p["status"].get("phase") == "Succeeded", p["metadata"]["creationTimestamp"]))
    for pod in reversed(finished):
        for container in pod["status"].get("containerStatuses") or []:
            message = ((container.get("state") or {}).get("terminated") or {}).get("message")
            if message:
                return str(message)
    return ""


async def observe_sharded(work: builders.ShardedWork, namespace: str) -> reducers.ShardedView:
    """Sharded work's three Jobs, its plan's unit count and its workers' progress (O(workers) reads)."""
    jobs = {step: await read_job(namespace, work.job_name(step)) for step in builders.STEPS}
    views = {step: reducers.JobView.of(job) for step, job in jobs.items()}
    plan_units: int | None = None
    plan_message = ""
    plan = views["plan"]
    if plan is not None and (plan.complete or plan.failed):
        plan_message, plan_units = await finished_plan(work, namespace, jobs["plan"] or {})
    units = views["units"]
    progress = None
    if units is not None and not view_done(views):
        progress = await asyncio.to_thread(store.worker_progress, work.output_uri)
    return reducers.ShardedView(
        plan=plan,
        plan_units=plan_units,
        plan_message=plan_message,
        units=units,
        finalize=views["finalize"],
        progress=progress,
    )


def view_done(views: dict[str, reducers.JobView | None]) -> bool:
    final = views["finalize"]
    return final is not None and final.complete


def sharded_job(work: builders.ShardedWork, step: str, view: reducers.ShardedView) -> Obj:
    return builders.build_sharded_job(work, step, SETTINGS, units=view.plan_units or 1)


async def read_job_file(namespace: str, name: str) -> Obj | None:
    return await kube().get(
        f"{collection_path('v1', 'ConfigMap', namespace)}/{builders.child_name(name, 'job')}"
    )


async def apply_children(owner: kopf.Body, children: list[Obj]) -> list[str]:
    """Server-side apply of each child, except: a queued Job is only created (Kueue owns it then), and
    a Job that differs from the live one in immutable fields (an upgrade changed the worker image or
    ``workers.*``) is kept as it runs. Returns what drifted that way, one line per Job."""
    kopf.adopt(children, owner=owner)
    drifted: list[str] = []
    for child in children:
        if builders.is_queued(child):
            await kube().create(child)
            continue
        try:
            await kube().apply(child)
        except KubeError as error:
            fields = error.immutable_fields()
            if child["kind"] != "Job" or not fields:
                raise
            drifted.append(
                f"Job {child['metadata']['name']} kept as it runs (immutable: {', '.join(fields)})"
            )
    return drifted


def with_drift(status: Obj, drifted: list[str], previous: Obj, now: str) -> Obj:
    """The ``TemplateDrift`` condition: True naming the Jobs kept with an older template, until none is."""
    before = {c["type"]: c for c in previous.get("conditions") or []}
    if not drifted and "TemplateDrift" not in before:
        return status
    condition = reducers.drift_condition(drifted)
    status["conditions"] = [
        *(c for c in status["conditions"] if c["type"] != "TemplateDrift"),
        *reducers.merge_conditions(
            [before["TemplateDrift"]] if "TemplateDrift" in before else [],
            [condition],
            now,
            int(status.get("observedGeneration") or 0),
        ),
    ]
    return status


async def observe_stage(body: Obj) -> tuple[reducers.Observed, builders.ShardedWork]:
    meta, spec = body["metadata"], body["spec"]
    namespace = meta["namespace"]
    job_file = await read_job_file(namespace, meta["name"])
    # The output the running Jobs write to, even where the spec names another (a refused change).
    work = builders.stage_work(body, SETTINGS, builders.applied_output_uri(job_file))
    invalid = ""
    try:
        SETTINGS.pool(work.pool)
    except KeyError as error:
        invalid = f"spec.nodePool: {error.args[0]}"
    view = await observe_sharded(work, namespace)
    summary = await asyncio.to_thread(store.read_summary, work.output_uri) if view.done else None
    observed = reducers.Observed(
        generation=int(meta.get("generation") or 0),
        now=now(),
        previous=dict(body.get("status") or {}),
        upstream=await read_upstream(body["kind"], spec, namespace),
        invalid=invalid,
        refused_change=reducers.refused_change(job_file, spec),
        suspended=bool(spec.get("suspend")),
        work=view,
        summary=summary,
    )
    return observed, work


async def apply_steps(
    owner: kopf.Body, body: Obj, observed: reducers.Observed, work: builders.ShardedWork
) -> list[str]:
    upstream_uri = observed.upstream.output_uri if observed.upstream else None
    children = [
        builders.build_job_file(builders.resolve_resource(body, upstream_uri), body["spec"])
        if step == "job"
        else sharded_job(work, step, observed.work)
        for step in reducers.next_steps(observed)
    ]
    return await apply_children(owner, children)


async def reconcile_stage(body: kopf.Body, patch: kopf.Patch, logger: Logger) -> None:
    raw: Obj = dict(body)
    kind = raw["kind"]
    with metrics.reconcile_pass(kind):
        observed, work = await observe_stage(raw)
        drifted = await apply_steps(body, raw, observed, work)
        status = reducers.reduce_stage(kind, work.output_uri, observed)
        status = with_drift(status, drifted, observed.previous, observed.now)
    report(body, patch, logger, observed.previous, status)


def report(body: kopf.Body, patch: kopf.Patch, logger: Logger, previous: Obj, status: Obj) -> None:
    """Events on transitions, the resource's metrics, and the status patch where it changed."""
    kind, meta = body["kind"], body["metadata"]
    for event_type, reason, message in reducers.transition_events(previous, status):
        kopf.event(body, type=event_type, reason=reason, message=message)
        logger.info("%s %s: %s", reason, meta["name"], message)
    metrics.record(kind, meta["namespace"], meta["name"], status, PHASES)
    if {k: previous.get(k) for k in status} != status:
        patch.status.update(status)


async def observe_train(body: Obj) -> tuple[reducers.TrainObserved, str, builders.ShardedWork | None]:
    """What a TrainRun's status and next children follow from; its output URI and latents phase."""
    meta, spec = body["metadata"], body["spec"]
    namespace, name = meta["namespace"], meta["name"]
    client = kube()
    job_file = await read_job_file(namespace, name)
    output_uri = builders.applied_output_uri(job_file) or spec["output"]["uri"]
    invalid = ""
    pool = (spec.get("distributed") or {}).get("nodePool") or builders.DEFAULT_NODE_POOL
    try:
        SETTINGS.pool(pool)
    except KeyError as error:
        invalid = f"spec.distributed.nodePool: {error.args[0]}"
    latents_work = builders.latents_work(body, output_uri) if builders.precompute_latents(spec) else None
    latents = await observe_sharded(latents_work, namespace) if latents_work else None
    train_name = builders.child_name(name, "train")
    job = await read_job(namespace, train_name)
    pod_restarts = 0
    if job is not None:
        pods = await client.list(
            collection_path("v1", "Pod", namespace), f"batch.kubernetes.io/job-name={train_name}"
        )
        pod_restarts = sum(
            int(c.get("restartCount") or 0)
            for pod in pods
            for c in (pod.get("status") or {}).get("containerStatuses") or []
        )
    train_status = await asyncio.to_thread(store.read_train_status, output_uri) if job is not None else None
    observed = reducers.TrainObserved(
        generation=int(meta.get("generation") or 0),
        now=now(),
        previous=dict(body.get("status") or {}),
        upstream=await read_upstream("TrainRun", spec, namespace),
        invalid=invalid,
        refused_change=reducers.refused_change(job_file, spec),
        suspended=bool(spec.get("suspend")),
        latents=latents,
        job=reducers.JobView.of(job),
        job_failed_pods=int(((job or {}).get("status") or {}).get("failed") or 0),
        pod_restarts=pod_restarts,
        train_status=train_status,
    )
    return observed, output_uri, latents_work


def train_children(
    body: Obj, observed: reducers.TrainObserved, latents_work: builders.ShardedWork | None
) -> list[Obj]:
    upstream_uri = observed.upstream.output_uri if observed.upstream else None
    children: list[Obj] = []
    for step in reducers.train_steps(observed):
        if step == "job":
            children.append(
                builders.build_job_file(builders.resolve_resource(body, upstream_uri), body["spec"])
            )
        elif step.startswith(builders.LATENTS_PREFIX):
            assert latents_work is not None and observed.latents is not None, step
            children.append(
                sharded_job(latents_work, step.removeprefix(builders.LATENTS_PREFIX), observed.latents)
            )
        elif step == "rdzv":
            children.append(builders.build_rdzv_service(body["metadata"]["name"]))
        else:
            children.append(builders.build_train_job(body, SETTINGS, upstream_uri))
    return children


async def reconcile_train(body: kopf.Body, patch: kopf.Patch, logger: Logger) -> None:
    raw: Obj = dict(body)
    kind = raw["kind"]
    with metrics.reconcile_pass(kind):
        observed, output_uri, latents_work = await observe_train(raw)
        drifted = await apply_children(body, train_children(raw, observed, latents_work))
        status = reducers.reduce_train(output_uri, observed)
        status = with_drift(status, drifted, observed.previous, observed.now)
    report(body, patch, logger, observed.previous, status)


LAST_SUCCESS = [time.monotonic()]  # when a reconcile pass last finished without an error


@kopf.on.probe(id="lastReconcileAgeSeconds")
def last_reconcile_age(**_: Any) -> float:
    """On the liveness endpoint: seconds since a reconcile pass last succeeded."""
    return round(time.monotonic() - LAST_SUCCESS[0], 1)


def _register(plural: str) -> None:
    @kopf.timer(GROUP, VERSION, plural, id="reconcile", interval=SETTINGS.reconcile_seconds)
    async def reconcile(body: kopf.Body, patch: kopf.Patch, logger: Logger, **kwargs: Any) -> None:
        JOB_INDEX.set(kwargs["child_jobs"])  # kopf passes each index by its handler's name
        try:
            await reconcile_once(body, patch, logger)
        except KubeError as error:
            if error.transient:
                raise kopf.TemporaryError(f"API server: {error}", delay=5) from None
            # A request the API server refuses (400, 403, 422 ...) is refused again next time: say
            # so on the resource, once per pass, instead of retrying in a storm.
            conditions = (body.get("status") or {}).get("conditions") or []
            patch.status["conditions"] = reducers.merge_conditions(  # one per type: the new one wins
                conditions,
                [*conditions, reducers.apply_refused_condition(error.status, str(error))],
                now(),
                int(body["metadata"].get("generation") or 0),
            )
            logger.warning("%s: %s", body["metadata"]["name"], error)
        except StorageError as error:
            raise kopf.TemporaryError(f"object store: {error}", delay=5) from None
        else:
            LAST_SUCCESS[0] = time.monotonic()

    async def reconcile_once(body: kopf.Body, patch: kopf.Patch, logger: Logger) -> None:
        status = dict(body.get("status") or {})
        generation = int(body["metadata"].get("generation") or 0)
        if reducers.is_terminal(status) and status.get("observedGeneration") == generation:
            # Finished and unchanged since: nothing to apply or observe, so no request at all (a spec
            # change bumps the generation and gets one full pass, to state its refusal).
            metrics.SKIPPED.labels(body["kind"]).inc()
            metrics.record(
                body["kind"], body["metadata"]["namespace"], body["metadata"]["name"], status, PHASES
            )
            return
        if body["kind"] == "TrainRun":
            await reconcile_train(body, patch, logger)
        else:
            await reconcile_stage(body, patch, logger)

    @kopf.on.delete(GROUP, VERSION, plural, id="forget", optional=True)
    def forget(body: kopf.Body, **_: Any) -> None:
        # Children go with their owner (garbage collection); only our metrics remember it.
        metrics.forget(body["kind"], body["metadata"]["namespace"], body["metadata"]["name"], PHASES)


for _stage in STAGES.values():
    _register(_stage.plural)
_register(PLURALS["TrainRun"])

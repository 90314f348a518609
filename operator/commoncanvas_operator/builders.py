"""Pure builders: a custom resource's spec -> the Kubernetes objects that run it (plain dicts).

A sharded stage (ScrapeJob, CaptionJob) runs as three Jobs over one job file:
``{name}-plan`` (one pod: plan the units, report their count), ``{name}-units`` (an Indexed Job, pod
``i`` runs unit ``i``) and ``{name}-finalize`` (one pod: merge indexes, write summary.json). The job
file is the resource itself with its upstream reference replaced by the upstream's output URI, kept
in the ConfigMap ``{name}-job`` and mounted in every pod, so pods run what ``commoncanvas run`` runs.

Owner references and namespaces are added by the handler (``kopf.adopt``), not here.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import yaml

from commoncanvas_operator.settings import NodePool, Settings

Obj = dict[str, Any]

GROUP = "commoncanvas.dev"
VERSION = "v1alpha1"
MANAGER = "commoncanvas-operator"
JOB_FILE_KEY = "job.yaml"
JOB_FILE_DIR = "/etc/commoncanvas"
JOB_FILE = f"{JOB_FILE_DIR}/{JOB_FILE_KEY}"
TERMINATION_LOG = "/dev/termination-log"
GPU_RESOURCE = "nvidia.com/gpu"
# Annotations under this prefix on a resource are copied to its unit pods (e.g. scrape.alpha hints,
# or the test harness' kwok behaviour annotations).
POD_ANNOTATION_PREFIX = f"{GROUP}/"
STEPS = ("plan", "units", "finalize")


@dataclass(frozen=True)
class StageKind:
    """What differs between the sharded kinds: CLI group, upstream reference and where pods go."""

    kind: str
    plural: str
    command: str
    ref_field: tuple[str, str] | None  # (spec section, field) holding the upstream's name
    upstream_kind: str | None


STAGES: dict[str, StageKind] = {
    "ScrapeJob": StageKind("ScrapeJob", "scrapejobs", "scrape", None, None),
    "CaptionJob": StageKind("CaptionJob", "captionjobs", "caption", ("input", "scrapeJobRef"), "ScrapeJob"),
}
UPSTREAM_URI_FIELDS = {"CaptionJob": ("input", "uris"), "TrainRun": ("dataset", "uris")}
PLURALS = {"ScrapeJob": "scrapejobs", "CaptionJob": "captionjobs", "TrainRun": "trainruns"}


def child_name(name: str, step: str) -> str:
    return f"{name}-{step}"


def labels(kind: str, name: str, step: str | None = None) -> dict[str, str]:
    result = {
        "app.kubernetes.io/managed-by": MANAGER,
        "app.kubernetes.io/part-of": "commoncanvas",
        f"{GROUP}/kind": kind.lower(),
        f"{GROUP}/resource": name,
    }
    if step:
        result[f"{GROUP}/step"] = step
    return result


def upstream_ref(kind: str, spec: Obj) -> tuple[str, str] | None:
    """(kind, name) of the resource this one reads from, or None when it names URIs directly."""
    if kind == "TrainRun":
        name = (spec.get("dataset") or {}).get("captionJobRef")
        return ("CaptionJob", name) if name else None
    stage = STAGES[kind]
    if stage.ref_field is None or stage.upstream_kind is None:
        return None
    section, field = stage.ref_field
    name = (spec.get(section) or {}).get(field)
    return (stage.upstream_kind, name) if name else None


def resolve_resource(body: Obj, upstream_uri: str | None) -> Obj:
    """The resource as workers read it: the upstream reference replaced by the upstream's output URI."""
    kind = body["kind"]
    spec = copy.deepcopy(dict(body["spec"]))
    ref = upstream_ref(kind, spec)
    if ref is not None:
        if upstream_uri is None:
            raise ValueError(f"{kind} {body['metadata']['name']}: {ref[0]} {ref[1]} has no output URI yet")
        section, field = UPSTREAM_URI_FIELDS[kind]
        spec[section] = {k: v for k, v in spec[section].items() if not k.endswith("JobRef")}
        spec[section][field] = [upstream_uri]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": kind,
        "metadata": {"name": body["metadata"]["name"], "namespace": body["metadata"].get("namespace", "")},
        "spec": spec,
    }


def build_job_file(resource: Obj) -> Obj:
    """The ConfigMap holding the resolved resource (the file every pod of the stage reads)."""
    name = resource["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": child_name(name, "job"), "labels": labels(resource["kind"], name)},
        "data": {JOB_FILE_KEY: yaml.safe_dump(resource, sort_keys=False)},
    }


def applied_output_uri(job_file: Obj | None) -> str | None:
    """The output URI the running children were made for (from the ConfigMap), if any."""
    if not job_file:
        return None
    text = (job_file.get("data") or {}).get(JOB_FILE_KEY)
    if not text:
        return None
    uri = ((yaml.safe_load(text).get("spec") or {}).get("output") or {}).get("uri")
    return str(uri) if uri else None


def object_store_env(settings: Settings) -> list[Obj]:
    """Credentials from the chart's Secret, the endpoint from its ConfigMap (absent = AWS itself)."""
    env: list[Obj] = [
        {
            "name": key,
            "valueFrom": {"secretKeyRef": {"name": settings.object_store_secret, "key": key}},
        }
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    ]
    env.append(
        {
            "name": "S3_ENDPOINT_URL",
            "valueFrom": {
                "configMapKeyRef": {
                    "name": settings.object_store_config,
                    "key": "S3_ENDPOINT_URL",
                    "optional": True,
                }
            },
        }
    )
    return env


def _pool_for(kind: str, step: str, spec: Obj, settings: Settings) -> NodePool:
    if step != "units":
        return settings.pool(settings.control_pool)
    if kind == "CaptionJob":
        return settings.pool(spec.get("nodePool") or "a100")
    return settings.pool(settings.scrape_pool)


def _gpus(kind: str, step: str, spec: Obj) -> int:
    if kind == "CaptionJob" and step == "units":
        return int(spec.get("gpusPerPod", 1))
    return 0


def stage_pod_template(body: Obj, step: str, settings: Settings) -> Obj:
    """The pod every Job of a stage runs: the worker CLI on the mounted job file."""
    kind, name, spec = body["kind"], body["metadata"]["name"], body["spec"]
    stage = STAGES[kind]
    pool = _pool_for(kind, step, spec, settings)
    gpus = _gpus(kind, step, spec)
    action = {"plan": "prepare", "units": "unit", "finalize": "finalize"}[step]
    args = [stage.command, action, JOB_FILE]
    if step == "plan":
        args += ["--termination-log", TERMINATION_LOG]
    container: Obj = {
        "name": "worker",
        "image": settings.gpu_image if gpus else settings.cpu_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["commoncanvas"],
        "args": args,
        "env": [
            *object_store_env(settings),
            {"name": "METRICS_PORT", "value": str(settings.metrics_port)},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
        ],
        "ports": [{"name": "metrics", "containerPort": settings.metrics_port}],
        "volumeMounts": [{"name": "job-file", "mountPath": JOB_FILE_DIR, "readOnly": True}],
        # The plan pod's unit count, or the tail of a failed pod's log, reaches the operator here.
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if gpus:
        container["resources"] = {"limits": {GPU_RESOURCE: str(gpus)}}
    pod_spec: Obj = {
        "restartPolicy": "Never",
        "containers": [container],
        "volumes": [
            {
                "name": "job-file",
                "configMap": {
                    "name": child_name(name, "job"),
                    "items": [{"key": JOB_FILE_KEY, "path": JOB_FILE_KEY}],
                },
            }
        ],
    }
    if pool.node_selector:
        pod_spec["nodeSelector"] = dict(pool.node_selector)
    if pool.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in pool.tolerations]
    if settings.worker_service_account:
        pod_spec["serviceAccountName"] = settings.worker_service_account
    metadata: Obj = {"labels": labels(kind, name, step)}
    annotations = {
        key: value
        for key, value in (body["metadata"].get("annotations") or {}).items()
        if key.startswith(POD_ANNOTATION_PREFIX)
    }
    if annotations and step == "units":
        metadata["annotations"] = annotations
    return {"metadata": metadata, "spec": pod_spec}


def build_stage_job(body: Obj, step: str, settings: Settings, units: int = 1) -> Obj:
    """Job ``{name}-{step}``; for ``units`` an Indexed Job with one completion per unit."""
    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}; one of {STEPS}")
    kind, name = body["kind"], body["metadata"]["name"]
    job_spec: Obj = {"template": stage_pod_template(body, step, settings)}
    if step == "units":
        if units < 1:
            raise ValueError(f"{kind} {name}: an Indexed Job needs at least one unit, got {units}")
        job_spec.update(
            {
                "completionMode": "Indexed",
                "completions": units,
                "parallelism": max(1, min(int(body["spec"].get("parallelism", 1)), units)),
                "backoffLimitPerIndex": settings.backoff_limit_per_index,
                # A lost node or a preemption is not the unit's fault: retry it without counting.
                "podFailurePolicy": {
                    "rules": [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}]
                },
            }
        )
    else:
        job_spec.update(
            {
                "completions": 1,
                "parallelism": 1,
                "backoffLimit": settings.backoff_limit_per_index,
                "podFailurePolicy": {
                    "rules": [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}]
                },
            }
        )
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": child_name(name, step), "labels": labels(kind, name, step)},
        "spec": job_spec,
    }


# --- TrainRun: a headless Service for the c10d rendezvous and an Indexed Job, one pod per node -----

RDZV_PORT = 29500
TRAIN_STEPS = ("job", "rdzv", "train")


def train_unsupported(spec: Obj) -> str:
    """Why the operator cannot run this TrainRun spec (empty: it can)."""
    if (spec.get("optimizations") or {}).get("precomputeLatents"):
        return (
            "spec.optimizations.precomputeLatents is not supported by the operator yet (the latents "
            "phase runs only with `commoncanvas run`); set it to false to train on the cluster"
        )
    return ""


def train_selector(name: str) -> dict[str, str]:
    return {f"{GROUP}/kind": "trainrun", f"{GROUP}/resource": name, f"{GROUP}/step": "train"}


def build_rdzv_service(name: str) -> Obj:
    """Headless Service ``{name}-rdzv``: gives pod ``i`` of the train Job the DNS name
    ``{name}-train-{i}.{name}-rdzv``, before it is ready (the rendezvous happens before readiness)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": child_name(name, "rdzv"), "labels": labels("TrainRun", name, "rdzv")},
        "spec": {
            "clusterIP": "None",
            "selector": train_selector(name),
            "publishNotReadyAddresses": True,
            "ports": [{"name": "c10d", "port": RDZV_PORT, "targetPort": RDZV_PORT, "protocol": "TCP"}],
        },
    }


# kopf keeps its own state in annotations under our prefix (handlers.configure); they change after
# the Job exists, and a Job's pod template cannot change, so they never reach the pods.
KOPF_ANNOTATIONS = (f"{GROUP}/last-handled-configuration", f"{GROUP}/kopf")


def pod_annotations(body: Obj) -> dict[str, str]:
    """The resource's ``commoncanvas.dev/`` annotations for its pods, less kopf's bookkeeping."""
    return {
        key: value
        for key, value in (body["metadata"].get("annotations") or {}).items()
        if key.startswith(POD_ANNOTATION_PREFIX) and not key.startswith(KOPF_ANNOTATIONS)
    }


def build_train_job(body: Obj, settings: Settings, upstream_uri: str | None = None) -> Obj:
    """Indexed Job ``{name}-train`` for a TrainRun (its CaptionJob's output URI given when it names
    one): pod ``i`` is node ``i``, running what ``commoncanvas.train.launch.replica_launch`` says a
    replica runs, on the job file ``build_job_file`` holds."""
    from commoncanvas.specs.train import TrainRun
    from commoncanvas.train.launch import build_appdef, replica_launch

    run = TrainRun.model_validate(resolve_resource(body, upstream_uri))
    name = run.metadata.name
    dist = run.spec.distributed
    pool = settings.pool(dist.node_pool)
    gpus = dist.gpus_per_node
    image = settings.gpu_image if gpus else settings.cpu_image
    app = build_appdef(run, JOB_FILE, image, metrics_port=settings.metrics_port, rdzv_port=RDZV_PORT)
    launch = replica_launch(
        app, app_id=name, rank0_host=f"{child_name(name, 'train')}-0.{child_name(name, 'rdzv')}"
    )
    (role,) = app.roles
    requests: dict[str, str] = {
        "cpu": str(role.resource.cpu),
        "memory": f"{role.resource.memMB}Mi",
    }
    limits: dict[str, str] = {}
    if gpus:
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = str(gpus)
    ports = [{"name": "metrics", "containerPort": settings.metrics_port}]
    ports += [
        {"name": port_name[:15], "containerPort": port}
        for port_name, port in sorted(launch.ports.items())
        if port != settings.metrics_port
    ]
    if not any(p["containerPort"] == RDZV_PORT for p in ports):
        ports.append({"name": "c10d", "containerPort": RDZV_PORT})
    container: Obj = {
        "name": "trainer",
        "image": image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": launch.argv[:1],
        "args": launch.argv[1:],
        "env": [
            *object_store_env(settings),
            *({"name": key, "value": value} for key, value in sorted(launch.env.items())),
        ],
        "ports": ports,
        "resources": {"requests": requests, **({"limits": limits} if limits else {})},
        "volumeMounts": [
            {"name": "job-file", "mountPath": JOB_FILE_DIR, "readOnly": True},
            # NCCL and the DataLoader workers share tensors through /dev/shm.
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec: Obj = {
        "restartPolicy": "Never",
        "subdomain": child_name(name, "rdzv"),
        "containers": [container],
        "volumes": [
            {
                "name": "job-file",
                "configMap": {
                    "name": child_name(name, "job"),
                    "items": [{"key": JOB_FILE_KEY, "path": JOB_FILE_KEY}],
                },
            },
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        ],
    }
    if pool.node_selector:
        pod_spec["nodeSelector"] = dict(pool.node_selector)
    if pool.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in pool.tolerations]
    if settings.worker_service_account:
        pod_spec["serviceAccountName"] = settings.worker_service_account
    metadata: Obj = {"labels": labels("TrainRun", name, "train")}
    annotations = pod_annotations(body)
    if annotations:
        metadata["annotations"] = annotations
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": child_name(name, "train"), "labels": labels("TrainRun", name, "train")},
        "spec": {
            "completionMode": "Indexed",
            "completions": dist.max_nodes,
            "parallelism": dist.max_nodes,
            # Every node's pod is one torchrun agent: the group restarts together (torchrun's own
            # --max-restarts); a pod the Job replaces is a node coming back. A lost node is no failure.
            "backoffLimit": dist.max_restarts,
            "suspend": bool(run.spec.suspend),
            "podFailurePolicy": {
                "rules": [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}]
            },
            "template": {"metadata": metadata, "spec": pod_spec},
        },
    }

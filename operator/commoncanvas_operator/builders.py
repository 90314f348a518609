"""Pure builders: a custom resource's spec -> the Kubernetes objects that run it (plain dicts).

Sharded work (``ShardedWork``) runs as three Jobs over one job file: plan (one pod: plan the units,
report their count), units (an Indexed Job of W worker pods, ``completions = parallelism = W``, each
claiming units until none is left: workers, not units, are pods; W changes in place) and finalize
(one pod: merge indexes, write summary.json). A ScrapeJob or CaptionJob is sharded work (``{name}-plan``,
``{name}-units``, ``{name}-finalize``); a TrainRun runs its optional latents phase as sharded work
(``{name}-latents-plan``...), then a headless Service and an Indexed Job for torchrun. The job file is
the resource itself with its upstream reference replaced by the upstream's output URI, kept in the
ConfigMap ``{name}-job`` and mounted in every pod, so pods run what ``commoncanvas run`` runs.

Every pod gets the securityContexts of the operator's settings (the chart's ``workers.podSecurityContext``
and ``workers.securityContext``: by default non-root, no privilege escalation, no capabilities, seccomp
RuntimeDefault and a read-only root filesystem) and an emptyDir at /tmp holding all it writes.

Owner references and namespaces are added by the handler (``kopf.adopt``), not here.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any

import yaml

from commoncanvas.specs.common import DEFAULT_NODE_POOL, GROUP, PLURALS, VERSION
from commoncanvas_operator.settings import NodePool, Settings

Obj = dict[str, Any]

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
# The spec a stage's children were made from, on its job-file ConfigMap.
APPLIED_SPEC_ANNOTATION = f"{GROUP}/applied-spec"
# The root filesystem is read-only (Settings.worker_security_context), so what a worker writes goes to
# this emptyDir: temporary files, its home and the caches under it.
SCRATCH_VOLUME = "tmp"
SCRATCH_DIR = "/tmp"
WORKER_HOME = f"{SCRATCH_DIR}/home"
# The model cache a node's workers share (Settings.model_cache), where one mounts.
MODEL_CACHE_VOLUME = "model-cache"
MODEL_CACHE_DIR = "/var/cache/commoncanvas/models"


@dataclass(frozen=True)
class StageKind:
    """What differs between the sharded kinds: CLI group, upstream reference and where pods go."""

    kind: str
    plural: str
    command: str
    ref_field: tuple[str, str] | None  # (spec section, field) holding the upstream's name
    upstream_kind: str | None


STAGES: dict[str, StageKind] = {
    "ScrapeJob": StageKind("ScrapeJob", PLURALS["ScrapeJob"], "scrape", None, None),
    "CaptionJob": StageKind(
        "CaptionJob", PLURALS["CaptionJob"], "caption", ("input", "scrapeJobRef"), "ScrapeJob"
    ),
    # Its trainRunRef is the upstream the operator waits for; prompts.captionJobRef is not resolved on a
    # cluster (its plan pod says to give prompts.uri).
    "EvalRun": StageKind("EvalRun", PLURALS["EvalRun"], "eval", ("model", "trainRunRef"), "TrainRun"),
}
# The stages whose workers run models on the spec's node pool and GPUs (a ScrapeJob's fetch on CPUs).
MODEL_STAGES = frozenset({"CaptionJob", "EvalRun"})
UPSTREAM_URI_FIELDS = {"CaptionJob": ("input", "uris"), "TrainRun": ("dataset", "uris")}


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
        if kind == "EvalRun":  # the TrainRun's exported pipeline, not a dataset
            from commoncanvas.specs.eval import TRAIN_PIPELINE_DIR

            spec["model"] = {"pipelineUri": f"{upstream_uri.rstrip('/')}/{TRAIN_PIPELINE_DIR}"}
        else:
            section, field = UPSTREAM_URI_FIELDS[kind]
            spec[section] = {k: v for k, v in spec[section].items() if not k.endswith("JobRef")}
            spec[section][field] = [upstream_uri]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": kind,
        "metadata": {"name": body["metadata"]["name"], "namespace": body["metadata"].get("namespace", "")},
        "spec": spec,
    }


def build_job_file(resource: Obj, spec: Obj) -> Obj:
    """The ConfigMap holding the resolved resource (the file every pod of the stage reads), and the
    resource's own ``spec`` it was made from (what a later spec is compared with)."""
    name = resource["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": child_name(name, "job"),
            "labels": labels(resource["kind"], name),
            "annotations": {APPLIED_SPEC_ANNOTATION: json.dumps(spec, sort_keys=True)},
        },
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


def linger_env(settings: Settings) -> dict[str, str]:
    """How long a worker keeps /metrics up after its work (commoncanvas.metrics.serve); unset: 0."""
    seconds = settings.metrics_linger_seconds
    return {"METRICS_LINGER_SECONDS": f"{seconds:g}"} if seconds > 0 else {}


def scratch_env() -> list[Obj]:
    """Home, temporary files and the caches written there, all under the scratch emptyDir."""
    return [
        # ~/.cache/commoncanvas/models (commoncanvas.models), Triton's ~/.triton, torch hub's ~/.cache.
        {"name": "HOME", "value": WORKER_HOME},
        # tempfile: the stages' work directories, streaming's local shards, checkpoints, TorchInductor.
        {"name": "TMPDIR", "value": SCRATCH_DIR},
        # The Hugging Face cache; images/worker-gpu.Dockerfile sets one under /home/commoncanvas.
        {"name": "HF_HOME", "value": f"{WORKER_HOME}/.cache/huggingface"},
    ]


def _harden(pod_spec: Obj, container: Obj, settings: Settings) -> None:
    """The settings' securityContexts (none where one is empty) and the scratch emptyDir at /tmp."""
    if settings.worker_pod_security_context:
        pod_spec["securityContext"] = copy.deepcopy(settings.worker_pod_security_context)
    if settings.worker_security_context:
        container["securityContext"] = copy.deepcopy(settings.worker_security_context)
    container["volumeMounts"].append({"name": SCRATCH_VOLUME, "mountPath": SCRATCH_DIR})
    pod_spec["volumes"].append({"name": SCRATCH_VOLUME, "emptyDir": {}})


def _share_model_cache(pod_spec: Obj, container: Obj, settings: Settings) -> None:
    """Mount the chart's shared model cache (``workers.modelCache``), if any: eight pods on a node
    download a model once (commoncanvas.models serialises them with a file lock in the cache)."""
    if not settings.model_cache:
        return
    pod_spec["volumes"].append({"name": MODEL_CACHE_VOLUME, **copy.deepcopy(settings.model_cache)})
    container["volumeMounts"].append({"name": MODEL_CACHE_VOLUME, "mountPath": MODEL_CACHE_DIR})
    shared = {"COMMONCANVAS_MODEL_CACHE": MODEL_CACHE_DIR, "HF_HOME": f"{MODEL_CACHE_DIR}/huggingface"}
    container["env"] = [e for e in container["env"] if e["name"] not in shared]
    container["env"] += [{"name": name, "value": value} for name, value in shared.items()]


def _place(pod_spec: Obj, pool: NodePool, settings: Settings, priority_class: str = "") -> None:
    """Where a worker pod runs (its pool's nodeSelector and tolerations), at which priority (the
    resource's spec.priorityClassName, else its pool's) and as which ServiceAccount."""
    if priority_class or pool.priority_class_name:
        pod_spec["priorityClassName"] = priority_class or pool.priority_class_name
    if pool.node_selector:
        pod_spec["nodeSelector"] = dict(pool.node_selector)
    if pool.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in pool.tolerations]
    if settings.worker_service_account:
        pod_spec["serviceAccountName"] = settings.worker_service_account


# kopf keeps its own state in annotations under our prefix (handlers.configure); they change after
# the Job exists, and a Job's pod template cannot change, so they never reach the pods.
KOPF_ANNOTATIONS = (f"{GROUP}/last-handled-configuration", f"{GROUP}/kopf")


# Kueue's labels: a resource's reach every child Job. Kueue then owns a Job's suspend, parallelism (on
# partial admission) and the placement it injects, so a queued Job is created suspended, once, and
# never applied again (handlers.apply_children).
QUEUE_LABELS = ("kueue.x-k8s.io/queue-name", "kueue.x-k8s.io/priority-class")


def queue_labels(body: Obj) -> dict[str, str]:
    own = (body.get("metadata") or {}).get("labels") or {}
    return {key: str(own[key]) for key in QUEUE_LABELS if own.get(key)}


def is_queued(child: Obj) -> bool:
    return child.get("kind") == "Job" and QUEUE_LABELS[0] in (
        (child.get("metadata") or {}).get("labels") or {}
    )


def pod_annotations(body: Obj) -> dict[str, str]:
    """The resource's ``commoncanvas.dev/`` annotations for its pods, less kopf's bookkeeping."""
    return {
        key: value
        for key, value in (body["metadata"].get("annotations") or {}).items()
        if key.startswith(POD_ANNOTATION_PREFIX) and not key.startswith(KOPF_ANNOTATIONS)
    }


@dataclass(frozen=True)
class ShardedWork:
    """One sharded piece of work over its owner's job file, run as three Jobs: ``plan`` (one pod on the
    control pool: plan the units, report their count), ``units`` (an Indexed Job, pod ``i`` runs unit
    ``i``) and ``finalize`` (one pod on the control pool). A ScrapeJob or CaptionJob is one (Jobs
    ``{name}-plan``...); a TrainRun with ``optimizations.precomputeLatents`` runs one before training
    (its latents phase: Jobs ``{name}-latents-plan``...)."""

    kind: str  # the owner: its kind and name label the Jobs, its job file is ``{name}-job``
    name: str
    command: str  # the worker CLI group: `commoncanvas {command} prepare|unit|finalize JOB_FILE`
    step_prefix: str  # "" or "latents-": the Jobs are ``{name}-{step_prefix}{step}``
    pool: str  # the units pods' node pool
    gpus: int  # per units pod
    parallelism: int  # units pods at once (never more than units)
    output_uri: str  # the root its plan, unit markers and summary.json are under
    # Steps whose CLI command imports the ML stack (torch): their pods get the GPU image, which has it
    # (the CPU image leaves it out, images/worker.Dockerfile), with or without a GPU.
    ml_steps: frozenset[str] = frozenset()
    suspend: bool = False  # the units Job's ``suspend`` (the owner's spec.suspend)
    annotations: dict[str, str] = field(default_factory=dict)  # for the units pods
    queue: dict[str, str] = field(default_factory=dict)  # Kueue's labels, for every Job
    priority_class: str = ""  # the owner's spec.priorityClassName ("": its pool's)

    def step_name(self, step: str) -> str:
        return f"{self.step_prefix}{step}"

    def job_name(self, step: str) -> str:
        return child_name(self.name, self.step_name(step))


def stage_work(body: Obj, settings: Settings, output_uri: str | None = None) -> ShardedWork:
    """A ScrapeJob or CaptionJob as sharded work (``output_uri``: the one its running Jobs write to,
    if it differs from the spec's)."""
    kind, name, spec = body["kind"], body["metadata"]["name"], body["spec"]
    models = kind in MODEL_STAGES
    return ShardedWork(
        kind=kind,
        name=name,
        command=STAGES[kind].command,
        step_prefix="",
        pool=(spec.get("nodePool") or DEFAULT_NODE_POOL) if models else settings.scrape_pool,
        gpus=int(spec.get("gpusPerPod", 1)) if models else 0,
        parallelism=int(spec.get("parallelism", 1)),
        output_uri=output_uri or (spec.get("output") or {}).get("uri", ""),
        # An EvalRun's finalize imports clean-fid, which imports torch.
        ml_steps=frozenset({"units", "finalize"} if kind == "EvalRun" else {"units"} if models else ()),
        suspend=bool(spec.get("suspend")),
        annotations=pod_annotations(body),
        queue=queue_labels(body),
        priority_class=str(spec.get("priorityClassName") or ""),
    )


# commoncanvas.train.latents.LATENTS_DIR: the latents phase writes under {spec.output.uri}/latents
# (latents.latents_uri). Mirrored, not imported: that module imports torch, which the operator's image
# leaves out; tests/unit/test_operator_latents.py keeps the two equal.
LATENTS_DIR = "latents"
LATENTS_PREFIX = "latents-"


def latents_work(body: Obj, output_uri: str | None = None) -> ShardedWork:
    """A TrainRun's latents phase as sharded work: one worker pod per GPU of the run (each with one GPU;
    none when the run trains on CPUs), on the run's node pool."""
    from commoncanvas.specs.train import TrainRunSpec

    spec = TrainRunSpec.model_validate(dict(body["spec"]))
    dist = spec.distributed
    root = output_uri or spec.output.uri
    return ShardedWork(
        kind="TrainRun",
        name=body["metadata"]["name"],
        command="latents",
        step_prefix=LATENTS_PREFIX,
        pool=dist.node_pool,
        gpus=1 if dist.gpus_per_node > 0 else 0,
        parallelism=dist.latents_workers,
        output_uri=f"{root.rstrip('/')}/{LATENTS_DIR}",
        ml_steps=frozenset(STEPS),
        suspend=bool(spec.suspend),
        annotations=pod_annotations(body),
        queue=queue_labels(body),
        priority_class=spec.priority_class_name or "",
    )


def precompute_latents(spec: Obj) -> bool:
    return bool((spec.get("optimizations") or {}).get("precomputeLatents"))


def sharded_pod_template(work: ShardedWork, step: str, settings: Settings) -> Obj:
    """The pod every Job of sharded work runs: the worker CLI on the mounted job file."""
    units = step == "units"
    pool = settings.pool(work.pool if units else settings.control_pool)
    gpus = work.gpus if units else 0
    action = {"plan": "prepare", "units": "work", "finalize": "finalize"}[step]
    args = [work.command, action, JOB_FILE]
    if step == "plan":
        args += ["--termination-log", TERMINATION_LOG]
    container: Obj = {
        "name": "worker",
        "image": settings.gpu_image if gpus or step in work.ml_steps else settings.cpu_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["commoncanvas"],
        "args": args,
        "env": [
            *object_store_env(settings),
            *scratch_env(),
            {"name": "METRICS_PORT", "value": str(settings.metrics_port)},
            *({"name": key, "value": value} for key, value in linger_env(settings).items()),
            {"name": "PYTHONUNBUFFERED", "value": "1"},
        ],
        "ports": [{"name": "metrics", "containerPort": settings.metrics_port}],
        "volumeMounts": [{"name": "job-file", "mountPath": JOB_FILE_DIR, "readOnly": True}],
        # The plan pod's unit count, or the tail of a failed pod's log, reaches the operator here.
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    resources = copy.deepcopy(settings.worker_resources)
    if gpus:
        resources.setdefault("limits", {})[GPU_RESOURCE] = str(gpus)
    if resources:
        container["resources"] = resources
    pod_spec: Obj = {
        "restartPolicy": "Never",
        "containers": [container],
        "volumes": [
            {
                "name": "job-file",
                "configMap": {
                    "name": child_name(work.name, "job"),
                    "items": [{"key": JOB_FILE_KEY, "path": JOB_FILE_KEY}],
                },
            }
        ],
    }
    _harden(pod_spec, container, settings)
    if units:
        _share_model_cache(pod_spec, container, settings)
    _place(pod_spec, pool, settings, work.priority_class)
    metadata: Obj = {"labels": labels(work.kind, work.name, work.step_name(step))}
    if work.annotations and units:
        metadata["annotations"] = dict(work.annotations)
    return {"metadata": metadata, "spec": pod_spec}


def build_sharded_job(work: ShardedWork, step: str, settings: Settings, units: int = 1) -> Obj:
    """Job ``work.job_name(step)``; for ``units`` an elastic Indexed Job of workers: one completion per
    worker (``completions = parallelism``, never more workers than units)."""
    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}; one of {STEPS}")
    job_spec: Obj = {"template": sharded_pod_template(work, step, settings)}
    # A lost node or a preemption is not the pod's fault: retry it without counting.
    ignore_disruptions = {"rules": [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}]}
    if step == "units":
        if units < 1:
            raise ValueError(f"{work.kind} {work.name}: an Indexed Job needs at least one unit, got {units}")
        workers = max(1, min(work.parallelism, units))
        job_spec.update(
            {
                "completionMode": "Indexed",
                "completions": workers,
                "parallelism": workers,
                "backoffLimitPerIndex": settings.backoff_limit_per_index,
                "podFailurePolicy": ignore_disruptions,
            }
        )
        job_spec["suspend"] = work.suspend
    else:
        job_spec.update(
            {
                "completions": 1,
                "parallelism": 1,
                "backoffLimit": settings.backoff_limit_per_index,
                "podFailurePolicy": ignore_disruptions,
            }
        )
    if work.queue:
        job_spec["suspend"] = True  # Kueue admits it (and the operator never applies it again)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": work.job_name(step),
            "labels": {**labels(work.kind, work.name, work.step_name(step)), **work.queue},
        },
        "spec": job_spec,
    }


def build_stage_job(body: Obj, step: str, settings: Settings, units: int = 1) -> Obj:
    """Job ``{name}-{step}`` of a ScrapeJob or CaptionJob."""
    return build_sharded_job(stage_work(body, settings), step, settings, units)


# --- TrainRun: (its latents phase, above) a headless Service for the c10d rendezvous and an Indexed
# Job, one pod per node ---------------------------------------------------------------------------

RDZV_PORT = 29500


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
    # Training imports torch: the GPU image, which has it, with or without GPUs (the CPU image has not).
    image = settings.gpu_image
    app = build_appdef(
        run,
        JOB_FILE,
        image,
        env=linger_env(settings),
        metrics_port=settings.metrics_port,
        rdzv_port=RDZV_PORT,
    )
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
            *scratch_env(),
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
        "terminationGracePeriodSeconds": run.spec.checkpoint.termination_grace_period_seconds,
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
    _harden(pod_spec, container, settings)
    _place(pod_spec, pool, settings, run.spec.priority_class_name or "")
    metadata: Obj = {"labels": labels("TrainRun", name, "train")}
    annotations = pod_annotations(body)
    if annotations:
        metadata["annotations"] = annotations
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": child_name(name, "train"),
            "labels": {**labels("TrainRun", name, "train"), **queue_labels(body)},
        },
        "spec": {
            "completionMode": "Indexed",
            "completions": dist.max_nodes,
            "parallelism": dist.max_nodes,
            # Every node's pod is one torchrun agent: the group restarts together (torchrun's own
            # --max-restarts); a pod the Job replaces is a node coming back. A lost node is no failure.
            "backoffLimit": dist.max_restarts,
            # Under Kueue created suspended, whole: one workload admitted for every node at once.
            "suspend": bool(run.spec.suspend) or bool(queue_labels(body)),
            "podFailurePolicy": {
                "rules": [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}]
            },
            "template": {"metadata": metadata, "spec": pod_spec},
        },
    }

"""The TorchX app that trains a TrainRun: torchrun with the c10d rendezvous, elastic over nodes.

One function, `build_appdef`, turns a TrainRun into the AppDef; the local runner runs it through
TorchX's local scheduler (`run_local`), and the operator materialises the same AppDef on Kubernetes
as an Indexed Job plus a headless Service, using `replica_launch` for each pod's command and env.

Each replica is one node: a torchrun agent starting `nproc_per_node` ranks of
`python -m commoncanvas.train FILE --name NAME` (locally, one agent stands in for all the nodes).
A failed rank makes torchrun restart the whole group (up to `distributed.maxRestarts` times); the
ranks resume from the newest checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torchx import specs

from commoncanvas.specs.train import TrainRun

log = logging.getLogger(__name__)

TRAIN_MODULE = "commoncanvas.train"
RDZV_PORT = 29500
# Where the training processes serve Prometheus metrics (rank 0 does; $METRICS_PORT in its env).
METRICS_PORT = 9400
# Environment variable the rendezvous endpoint is read from (the TorchX schedulers' own name).
RANK0_ENV = "TORCHX_RANK0_HOST"
# Requests per GPU on an 8-GPU A100 node (96 vCPU, ~680 GiB), leaving room for the system pods.
CPU_PER_GPU = 8
MEM_MB_PER_GPU = 60 * 1024
CPU_ONLY = (2, 4096)


def topology(run: TrainRun, one_machine: bool = False) -> str:
    """TorchX's `j`: `{minNodes}:{maxNodes}x{processes per node}` (one process per node on CPU).

    `one_machine` (the local runner) folds the nodes into processes of one torchrun agent: nodes on one
    host would share its shared memory, which mosaicml-streaming keeps one set of per node."""
    dist = run.spec.distributed
    per_node = dist.gpus_per_node or 1
    if one_machine:
        return f"1:1x{dist.max_nodes * per_node}"
    return f"{dist.min_nodes}:{dist.max_nodes}x{per_node}"


def build_appdef(
    run: TrainRun,
    job_file: str,
    image: str,
    *,
    env: Mapping[str, str] | None = None,
    metrics_port: int = METRICS_PORT,
    rdzv_port: int = RDZV_PORT,
    cpu: int | None = None,
    mem_mb: int | None = None,
    one_machine: bool = False,
) -> specs.AppDef:
    """The TorchX `dist.ddp` app training `run` from `job_file` (a path inside `image`).

    `env` is added to every rank's environment (after ours, so a caller can override). Resources
    default to the per-GPU requests above, or a small CPU request without GPUs. `one_machine`: see
    `topology`.
    """
    from torchx.components.dist import ddp

    dist = run.spec.distributed
    gpus = dist.gpus_per_node * (dist.max_nodes if one_machine else 1)
    default_cpu, default_mem = (CPU_PER_GPU * gpus, MEM_MB_PER_GPU * gpus) if gpus else CPU_ONLY
    rank_env = {
        "METRICS_PORT": str(metrics_port),
        "PYTHONUNBUFFERED": "1",
        "COMMONCANVAS_TRAINRUN": run.metadata.name,
        # torchrun reads this: a fresh rendezvous store per restart round. Sharing the agent's store
        # leaves the killed rank's address in it, and the restarted group hangs or fails connecting
        # to it (pytorch/pytorch#135712; seen here with gloo on torch 2.15).
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
        **(env or {}),
    }
    with warnings.catch_warnings():
        # This torchx marks dist.ddp a deprecated alias of dist.torchrun; it builds the same AppDef.
        warnings.filterwarnings("ignore", message=r".*dist\.ddp is deprecated")
        app = ddp(
            job_file,
            "--name",
            run.metadata.name,
            m=TRAIN_MODULE,
            image=image,
            name=f"commoncanvas/{run.metadata.name}",
            cpu=cpu if cpu is not None else default_cpu,
            gpu=gpus,
            memMB=mem_mb if mem_mb is not None else default_mem,
            j=topology(run, one_machine),
            env=rank_env,
            max_retries=dist.max_restarts,
            rdzv_port=rdzv_port,
            rdzv_backend="c10d",
        )
    (role,) = app.roles
    role.args = _with_max_restarts(role.args, dist.max_restarts)
    return app


def _with_max_restarts(args: list[str], restarts: int) -> list[str]:
    """dist.ddp leaves torchrun's own restart budget at 0; the group restart is what resumes training."""
    flag, script = args
    if flag != "-c" or not script.startswith("torchrun "):
        raise RuntimeError(f"unexpected dist.ddp command {args!r}: torchx changed its component")
    return [flag, script.replace("torchrun ", f"torchrun --max-restarts {restarts} ", 1)]


@dataclass(frozen=True)
class ReplicaLaunch:
    """What one node (a pod of the Indexed Job, or a local process) runs: argv and env to add."""

    argv: list[str]
    env: dict[str, str]
    ports: dict[str, int] = field(default_factory=dict)


def replica_launch(app: specs.AppDef, app_id: str, rank0_host: str, replica_id: str = "0") -> ReplicaLaunch:
    """The command and environment of one replica with TorchX's macros filled in, for schedulers that
    TorchX does not drive (the operator): `rank0_host` is where replica 0's rendezvous store listens,
    e.g. `{job}-0.{headless service}`; `app_id` is the rendezvous id shared by all replicas (the
    TrainRun's uid, say). `replica_id` only matters to the static rendezvous, not to c10d."""
    (role,) = app.roles
    values = specs.macros.Values(img_root="", app_id=app_id, replica_id=replica_id, rank0_env=RANK0_ENV)
    resolved = values.apply(role)
    return ReplicaLaunch(
        argv=[resolved.entrypoint, *resolved.args],
        env={**resolved.env, RANK0_ENV: rank0_host},
        ports=dict(resolved.port_map),
    )


def torchrun_command(app: specs.AppDef) -> list[str]:
    """The torchrun argv inside the role's `bash -c` (for logs and tests)."""
    (role,) = app.roles
    return shlex.split(role.args[1])


def run_local(
    run: TrainRun,
    job_file: str | Path,
    *,
    log_dir: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    rdzv_port: int = RDZV_PORT,
    wait_interval: float = 1.0,
) -> dict[str, Any]:
    """Train `run` on this machine through TorchX's local scheduler and wait for it.

    This machine stands in for all `maxNodes` nodes: one torchrun agent with all their processes,
    started in the current directory with this interpreter's environment (its `bin/` first on PATH,
    so torchrun and python are this venv's); logs go to `log_dir`. Returns the final state, the app
    handle, where the logs are and, on failure, the ranks' errors.
    """
    import torch
    from torchx.runner import get_runner

    dist = run.spec.distributed
    gpus, available = dist.gpus_per_node * dist.max_nodes, torch.cuda.device_count()
    if gpus > available:
        raise ValueError(
            f"TrainRun {run.metadata.name!r} asks for {dist.max_nodes} node(s) x {dist.gpus_per_node} GPUs "
            f"(distributed.maxNodes x gpusPerNode) but this machine has {available} GPUs; lower them "
            "(gpusPerNode 0 trains on CPU, one process per node)"
        )
    job_file = Path(job_file).resolve()
    log_root = Path(log_dir) if log_dir is not None else job_file.parent / "torchx-logs"
    local_env = {"PATH": str(Path(sys.executable).parent), **(env or {})}
    app = build_appdef(
        run,
        str(job_file),
        image=os.getcwd(),
        env=local_env,
        metrics_port=0,
        rdzv_port=rdzv_port,
        one_machine=True,
    )
    with _signal_handlers_restored(), get_runner() as runner:
        handle = runner.run(app, scheduler="local_cwd", cfg={"log_dir": str(log_root)})
        log.info("TrainRun %s: torchx app %s, logs under %s", run.metadata.name, handle, log_root)
        try:
            status = runner.wait(handle, wait_interval=wait_interval)
        except BaseException:  # Ctrl-C or an error here must not leave ranks training in the background
            runner.cancel(handle)
            raise
    state = status.state.name if status is not None else "UNKNOWN"
    _, session, app_id = specs.parse_app_handle(handle)
    app_logs = log_root / session / app_id
    summary: dict[str, Any] = {
        "state": state,
        "succeeded": state == "SUCCEEDED",
        "handle": handle,
        "app_id": app_id,
        "log_dir": str(app_logs),
    }
    if state != "SUCCEEDED":
        summary["error"] = log_tail(app_logs)
    return summary


@contextlib.contextmanager
def _signal_handlers_restored() -> Iterator[None]:
    """TorchX's local scheduler takes over SIGINT/SIGTERM of the main thread for good; give them back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def log_tail(app_logs: Path, lines: int = 12) -> str:
    """Why a failed run failed: each rank's distinct errors (torchrun prefixes their lines with
    `[rankN]:`), then the last lines each node's torchrun wrote."""
    logs = {
        p.relative_to(app_logs): p.read_text(errors="replace")
        for p in sorted(app_logs.glob("*/*/stderr.log"))
    }
    errors = dict.fromkeys(
        match.group(0)
        for text in logs.values()
        for match in re.finditer(r"\[rank\d+\]: [\w.]*(Error|Exception)\b.*", text)
    )
    parts = ["rank errors:", *errors] if errors else []
    for name, text in logs.items():
        parts += [f"--- {name}", *text.splitlines()[-lines:]]
    return "\n".join(parts)

"""The TorchX AppDef a TrainRun becomes: one builder for the local runner and the operator."""

from __future__ import annotations

import shlex
import subprocess
from typing import Any

import pytest

from commoncanvas.specs import TrainRun
from commoncanvas.train.launch import build_appdef, replica_launch, topology, torchrun_command


def train_run(**distributed: Any) -> TrainRun:
    return TrainRun.model_validate(
        {
            "metadata": {"name": "sd2-cc"},
            "spec": {
                "dataset": {"uris": ["s3://data/captions"]},
                "output": {"uri": "s3://data/out"},
                "checkpoint": {"uri": "s3://data/checkpoints"},
                "distributed": distributed,
            },
        }
    )


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_topology_is_min_to_max_nodes_times_gpus_per_node() -> None:
    assert topology(train_run(minNodes=2, maxNodes=4, gpusPerNode=8)) == "2:4x8"
    assert topology(train_run(minNodes=1, maxNodes=1, gpusPerNode=0)) == "1:1x1", "one process on CPU"


def test_on_one_machine_the_nodes_become_processes_of_one_agent() -> None:
    assert topology(train_run(minNodes=1, maxNodes=2, gpusPerNode=0), one_machine=True) == "1:1x2"
    assert topology(train_run(minNodes=2, maxNodes=2, gpusPerNode=4), one_machine=True) == "1:1x8"
    app = build_appdef(train_run(minNodes=2, maxNodes=2, gpusPerNode=4), "/j", "img", one_machine=True)
    assert app.roles[0].resource.gpu == 8 and app.roles[0].num_replicas == 1


def test_torchrun_is_elastic_over_nodes_with_the_c10d_rendezvous() -> None:
    app = build_appdef(train_run(minNodes=2, maxNodes=4, gpusPerNode=8), "/run/job.yaml", "worker-gpu:1")
    (role,) = app.roles
    command = torchrun_command(app)
    assert command[0] == "torchrun"
    assert flag(command, "--rdzv_backend") == "c10d"
    assert flag(command, "--nnodes") == "2:4"
    assert flag(command, "--nproc_per_node") == "8"
    assert flag(command, "--rdzv_endpoint").endswith(":29500"), "multi-node: replica 0 hosts the store"
    assert (role.min_replicas, role.num_replicas) == (2, 4)
    assert role.image == "worker-gpu:1"


def test_every_rank_runs_the_training_module_on_the_job_file_by_name() -> None:
    command = torchrun_command(build_appdef(train_run(), "/run/job.yaml", "img"))
    assert command[command.index("-m") :] == ["-m", "commoncanvas.train", "/run/job.yaml", "--name", "sd2-cc"]


def test_max_restarts_reaches_both_torchrun_and_the_scheduler() -> None:
    app = build_appdef(train_run(maxRestarts=5), "/run/job.yaml", "img")
    assert flag(torchrun_command(app), "--max-restarts") == "5"
    assert app.roles[0].max_retries == 5


def test_gpu_nodes_request_their_gpus_and_cpu_nodes_none() -> None:
    gpu = build_appdef(train_run(gpusPerNode=8), "/run/job.yaml", "img").roles[0].resource
    assert gpu.gpu == 8 and gpu.cpu >= 8 and gpu.memMB >= 8 * 1024
    cpu = build_appdef(train_run(gpusPerNode=0), "/run/job.yaml", "img").roles[0].resource
    assert cpu.gpu == 0
    sized = build_appdef(train_run(gpusPerNode=2), "/j", "img", cpu=3, mem_mb=1000).roles[0].resource
    assert (sized.cpu, sized.gpu, sized.memMB) == (3, 2, 1000)


def test_ranks_get_the_metrics_port_and_caller_env_overrides_ours() -> None:
    env = build_appdef(train_run(), "/j", "img", metrics_port=9555).roles[0].env
    assert env["METRICS_PORT"] == "9555"
    assert env["COMMONCANVAS_TRAINRUN"] == "sd2-cc"
    overridden = build_appdef(train_run(), "/j", "img", env={"METRICS_PORT": "0", "EXTRA": "1"}).roles[0].env
    assert (overridden["METRICS_PORT"], overridden["EXTRA"]) == ("0", "1")


def test_single_node_runs_pick_a_free_rendezvous_port() -> None:
    command = torchrun_command(build_appdef(train_run(minNodes=1, maxNodes=1), "/j", "img"))
    assert flag(command, "--rdzv_endpoint") == "localhost:0"


def test_a_replica_launch_has_no_macros_left_and_points_at_replica_zero() -> None:
    app = build_appdef(train_run(minNodes=2, maxNodes=2, gpusPerNode=8), "/run/job.yaml", "img")
    launch = replica_launch(app, app_id="default-sd2-cc-1a2b", rank0_host="sd2-cc-0.sd2-cc")
    text = " ".join(launch.argv) + " ".join(launch.env.values())
    assert "${app_id}" not in text and "${rank0_env}" not in text
    assert launch.env["TORCHX_RANK0_HOST"] == "sd2-cc-0.sd2-cc"
    assert launch.ports == {"c10d": 29500}
    # What a pod's shell makes of it: the endpoint resolves through the env var the pod gets.
    assert launch.argv[:2] == ["bash", "-c"]
    inner = shlex.split(launch.argv[2])
    assert flag(inner, "--rdzv_id") == "default-sd2-cc-1a2b"
    echoed = subprocess.run(
        ["bash", "-c", f"echo {flag(inner, '--rdzv_endpoint')}"],
        env={"TORCHX_RANK0_HOST": "sd2-cc-0.sd2-cc"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert echoed == "sd2-cc-0.sd2-cc:29500"


def test_building_does_not_mutate_the_callers_env() -> None:
    extra = {"A": "1"}
    build_appdef(train_run(), "/j", "img", env=extra)
    assert extra == {"A": "1"}


@pytest.mark.parametrize("restarts", [0, 3])
def test_the_restart_flag_is_added_once(restarts: int) -> None:
    command = torchrun_command(build_appdef(train_run(maxRestarts=restarts), "/j", "img"))
    assert command.count("--max-restarts") == 1 and flag(command, "--max-restarts") == str(restarts)


def test_a_local_run_asking_for_gpus_this_machine_lacks_is_refused_before_starting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    from commoncanvas.train.launch import run_local

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with pytest.raises(ValueError, match=r"2 node\(s\) x 4 GPUs .* this machine has 4 GPUs; lower them"):
        run_local(train_run(minNodes=1, maxNodes=2, gpusPerNode=4), "/nonexistent/job.yaml")

"""TrainRun through TorchX's local scheduler: two CPU processes (gloo) under torchrun, from the same
builder as the operator's AppDef; a rank killed mid-run restarts the group from a checkpoint."""

from __future__ import annotations

import json
import re
import signal
import socket
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from tests.integration.test_latents import write_captions

from commoncanvas.specs import TrainRun
from commoncanvas.train.checkpoint import CheckpointStore, Progress
from commoncanvas.train.launch import run_local

pytestmark = pytest.mark.integration
SAMPLES = 64
MICRO_BATCH = 2
RANKS = 2
IMAGES_PER_STEP = MICRO_BATCH * RANKS
STEPS_PER_EPOCH = SAMPLES // IMAGES_PER_STEP


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The ranks inherit these: the tiny pipeline and any shard cache stay inside the test.
    monkeypatch.setenv("COMMONCANVAS_MODEL_CACHE", str(tmp_path / "models"))
    monkeypatch.setenv("COMMONCANVAS_DATA_CACHE", str(tmp_path / "data-cache"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def write_job(tmp_path: Path, max_steps: int, interval: int) -> tuple[TrainRun, Path]:
    write_captions(tmp_path / "captions", SAMPLES)
    run = TrainRun.model_validate(
        {
            "metadata": {"name": "tiny-elastic"},
            "spec": {
                "dataset": {"uris": [str(tmp_path / "captions")], "loaderWorkers": 0},
                "output": {"uri": str(tmp_path / "out")},
                "checkpoint": {"uri": str(tmp_path / "checkpoints"), "intervalSteps": interval, "keep": 2},
                "resolution": 64,
                "model": {"architecture": "tiny"},
                "schedule": {
                    "globalBatchSize": IMAGES_PER_STEP,
                    "microBatchSize": MICRO_BATCH,
                    "warmupSteps": 0,
                    "maxSteps": max_steps,
                },
                # Two CPU nodes; the local runner runs them as two processes of one torchrun agent.
                "distributed": {"minNodes": 1, "maxNodes": RANKS, "gpusPerNode": 0, "maxRestarts": 2},
            },
        }
    )
    job_file = tmp_path / "train.yaml"
    job_file.write_text(yaml.safe_dump(run.model_dump(by_alias=True, exclude_none=True)))
    return run, job_file


def training_ranks() -> dict[int, psutil.Process]:
    """This test's training processes by rank: the children of the torchrun agent it started."""
    ranks: dict[int, psutil.Process] = {}
    for process in psutil.Process().children(recursive=True):
        try:
            if not any(part.endswith("torchrun") for part in process.cmdline()[:2]):
                continue
            for worker in process.children():
                rank = worker.environ().get("RANK")
                if rank is not None:
                    ranks[int(rank)] = worker
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue  # it ended while we looked
    return ranks


def latest_checkpoint(root: Path) -> int:
    latest = root / "latest"
    return int(json.loads(latest.read_text())["step"]) if latest.is_file() else 0


def rank_logs(log_dir: str) -> str:
    return "\n".join(p.read_text(errors="replace") for p in Path(log_dir).rglob("*.log"))


def test_a_killed_rank_restarts_the_group_which_resumes_from_its_newest_checkpoint(tmp_path: Path) -> None:
    max_steps = STEPS_PER_EPOCH + STEPS_PER_EPOCH // 2  # one and a half epochs
    run, job_file = write_job(tmp_path, max_steps=max_steps, interval=4)
    killed: dict[str, Any] = {}

    def kill_rank_one_after_a_checkpoint() -> None:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            step = latest_checkpoint(tmp_path / "checkpoints")
            ranks = training_ranks()
            if step >= 8 and 1 in ranks:
                killed.update(checkpoint=step, pid=ranks[1].pid)
                ranks[1].send_signal(signal.SIGKILL)
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_rank_one_after_a_checkpoint, daemon=True)
    killer.start()
    result = run_local(run, job_file, log_dir=tmp_path / "logs", rdzv_port=free_port(), wait_interval=0.5)
    killer.join(timeout=1)
    logs = rank_logs(result["log_dir"])
    assert result["state"] == "SUCCEEDED", result["error"]
    assert killed, "rank 1 was never killed: the run finished before its second checkpoint"
    assert killed["checkpoint"] < max_steps, "the kill must land before the last step"

    # torchrun restarted the whole group, and it went on from the newest checkpoint, not from scratch.
    resumed = [int(s) for s in re.findall(r"resumed at step (\d+)", logs)]
    assert resumed and min(resumed) >= killed["checkpoint"], (resumed, killed)
    status = json.loads((tmp_path / "out" / "status.json").read_text())
    assert status["restarts"] >= 1 and status["step"] == max_steps and status["phase"] == "Succeeded"

    # What the checkpoints recorded: every step once, in order, and no photo twice within an epoch.
    store = CheckpointStore(str(tmp_path / "checkpoints"), keep=2)
    state = json.loads((tmp_path / "checkpoints" / f"step-{max_steps:08d}" / "state.json").read_text())
    progress = Progress(**{k: v for k, v in state.items() if k in Progress.__dataclass_fields__})
    records = list(store.seen_records(progress))
    for rank in range(RANKS):
        steps = [r["step"] for r in records if r["rank"] == rank]
        assert steps == sorted(steps), f"rank {rank}: the step count went back"
    assert Counter(r["step"] for r in records) == {step: IMAGES_PER_STEP for step in range(1, max_steps + 1)}
    by_epoch: dict[int, list[int]] = defaultdict(list)
    for record in records:
        by_epoch[record["epoch"]].append(record["photo_id"])
    assert sorted(by_epoch[0]) == sorted(500 + n for n in range(SAMPLES)), "epoch 0: each photo exactly once"
    assert len(by_epoch[1]) == len(set(by_epoch[1])) == (max_steps - STEPS_PER_EPOCH) * IMAGES_PER_STEP
    assert (tmp_path / "out" / "pipeline" / "model_index.json").is_file()


def test_two_processes_train_to_the_end_through_the_local_scheduler(tmp_path: Path) -> None:
    run, job_file = write_job(tmp_path, max_steps=4, interval=2)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    result = run_local(run, job_file, log_dir=tmp_path / "logs", rdzv_port=free_port(), wait_interval=0.5)
    assert result["succeeded"], result["error"]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers, (
        "Ctrl-C must work as before once training is done"
    )
    assert Path(result["log_dir"]).is_dir() and result["handle"].startswith("local_cwd://")
    logs = rank_logs(result["log_dir"])
    assert "2 processes x micro-batch 2" in logs, "both ranks joined one group"
    summary = json.loads((tmp_path / "out" / "status.json").read_text())
    assert summary["step"] == 4 and summary["imagesSeen"] == 4 * IMAGES_PER_STEP
    assert latest_checkpoint(tmp_path / "checkpoints") == 4


# A stand-in rank for the multi-node case: two torchrun agents on this host (what two pods are on a
# cluster). The real trainer cannot run that way on one host: streaming shares memory per host.
STAND_IN_RANK = """
import json, os, sys, time
from pathlib import Path
import torch, torch.distributed as dist
out = Path(os.environ["STAND_IN_OUT"])
dist.init_process_group("gloo")
rank = dist.get_rank()
(out / f"rank{rank}.pid").write_text(str(os.getpid()))
checkpoint = out / "checkpoint"
start = int(checkpoint.read_text()) if checkpoint.exists() else 0
with (out / "starts.jsonl").open("a") as log:
    log.write(json.dumps({"rank": rank, "restart": int(os.environ["TORCHELASTIC_RESTART_COUNT"]),
                          "start": start, "world": dist.get_world_size()}) + "\\n")
for step in range(start, 40):
    dist.all_reduce(torch.ones(1))
    time.sleep(0.05)
    if rank == 0 and (step + 1) % 5 == 0:
        (out / "checkpoint.tmp").write_text(str(step + 1))
        os.replace(out / "checkpoint.tmp", checkpoint)
dist.barrier()
dist.destroy_process_group()
"""


def test_two_nodes_restart_together_when_one_loses_a_rank(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchx.runner import get_runner

    from commoncanvas.train import launch

    (tmp_path / "stand_in_rank.py").write_text(STAND_IN_RANK)
    monkeypatch.setattr(launch, "TRAIN_MODULE", "stand_in_rank")
    run, job_file = write_job(tmp_path, max_steps=1, interval=1)
    two_nodes = run.model_copy(deep=True)
    two_nodes.spec.distributed.min_nodes = 2
    env = {
        "PYTHONPATH": str(tmp_path),
        "STAND_IN_OUT": str(tmp_path),
        "PATH": str(Path(sys.executable).parent),
    }
    app = launch.build_appdef(two_nodes, str(job_file), image=str(tmp_path), env=env, rdzv_port=free_port())
    assert app.roles[0].num_replicas == 2

    def kill_rank_one() -> None:
        checkpoint = tmp_path / "checkpoint"
        while not (checkpoint.exists() and int(checkpoint.read_text()) >= 10):
            time.sleep(0.02)
        psutil.Process(int((tmp_path / "rank1.pid").read_text())).send_signal(signal.SIGKILL)

    threading.Thread(target=kill_rank_one, daemon=True).start()
    with get_runner() as runner:
        handle = runner.run(app, scheduler="local_cwd", cfg={"log_dir": str(tmp_path / "logs")})
        status = runner.wait(handle, wait_interval=0.5)
    assert status is not None and status.state.name == "SUCCEEDED", launch.log_tail(tmp_path / "logs")
    starts = [json.loads(line) for line in (tmp_path / "starts.jsonl").read_text().splitlines()]
    # Two rounds of both ranks: a fresh one, then one where both resumed.  (The restart count is the
    # agent's own: the agent whose rank died counts a restart, the surviving one may re-join as 0.)
    fresh = sorted(s["rank"] for s in starts if s["start"] == 0)
    resumed = sorted(s["rank"] for s in starts if s["start"] >= 10)
    assert (fresh, resumed) == ([0, 1], [0, 1]), starts
    assert len(starts) == 4 and all(s["world"] == 2 for s in starts)
    assert max(s["restart"] for s in starts) == 1, "the group must have been restarted"

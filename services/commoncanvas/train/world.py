"""Who this training process is among its peers: rank, world size, device, and the few collectives the
trainer needs.  torchrun (or TorchX's `dist.ddp`) sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR and MASTER_PORT; without them this is a single process and no process group is created."""

from __future__ import annotations

import os
import socket
from collections import Counter
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    local_size: int
    device: torch.device
    restarts: int
    # The ranks sharing this machine (and its shared memory): torchrun's node unless several torchrun
    # nodes run on one host, as the local runner does.
    host_rank: int = 0
    host_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def nodes(self) -> int:
        return max(1, self.size // self.local_size)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


def init_world() -> World:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPUs); no env = one process."""
    size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # device_id binds NCCL's communicator to this GPU up front (no guessing at the first collective).
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    rank, local_size = _env_int("RANK", 0), _env_int("LOCAL_WORLD_SIZE", size)
    host_rank, host_size = _place_on_host(rank, size, local_rank, local_size)
    return World(
        rank=rank,
        size=size,
        local_rank=local_rank,
        local_size=local_size,
        device=device,
        restarts=_env_int("TORCHELASTIC_RESTART_COUNT", 0),
        host_rank=host_rank,
        host_size=host_size,
    )


def _place_on_host(rank: int, size: int, local_rank: int, local_size: int) -> tuple[int, int]:
    """(this rank among its machine's ranks, how many).  Only used where it is regular: every machine
    holding the same number of consecutive ranks; otherwise torchrun's node is taken as is."""
    if size == 1:
        return 0, 1
    hosts: list[Any] = [None] * size
    dist.all_gather_object(hosts, socket.gethostname())
    per_host = Counter(hosts)
    same = [r for r, host in enumerate(hosts) if host == hosts[rank]]
    regular = len(set(per_host.values())) == 1 and same == list(range(same[0], same[0] + len(same)))
    all_regular: list[Any] = [None] * size
    dist.all_gather_object(all_regular, regular)
    return (same.index(rank), len(same)) if all(all_regular) else (local_rank, local_size)


def close_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def gather_to_main(world: World, value: T) -> list[T]:
    """Every rank's `value`, in rank order, on rank 0 (other ranks get an empty list)."""
    if not world.distributed:
        return [value]
    gathered: list[Any] = [None] * world.size if world.is_main else []
    dist.gather_object(value, gathered if world.is_main else None, dst=0)
    return gathered


def sum_over_ranks(world: World, values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks (one collective); the input is left as is."""
    total = values.detach().clone()
    if world.distributed:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total

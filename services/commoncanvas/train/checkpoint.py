"""Checkpoints of a training run in a local directory or under an s3:// prefix.

Layout under `checkpoint.uri`:

    step-00001000/unet.safetensors   the UNet's full weights
                  ema.safetensors    the EMA's full weights (when enabled)
                  optimizer.pt       AdamW's full state, keyed by parameter name
                  trainer.pt         LR scheduler, loss scaler, EMA counter, every rank's RNG states
                  state.json         step, images seen, epoch, the dataloader's state, the seen parts
    seen/upto-00001000.jsonl         the samples trained on since the previous checkpoint, all ranks
    latest                           {"step": 1000, "path": "step-00001000"}, written last

A checkpoint exists once `latest` points at it: files of a step whose write was interrupted are never
read, and are removed by the next save.  Only rank 0 writes; full state dicts are gathered to it (under
FSDP too), so a run may resume with another world size or switch between DDP and FSDP.  The samples
seen so far are the `seen/` parts listed in the newest state.json: parts are never pruned (they are the
attribution record); orphans of an interrupted save are simply not listed.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.optim.lr_scheduler import LRScheduler

from commoncanvas import metrics
from commoncanvas.models import fetch_to_cache
from commoncanvas.storage import Storage, open_storage
from commoncanvas.train.model import ema_weights_swapped_in
from commoncanvas.train.world import World, barrier, gather_to_main

log = logging.getLogger(__name__)

LATEST = "latest"
STEP_DIR = re.compile(r"^step-(\d{8})/")
# Gathered on rank 0 only (as CPU tensors), so rank 0 alone needs the memory for the full state.
GATHER_ON_MAIN = StateDictOptions(full_state_dict=True, cpu_offload=True)
LOAD_FULL = StateDictOptions(full_state_dict=True)


def step_dir(step: int) -> str:
    return f"step-{step:08d}"


def seen_part(step: int) -> str:
    return f"seen/upto-{step:08d}.jsonl"


@dataclass
class Progress:
    """Where the run is: counters every rank keeps, saved in state.json."""

    step: int = 0
    images_seen: int = 0
    epoch: int = 0
    train_seconds: float = 0.0
    seen_parts: list[str] = field(default_factory=list)
    last_checkpoint: str = ""


@dataclass
class Trainable:
    """What a checkpoint saves and restores, besides Progress."""

    unet: torch.nn.Module  # the unwrapped UNet (DDP shares its parameters; FSDP2 shards them in place)
    optimizer: torch.optim.Optimizer
    lr_scheduler: LRScheduler
    ema: Any  # diffusers.training_utils.EMAModel | None
    loader: Any  # streaming.StreamingDataLoader
    grad_scaler: torch.amp.GradScaler


def gather_weights(unet: torch.nn.Module, ema: Any = None) -> dict[str, torch.Tensor]:
    """Collective: the UNet's full weights on rank 0 (empty elsewhere under FSDP), the EMA's if given."""
    with ema_weights_swapped_in(unet, ema):
        state = get_model_state_dict(unet, options=GATHER_ON_MAIN)
        # Copies: on CPU the "offloaded" state dict holds the parameters themselves, which get the
        # UNet's own weights back when the EMA is swapped out again.
        return {name: tensor.clone() for name, tensor in state.items() if isinstance(tensor, torch.Tensor)}


def rng_state() -> dict[str, Any]:
    """This process's RNG states, as types `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointStore:
    def __init__(self, uri: str, keep: int) -> None:
        self.storage: Storage = open_storage(uri)
        self.keep = keep

    def latest_step(self) -> int | None:
        if not self.storage.exists(LATEST):
            return None
        return int(json.loads(self.storage.read_text(LATEST))["step"])

    # --- save ----------------------------------------------------------------------------------------

    def save(self, trainable: Trainable, progress: Progress, seen: list[dict[str, Any]], world: World) -> str:
        """Collective: every rank calls it at the same step.  Returns the checkpoint's URI."""
        step = progress.step
        seen_by_rank = gather_to_main(world, seen)
        rng_by_rank = gather_to_main(world, rng_state())
        model_state, optimizer_state = get_state_dict(
            trainable.unet, trainable.optimizer, options=GATHER_ON_MAIN
        )
        ema_state = gather_weights(trainable.unet, trainable.ema) if trainable.ema is not None else {}
        loader_state = trainable.loader.state_dict()
        part = seen_part(step)
        progress.seen_parts = [*progress.seen_parts, part]
        progress.last_checkpoint = self.storage.url(step_dir(step))
        if world.is_main:
            started = time.perf_counter()
            trainer = {
                "lr_scheduler": trainable.lr_scheduler.state_dict(),
                "grad_scaler": trainable.grad_scaler.state_dict(),
                "ema_updates": trainable.ema.optimization_step if trainable.ema is not None else 0,
                "rng": rng_by_rank,
            }
            state = {**asdict(progress), "world_size": world.size, "dataloader": loader_state}
            self._write(step, model_state, ema_state, optimizer_state, trainer, state, seen_by_rank)
            metrics.TRAIN_LAST_CHECKPOINT.set_to_current_time()  # published: `latest` points at it
            log.info(
                "checkpoint %s written in %.1fs", progress.last_checkpoint, time.perf_counter() - started
            )
        barrier(world)
        return progress.last_checkpoint

    def _write(
        self,
        step: int,
        model_state: dict[str, Any],
        ema_state: dict[str, Any],
        optimizer_state: dict[str, Any],
        trainer: dict[str, Any],
        state: dict[str, Any],
        seen_by_rank: list[list[dict[str, Any]]],
    ) -> None:
        folder = step_dir(step)
        self.storage.delete_prefix(folder)  # what an interrupted earlier save of this step left
        with tempfile.TemporaryDirectory(prefix="commoncanvas-checkpoint-") as tmp:
            local = Path(tmp)
            seen_path = local / "seen.jsonl"
            with seen_path.open("w", encoding="utf-8") as handle:
                for records in seen_by_rank:
                    handle.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
            self.storage.upload_file(seen_part(step), seen_path)
            save_file(_contiguous(model_state), str(local / "unet.safetensors"))
            if ema_state:
                save_file(_contiguous(ema_state), str(local / "ema.safetensors"))
            torch.save(optimizer_state, local / "optimizer.pt")
            torch.save(trainer, local / "trainer.pt")
            for path in sorted(local.iterdir()):
                if path.name != "seen.jsonl":
                    self.storage.upload_file(f"{folder}/{path.name}", path)
        self.storage.write_text(f"{folder}/state.json", json.dumps(state, indent=1))
        self.storage.write_text(LATEST, json.dumps({"step": step, "path": folder}))
        self._prune(step)

    def _prune(self, latest: int) -> None:
        """Keep the newest `keep` checkpoints up to `latest`; anything newer is an interrupted save's."""
        steps = sorted({int(m.group(1)) for key in self.storage.list("") if (m := STEP_DIR.match(key))})
        kept = [s for s in steps if s <= latest][-self.keep :]
        for old in (s for s in steps if s not in kept):
            self.storage.delete_prefix(step_dir(old))

    # --- restore -------------------------------------------------------------------------------------

    def restore(self, trainable: Trainable, world: World) -> Progress | None:
        """Collective: load the newest checkpoint into `trainable`; None when there is none."""
        step = self.latest_step()
        if step is None:
            return None
        folder = self._local_copy(step)
        try:
            state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
            if trainable.ema is not None:
                # EMA first: load its weights into the UNet, take them as the EMA's, then the UNet's own.
                ema_file = folder / "ema.safetensors"
                ema_weights: dict[str, Any] = load_file(
                    str(ema_file if ema_file.exists() else folder / "unet.safetensors")
                )
                set_model_state_dict(trainable.unet, ema_weights, options=LOAD_FULL)
                trainable.ema.shadow_params = [p.detach().clone() for p in trainable.unet.parameters()]
            set_state_dict(
                trainable.unet,
                trainable.optimizer,
                model_state_dict=dict(load_file(str(folder / "unet.safetensors"))),
                optim_state_dict=torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True),
                options=LOAD_FULL,
            )
            trainer = torch.load(folder / "trainer.pt", map_location="cpu", weights_only=True)
        finally:
            barrier(world)  # every rank of this node has read the files
            if world.is_local_main and folder.is_relative_to(_scratch()):
                shutil.rmtree(folder, ignore_errors=True)
        trainable.lr_scheduler.load_state_dict(trainer["lr_scheduler"])
        trainable.grad_scaler.load_state_dict(trainer["grad_scaler"])
        if trainable.ema is not None:
            trainable.ema.optimization_step = int(trainer["ema_updates"])
        if len(trainer["rng"]) == world.size:
            set_rng_state(trainer["rng"][world.rank])
        else:
            log.info(
                "world size changed (%d -> %d): fresh RNG streams per rank", len(trainer["rng"]), world.size
            )
        trainable.loader.load_state_dict(state["dataloader"])
        fields = Progress.__dataclass_fields__
        return Progress(**{k: v for k, v in state.items() if k in fields})

    def _local_copy(self, step: int) -> Path:
        """The step's directory on this machine: itself when local, else downloaded once per node."""
        if not self.storage.uri.startswith("s3://"):
            return Path(self.storage.uri) / step_dir(step)
        return fetch_to_cache(self.storage.child(step_dir(step)), None, _scratch())

    # --- what was trained on -------------------------------------------------------------------------

    def seen_records(self, progress: Progress) -> Iterator[dict[str, Any]]:
        """Every sample trained on up to `progress`'s checkpoint, in order (repeats across epochs kept)."""
        for part in progress.seen_parts:
            # JSON lines split on "\n" alone: a title may hold U+2028 or U+0085, which splitlines() cuts at.
            for line in self.storage.read_text(part).split("\n"):
                if line.strip():
                    yield json.loads(line)


def _contiguous(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    # safetensors stores dense row-major tensors; channels-last weights are strided otherwise.
    return {name: tensor.contiguous() for name, tensor in state.items()}


def _scratch() -> Path:
    return Path(tempfile.gettempdir()) / "commoncanvas-checkpoints"

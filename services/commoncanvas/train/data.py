"""The training data: the captioned dataset (or its precomputed latents) as one mosaicml-streaming
`StreamingDataset`, with one `Stream` per (root, split) of `spec.dataset`.

Weighting: `dataset.mix` gives each split a relative share of every epoch.  With one split the epoch is
that split, each sample once.  With several, each (root, split) stream gets the `proportion`
weight(split) x samples(stream) / samples(split), so roots of one split keep their natural ratio and
streaming up- or down-samples a split to its share (a split below its share repeats within the epoch).

Each sample carries its attribution fields (`photo_id`, `split`, `license_code`, ...) through the batch,
so the trainer records exactly which samples it trained on.  `StreamingDataLoader.state_dict()` goes into
every checkpoint, so a resumed run continues the epoch where the checkpoint left it.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from streaming import Stream, StreamingDataLoader, StreamingDataset

from commoncanvas.caption.unitplan import InputMissing
from commoncanvas.licenses import evaluation_root_problem
from commoncanvas.scrape.dedup import CREDITS_COLUMN
from commoncanvas.specs.common import SpecError
from commoncanvas.specs.train import TrainRunSpec
from commoncanvas.storage import open_storage
from commoncanvas.train.datacard import ATTRIBUTION_FIELDS, DatasetStream, LicenseViolation, license_problem
from commoncanvas.train.latents import NULL_TEXT_KEY, latents_uri, load_pixels
from commoncanvas.train.world import World

# Attribution fields plus the captioner, where the dataset has it (the latents phase drops it).
RECORD_FIELDS = (*ATTRIBUTION_FIELDS, CREDITS_COLUMN, "caption_model", "caption_model_revision")


class TrainingDataMissing(InputMissing):
    """A stream of the training set is not there (yet): the message names the URI and where it came from."""


def dataset_roots(spec: TrainRunSpec, resolve_ref: Callable[[str], str] | None) -> list[str]:
    """The captioned dataset roots: `dataset.uris`, or the output of `dataset.captionJobRef`."""
    ref = spec.dataset.caption_job_ref
    if ref:
        if resolve_ref is None:
            raise TrainingDataMissing(
                f"dataset.captionJobRef {ref!r} cannot be resolved here; give dataset.uris instead"
            )
        return [resolve_ref(ref)]
    return list(spec.dataset.uris)


def plan_streams(
    roots: list[str], spec: TrainRunSpec, origin: str
) -> list[tuple[DatasetStream, float | None]]:
    """Each (root, split) stream with its sample count and streaming `proportion` (None = natural)."""
    splits = [mix.split for mix in spec.dataset.mix]
    if len(set(splits)) != len(splits):
        raise SpecError(f"dataset.mix names a split more than once: {splits}")
    streams: list[DatasetStream] = []
    for root in roots:
        if evaluation_root_problem(root):
            raise SpecError(f"the dataset from {origin}: {evaluation_root_problem(root)}")
        for split in splits:
            uri = f"{root.rstrip('/')}/{split}"
            storage = open_storage(uri)
            if not storage.exists("index.json"):
                raise TrainingDataMissing(
                    f"{uri}/index.json does not exist: the {split} split from {origin} is missing or not "
                    "finished (its stage writes index.json once all its units are done)"
                )
            shards = json.loads(storage.read_text("index.json"))["shards"]
            samples = sum(int(shard["samples"]) for shard in shards)
            if samples:  # streaming refuses an empty stream; a root may lack a split
                streams.append(DatasetStream(uri, split, samples))
    empty = [split for split in splits if not any(s.split == split for s in streams)]
    if empty:
        raise TrainingDataMissing(
            f"the {', '.join(empty)} split from {origin} holds no samples; remove it from dataset.mix"
        )
    if len(splits) == 1:
        return [(stream, None) for stream in streams]
    weight: dict[str, float] = {mix.split: mix.weight for mix in spec.dataset.mix}
    per_split: dict[str, int] = {
        split: sum(s.samples for s in streams if s.split == split) for split in splits
    }
    return [(s, weight[s.split] * s.samples / per_split[s.split]) for s in streams]


def null_text_hidden(spec: TrainRunSpec) -> torch.Tensor:
    """The text encoder's states for the empty caption, which the LATENTS phase stores once."""
    storage = open_storage(latents_uri(spec))
    if not storage.exists(NULL_TEXT_KEY):
        raise TrainingDataMissing(
            f"{storage.url(NULL_TEXT_KEY)} does not exist: the LATENTS phase has not finished (its finalize "
            "writes it); run it first or turn optimizations.precomputeLatents off"
        )
    return torch.from_numpy(np.load(io.BytesIO(storage.read_bytes(NULL_TEXT_KEY))).astype(np.float32))


def make_streams(planned: list[tuple[DatasetStream, float | None]], cache_dir: Path) -> list[Stream]:
    """Local roots are read in place; s3:// roots are cached under `cache_dir`, one directory each."""
    streams = []
    for stream, proportion in planned:
        if stream.uri.startswith("s3://"):
            key = hashlib.sha256(stream.uri.encode()).hexdigest()[:16]
            streams.append(Stream(remote=stream.uri, local=str(cache_dir / key), proportion=proportion))
        else:
            local = os.path.abspath(stream.uri.removeprefix("file://"))
            streams.append(Stream(local=local, proportion=proportion))
    return streams


def data_cache_dir(run_name: str, world: World) -> Path:
    """Where this machine caches s3:// shards: per run and attempt, shared by the machine's ranks.
    A restarted attempt gets a new directory because streaming refuses one that a dead attempt's shared
    memory still names; the machine's first rank deletes the earlier attempts'."""
    base = Path(
        os.environ.get("COMMONCANVAS_DATA_CACHE") or Path(tempfile.gettempdir()) / "commoncanvas-data"
    )
    run_id = re.sub(r"[^A-Za-z0-9_.-]", "_", os.environ.get("TORCHELASTIC_RUN_ID", "local"))
    attempt = f"attempt-{run_id}-{world.restarts}"
    if world.host_rank == 0:
        for old in (base / run_name).glob("attempt-*"):
            if old.name != attempt:
                shutil.rmtree(old, ignore_errors=True)
    return base / run_name / attempt


@contextlib.contextmanager
def streaming_nodes_are_hosts(world: World) -> Iterator[None]:
    """Streaming takes a node to be the ranks that share shared memory, from LOCAL_WORLD_SIZE; torchrun
    sets it per torchrun node.  Where several torchrun nodes share a machine (the local runner) each
    would register the same shared-memory names and collide, so streaming is told about machines."""
    saved = {name: os.environ.get(name) for name in ("LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    os.environ.update(LOCAL_RANK=str(world.host_rank), LOCAL_WORLD_SIZE=str(world.host_size))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def drops_caption(seed: int, epoch: int, index: int, probability: float) -> bool:
    """Whether sample `index` trains with an empty caption in `epoch`: a pure function of its inputs, so
    every rank, worker and resumed run agrees, and a different share of samples is dropped each epoch."""
    if probability <= 0:
        return False
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < probability


def record_of(sample: dict[str, Any]) -> dict[str, Any]:
    """The fields that say which photo this is and under which license it was trained on."""
    record = {name: sample[name] for name in RECORD_FIELDS if name in sample}
    record["photo_id"] = int(record["photo_id"])
    return record


class _TrainingSamples(StreamingDataset):
    """Shared by both variants: the license guard, caption dropout and the current epoch."""

    def __init__(self, *, streams: list[Stream], micro_batch: int, seed: int, caption_dropout: float) -> None:
        for attempt in range(3):
            try:
                super().__init__(
                    # A copy each time: streaming writes the derived weights into the Stream objects.
                    streams=copy.deepcopy(streams),
                    batch_size=micro_batch,  # streaming partitions by it: it must equal the loader's
                    shuffle=True,
                    shuffle_seed=seed,
                )
                break
            except FileExistsError:
                # Two processes starting datasets at once on one machine can race for the same
                # shared-memory prefix; the loser finds the next free one on a second look.  Not in a
                # process group: streaming's barriers would then be out of step between ranks.
                if attempt == 2 or torch.distributed.is_initialized():
                    raise
                time.sleep(0.5 + random.random())
        self.seed = seed
        self.caption_dropout = caption_dropout

    def _checked(self, sample_id: int, retry: int) -> dict[str, Any]:
        sample: dict[str, Any] = super().get_item(sample_id, retry)
        problem = license_problem(str(sample["license_code"]), str(sample["split"]))
        if problem:
            # The catalog's policy should have excluded it; never train on it, whatever wrote the data.
            raise LicenseViolation(
                f"{self.shard_of(sample_id)}: photo {sample['photo_id']} (sample {sample_id}): {problem}; "
                "nothing was trained on it: rebuild that dataset with the default license policy"
            )
        return sample

    def shard_of(self, sample_id: int) -> str:
        """'dataset <stream root>, shard <basename>' of a sample, for a one-line error."""
        shard_id, _ = self.spanner[sample_id]
        stream = self.streams[int(self.stream_per_shard[shard_id])]
        raw = getattr(self.shards[shard_id], "raw_data", None)  # MDS shards have it
        return f"dataset {stream.remote or stream.local}, shard {raw.basename if raw else shard_id}"

    def _drops_caption(self, sample_id: int) -> bool:
        epoch = max(0, self.next_epoch - 1)  # the epoch being iterated (shared memory, right in workers)
        return drops_caption(self.seed, epoch, sample_id, self.caption_dropout)


class CaptionedImages(_TrainingSamples):
    """Captioned photographs -> {pixels (3,R,R) in [-1,1], input_ids (max length), record}."""

    def __init__(
        self,
        *,
        streams: list[Stream],
        micro_batch: int,
        seed: int,
        caption_dropout: float,
        resolution: int,
        tokenizer: Any,
    ) -> None:
        super().__init__(streams=streams, micro_batch=micro_batch, seed=seed, caption_dropout=caption_dropout)
        self.resolution = resolution
        self.tokenizer = tokenizer

    def get_item(self, sample_id: int, retry: int = 7) -> Any:
        sample = self._checked(sample_id, retry)
        caption = "" if self._drops_caption(sample_id) else str(sample["caption"])
        input_ids = self.tokenizer(
            caption,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids[0]
        return {
            "pixels": load_pixels(sample["image"], self.resolution),
            "input_ids": input_ids,
            "record": record_of(sample),
        }


class PrecomputedLatents(_TrainingSamples):
    """The LATENTS phase's output (commoncanvas.train.latents: scaled VAE latent means and the text
    encoder's states, float16, plus every captioned column but the image) -> {latents (4,h,w),
    text_hidden (77,dim), record}, the latents from `column` (one per stage resolution,
    latents.latents_column); a dropped caption gets the phase's states of the empty caption."""

    def __init__(
        self,
        *,
        streams: list[Stream],
        micro_batch: int,
        seed: int,
        caption_dropout: float,
        empty_text_hidden: torch.Tensor,
        column: str,
    ) -> None:
        super().__init__(streams=streams, micro_batch=micro_batch, seed=seed, caption_dropout=caption_dropout)
        self.empty_text_hidden = empty_text_hidden.detach().to("cpu", torch.float32)
        self.column = column

    def get_item(self, sample_id: int, retry: int = 7) -> Any:
        sample = self._checked(sample_id, retry)
        if self._drops_caption(sample_id):
            text_hidden = self.empty_text_hidden
        else:
            text_hidden = torch.from_numpy(np.asarray(sample["text_hidden"], dtype=np.float32))
        return {
            "latents": torch.from_numpy(np.asarray(sample[self.column], dtype=np.float32)),
            "text_hidden": text_hidden,
            "record": record_of(sample),
        }


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the tensors; keep the records as a list.  A tensor comes first: streaming's loader counts
    samples by the length of the batch's first value."""
    batch: dict[str, Any] = {
        key: torch.stack([sample[key] for sample in samples]) for key in samples[0] if key != "record"
    }
    batch["records"] = [sample["record"] for sample in samples]
    return batch


def make_loader(dataset: StreamingDataset, micro_batch: int, workers: int) -> StreamingDataLoader:
    return StreamingDataLoader(
        dataset,
        batch_size=micro_batch,
        num_workers=workers,
        collate_fn=collate,
        # Every rank gets the same number of full batches, so ranks never disagree on the step count.
        drop_last=True,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        prefetch_factor=2 if workers else None,
        # Its own generator: starting a pass (a resume, a new stage) then draws its worker seed from it,
        # not from the global RNG the noise and timesteps come from, which a checkpoint restores.
        generator=torch.Generator().manual_seed(0),
    )


def epochs_of(loader: StreamingDataLoader, dataset: StreamingDataset) -> Iterator[tuple[int, dict[str, Any]]]:
    """(epoch, micro-batch) forever: one pass of the loader per epoch, resuming mid-epoch after a load."""
    empty_passes = 0
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield dataset.next_epoch - 1, batch
        empty_passes = 0 if yielded else empty_passes + 1
        # A resume exactly at the end of an epoch yields nothing once; twice means no full batch exists.
        if empty_passes > 1:
            raise RuntimeError(
                f"the training set yields no full micro-batch per rank ({len(dataset)} samples per rank): "
                "lower schedule.microBatchSize or add data"
            )

"""A small writer of mosaicml-streaming MDS shards (format version 2, raw, uncompressed).

The scraper writes its catalog with this instead of `streaming.MDSWriter` for one reason: importing
`streaming` imports torch and transformers (seconds of CPU per process, gigabytes in the CPU worker
image) while the scraper needs neither.  The output is plain MDS: `streaming.StreamingDataset` reads it,
and a test holds it to that.  Stages that run models use `streaming.MDSWriter` itself.

Layout of a shard: uint32 sample count, uint32 offsets (count + 1, absolute), the writer's config as
JSON, then the samples; a sample is the uint32 sizes of its variable-size columns, then every column's
bytes in column-name order.
"""

from __future__ import annotations

import json
import random
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_ENCODERS: dict[str, Callable[[Any], bytes]] = {
    "bytes": bytes,
    "str": lambda value: str(value).encode("utf-8"),
    "int": lambda value: struct.pack("<q", int(value)),
    "json": lambda value: json.dumps(value).encode("utf-8"),
}
_FIXED_SIZES = {"int": 8}


class MDSShardWriter:
    """Writes `shard.NNNNN.mds` files and the `index.json` listing them into `out`."""

    def __init__(self, out: Path, columns: dict[str, str], size_limit: int = 64 << 20) -> None:
        unknown = {name: enc for name, enc in columns.items() if enc not in _ENCODERS}
        if unknown:
            raise ValueError(f"unsupported MDS encodings {unknown}; supported: {sorted(_ENCODERS)}")
        self.out = out
        self.names = sorted(columns)
        self.encodings = [columns[name] for name in self.names]
        self.sizes = [_FIXED_SIZES.get(enc) for enc in self.encodings]
        self.size_limit = size_limit
        self.config = {
            "column_encodings": self.encodings,
            "column_names": self.names,
            "column_sizes": self.sizes,
            "compression": None,
            "format": "mds",
            "hashes": [],
            "size_limit": size_limit,
            "version": 2,
        }
        self._config_bytes = json.dumps(self.config, sort_keys=True).encode("utf-8")
        self._shard_overhead = 4 + 4 + len(self._config_bytes)  # count, final offset, config
        self._pending: list[bytes] = []
        self._shard_bytes = self._shard_overhead
        self._shards: list[dict[str, Any]] = []
        out.mkdir(parents=True, exist_ok=True)

    def encode(self, sample: dict[str, Any]) -> bytes:
        parts = [_ENCODERS[enc](sample[name]) for name, enc in zip(self.names, self.encodings, strict=True)]
        head = [len(part) for part, fixed in zip(parts, self.sizes, strict=True) if fixed is None]
        return struct.pack(f"<{len(head)}I", *head) + b"".join(parts)

    def write(self, sample: dict[str, Any]) -> None:
        encoded = self.encode(sample)
        grows_by = len(encoded) + 4  # the sample and its offset; shards split where streaming's do
        if self._pending and self._shard_bytes + grows_by > self.size_limit:
            self._flush()
        self._pending.append(encoded)
        self._shard_bytes += grows_by

    def _flush(self) -> None:
        count = len(self._pending)
        start = 4 + 4 * (count + 1) + len(self._config_bytes)
        offsets = [start]
        for sample in self._pending:
            offsets.append(offsets[-1] + len(sample))
        basename = f"shard.{len(self._shards):05d}.mds"
        with (self.out / basename).open("wb") as handle:
            handle.write(struct.pack(f"<I{count + 1}I", count, *offsets))
            handle.write(self._config_bytes)
            handle.writelines(self._pending)  # no joined copy of the whole shard
        self._shards.append(
            {
                **self.config,
                "raw_data": {"basename": basename, "bytes": offsets[-1], "hashes": {}},
                "samples": count,
                "zip_data": None,
            }
        )
        self._pending, self._shard_bytes = [], self._shard_overhead

    def finish(self) -> None:
        """Flush the last shard and write index.json (last, so a reader never sees a partial index)."""
        if self._pending:
            self._flush()
        (self.out / "index.json").write_text(
            json.dumps({"shards": self._shards, "version": 2}, sort_keys=True)
        )

    def __enter__(self) -> MDSShardWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.finish()


def shards_dataset(split_root: str, shards: list[dict[str, Any]], local: Path, attempts: int = 5) -> Any:
    """A `streaming.StreamingDataset` over some shards of a split (a unit's input): a sub-index in
    `local`, the shards fetched from `split_root` (local or s3://) on first access.

    mosaicml-streaming claims a shared-memory prefix by probing for a free one; two processes starting
    at the same moment can claim the same one and one gets FileExistsError.  A new try takes the next."""
    from streaming import StreamingDataset

    local.mkdir(parents=True, exist_ok=True)
    (local / "index.json").write_text(json.dumps({"version": 2, "shards": shards}))
    for attempt in range(attempts):
        try:
            return StreamingDataset(remote=split_root, local=str(local), shuffle=False, batch_size=1)
        except FileExistsError:
            if attempt == attempts - 1:
                raise
            time.sleep(random.uniform(0.05, 0.5))
    raise AssertionError("unreachable")

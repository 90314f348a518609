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

import bisect
import itertools
import json
import struct
import tempfile
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


class UnitShards:
    """Some shards of a split (a unit's input) read in order with mosaicml-streaming's own MDS shard
    reader: `len()` and `[index]` over the samples, each shard fetched from `split_root` (local or s3://)
    into `local` on first access, and read in place when the split is a local directory.

    Not a `StreamingDataset`: each of those keeps its shared memory open for the life of the process
    (streaming registers it with atexit) and probes every existing prefix when made, so a worker that
    loops over units would hold ~6 more descriptors per unit plus 2 per prefix ever made: after 500
    units, past a 1024-descriptor limit.  A unit reads its few shards once, in order, in one process;
    it needs no shared cache, no shuffle and no partitioning."""

    def __init__(self, split_root: str, shards: list[dict[str, Any]], local: Path) -> None:
        from streaming.base.format import reader_from_json

        from commoncanvas.storage import open_storage

        self._storage = open_storage(split_root)
        self._local = local
        self._readers: list[Any] = [reader_from_json(str(local), None, shard) for shard in shards]
        for reader in self._readers:
            name = reader.raw_data.basename
            parts = name.split("/")
            if reader.compression or name.startswith("/") or {"", ".", ".."} & set(parts):
                problem = "compressed" if reader.compression else "not a path inside the split"
                raise ValueError(
                    f"{split_root}: shard {name!r} is {problem}; unit inputs are the stages' own"
                    " uncompressed MDS shards: rerun the stage that wrote them"
                )
        # A local split is read in place: no copy of its shards.
        in_place = self._storage.local_path("")
        self._dirname = str(in_place) if in_place is not None else str(local)
        self._starts = list(itertools.accumulate((len(reader) for reader in self._readers), initial=0))
        self._ready: set[int] = set()

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} of {len(self)}")
        shard = bisect.bisect_right(self._starts, index) - 1
        reader = self._readers[shard]
        if shard not in self._ready:
            self._fetch(reader)
            self._ready.add(shard)
        return reader.get_item(index - self._starts[shard])

    def _fetch(self, reader: Any) -> None:
        reader.dirname = self._dirname
        if self._dirname == str(self._local):
            target = self._local / reader.raw_data.basename
            target.parent.mkdir(parents=True, exist_ok=True)
            self._storage.download_file(reader.raw_data.basename, target)


def read_split(uri: str | Path, cache: Path | None = None) -> list[dict[str, Any]]:
    """Every sample of an MDS split (a directory or s3:// prefix with its index.json), in index order:
    what `StreamingDataset(remote=uri)` reads, without its shared memory.  Remote shards are fetched
    into `cache` (a temporary directory when None)."""
    from commoncanvas.storage import open_storage

    shards = json.loads(open_storage(str(uri)).read_text("index.json"))["shards"]
    with tempfile.TemporaryDirectory(prefix="commoncanvas-split-") as tmp:
        samples = UnitShards(str(uri), shards, cache or Path(tmp))
        return [samples[index] for index in range(len(samples))]

"""Exact duplicates across the whole catalog, by sha256, decided once every unit is done.

Each scrape attempt writes `copies.jsonl` beside its shards: one line per written sample (sha256, plan
line, photo id, split, license, author, page). The ScrapeJob's finalize reads them all and, of every
group of identical images, keeps one: the first in plan order among the copies with the most
restrictive license (`licenses.restrictiveness`), so no sample changes license or split after it was
fetched (an NC copy of a C photo keeps the NC one). The others are dropped and their authors are
credited on the kept one. The outcome is `duplicates.json` at the catalog root; the CaptionJob skips
the dropped copies and carries the credits (`also_credited`) to the training data card.

At paper scale: ~70M lines of ~150 bytes (~10 GB) in ~7k files, read twice by 16 threads: first only
the sha256 prefixes (8 bytes each, ~560 MB of keys in one numpy array, sorted once), then the full
lines of the units holding a repeated prefix, for the groups alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from commoncanvas import units
from commoncanvas.licenses import restrictiveness
from commoncanvas.scrape.plan import PlannedSample
from commoncanvas.storage import Storage

COPIES = "copies.jsonl"  # per attempt, beside its shards
DUPLICATES = "duplicates.json"  # at the catalog root
CREDITS_COLUMN = "also_credited"  # on the kept copy, from captioning to the attribution manifest
_READERS = 16


def copy_line(sha256: str, sample: PlannedSample) -> str:
    copy = [sha256, sample.line, sample.photo_id, sample.split, sample.license_code, sample.author]
    return json.dumps([*copy, sample.author_nsid, sample.page_url], ensure_ascii=False) + "\n"


def _copies_keys(markers: dict[int, dict[str, Any]]) -> dict[int, str]:
    """Unit -> the key of its winning attempt's copies file (units that wrote nothing have none)."""
    return {
        unit: f"{units.winning_prefix(str(marker['split']), unit, marker)}/{COPIES}"
        for unit, marker in sorted(markers.items())
        if marker.get("written")
    }


def _lines(storage: Storage, key: str) -> Iterator[bytes]:
    # Split on b"\n" only: an author may hold U+2028 and the like.
    return (line for line in storage.read_bytes(key).split(b"\n") if line)


def _prefixes(storage: Storage, key: str) -> np.ndarray:
    return np.array([int(line[2:18], 16) for line in _lines(storage, key)], dtype=np.uint64)


def find_duplicates(storage: Storage, markers: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """The catalog's duplicate groups: which copies are dropped (per split) and whom the kept credit."""
    keys = _copies_keys(markers)
    with ThreadPoolExecutor(_READERS, thread_name_prefix="dedup") as pool:
        prefixes = dict(zip(keys, pool.map(lambda k: _prefixes(storage, k), keys.values()), strict=True))
        every = np.concatenate([*prefixes.values(), np.zeros(0, dtype=np.uint64)])
        values, counts = np.unique(every, return_counts=True)
        repeated = values[counts > 1]
        suspects = [unit for unit, found in prefixes.items() if np.isin(found, repeated).any()]
        repeated_prefixes = frozenset(int(value) for value in repeated)
        groups: dict[str, list[list[Any]]] = {}
        for lines in pool.map(lambda unit: list(_lines(storage, keys[unit])), suspects):
            for line in lines:
                if int(line[2:18], 16) in repeated_prefixes:
                    copy = json.loads(line)
                    groups.setdefault(copy[0], []).append(copy)
    dropped: dict[str, list[int]] = {}
    credits: dict[str, list[dict[str, Any]]] = {}
    for copies in groups.values():
        if len(copies) < 2:
            continue  # a shared prefix, not the same image
        most = max(restrictiveness(c[4]) for c in copies)
        kept = min((c for c in copies if restrictiveness(c[4]) == most), key=lambda c: c[1])
        others = sorted((c for c in copies if c is not kept), key=lambda c: c[1])
        for copy in others:
            dropped.setdefault(copy[3], []).append(int(copy[2]))
        credits[str(kept[2])] = [
            {"photo_id": c[2], "license_code": c[4], "author": c[5], "author_nsid": c[6], "page_url": c[7]}
            for c in others
        ]
    return {
        "dropped": {split: sorted(ids) for split, ids in sorted(dropped.items())},
        "credits": dict(sorted(credits.items(), key=lambda item: int(item[0]))),
    }


def read_duplicates(catalog: Storage) -> dict[str, Any]:
    """A catalog's duplicates (none for a catalog written before catalog-wide deduplication)."""
    if not catalog.exists(DUPLICATES):
        return {"dropped": {}, "credits": {}}
    found: dict[str, Any] = json.loads(catalog.read_text(DUPLICATES))
    return found

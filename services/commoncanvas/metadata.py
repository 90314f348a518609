"""Readers for the YFCC100M metadata: TSV (2014 23-column and later 25-column layouts), plain, bz2 or
gzip, and the SQLite release. Malformed rows are reported with their line number, never fatal."""

from __future__ import annotations

import bz2
import gzip
import io
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO
from urllib.parse import unquote_plus

# The 2014 release's columns, in order.  The later release prepends line number and photo id and puts
# the photo hash between id and NSID, i.e. 25 columns.
FIELDS_2014 = (
    "photo_id",
    "user_nsid",
    "user_nickname",
    "date_taken",
    "date_uploaded",
    "capture_device",
    "title",
    "description",
    "user_tags",
    "machine_tags",
    "longitude",
    "latitude",
    "accuracy",
    "page_url",
    "download_url",
    "license_name",
    "license_url",
    "server",
    "farm",
    "secret",
    "secret_original",
    "extension",
    "marker",
)
FIELDS_LATER = ("line_number", "photo_id", "photo_hash", *FIELDS_2014[1:])
# Column names of the SQLite release's `yfcc100m_dataset` table.
SQLITE_COLUMNS = {
    "photoid": "photo_id",
    "uid": "user_nsid",
    "unickname": "user_nickname",
    "datetaken": "date_taken",
    "dateuploaded": "date_uploaded",
    "capturedevice": "capture_device",
    "title": "title",
    "description": "description",
    "usertags": "user_tags",
    "machinetags": "machine_tags",
    "longitude": "longitude",
    "latitude": "latitude",
    "accuracy": "accuracy",
    "pageurl": "page_url",
    "downloadurl": "download_url",
    "licensename": "license_name",
    "licenseurl": "license_url",
    "serverid": "server",
    "farmid": "farm",
    "secret": "secret",
    "secretoriginal": "secret_original",
    "ext": "extension",
    "marker": "marker",
}
SQLITE_TABLE = "yfcc100m_dataset"
_ENCODED_TEXT = ("user_nickname", "title", "description", "capture_device")
_MIN_YEAR = 1826  # the oldest surviving photograph
_MAX_YEAR = datetime.now().year + 1


@dataclass(frozen=True, slots=True)
class PhotoRecord:
    line: int
    photo_id: int
    user_nsid: str
    user_nickname: str
    date_taken: str
    date_uploaded: int
    title: str
    description: str
    tags: tuple[str, ...]
    page_url: str
    download_url: str
    license_name: str
    license_url: str
    server: str
    farm: str
    secret: str
    secret_original: str
    extension: str
    is_video: bool
    photo_hash: str = ""


@dataclass(frozen=True, slots=True)
class MalformedRow:
    line: int
    reason: str
    detail: str = ""


@dataclass(slots=True)
class ReadStats:
    layout: str = ""
    rows: int = 0
    malformed: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)


class MetadataError(ValueError):
    """The file as a whole cannot be read (not one bad row: those are MalformedRow)."""


def _decode(text: str) -> str:
    return unquote_plus(text).strip()


def _parse_date_taken(raw: str) -> str:
    raw = raw.strip()
    if not raw or raw.lower() == "null":
        return ""
    stamp = datetime.fromisoformat(raw)
    if not _MIN_YEAR <= stamp.year <= _MAX_YEAR:
        raise ValueError(f"year {stamp.year} is impossible")
    return stamp.isoformat(sep=" ")


def record_from_fields(values: dict[str, str], line: int) -> PhotoRecord | MalformedRow:
    """Validate and decode one row given by column name."""
    raw_id = values["photo_id"].strip()
    if not raw_id.isdigit():
        return MalformedRow(line, "bad-id", f"photo id {raw_id!r} is not a number")
    try:
        date_taken = _parse_date_taken(values["date_taken"])
    except ValueError as exc:
        return MalformedRow(line, "bad-date", f"date taken {values['date_taken']!r}: {exc}")
    uploaded = values["date_uploaded"].strip() or "0"
    if not uploaded.isdigit():
        return MalformedRow(line, "bad-date", f"date uploaded {uploaded!r} is not an epoch")
    marker = values["marker"].strip()
    if marker not in ("0", "1"):
        return MalformedRow(line, "bad-marker", f"photo/video marker {marker!r} is neither 0 nor 1")
    for numeric in ("farm", "server"):
        if values[numeric].strip() and not values[numeric].strip().isdigit():
            return MalformedRow(line, f"bad-{numeric}", f"{numeric} {values[numeric]!r} is not a number")
    decoded = {name: _decode(values[name]) for name in _ENCODED_TEXT}
    tags = tuple(t for t in (_decode(tag) for tag in values["user_tags"].split(",")) if t)
    return PhotoRecord(
        line=line,
        photo_id=int(raw_id),
        user_nsid=values["user_nsid"].strip(),
        user_nickname=decoded["user_nickname"],
        date_taken=date_taken,
        date_uploaded=int(uploaded),
        title=decoded["title"],
        description=decoded["description"],
        tags=tags,
        page_url=values["page_url"].strip(),
        download_url=values["download_url"].strip(),
        license_name=_decode(values["license_name"]),
        license_url=values["license_url"].strip(),
        server=values["server"].strip(),
        farm=values["farm"].strip(),
        secret=values["secret"].strip(),
        secret_original=values["secret_original"].strip(),
        extension=values["extension"].strip().lower(),
        is_video=marker == "1",
        photo_hash=values.get("photo_hash", "").strip(),
    )


def _open_text(path: Path) -> IO[str]:
    with path.open("rb") as probe:
        magic = probe.read(4)
    if magic.startswith(b"BZh"):
        return io.TextIOWrapper(bz2.open(path, "rb"), encoding="utf-8", errors="replace", newline="")
    if magic.startswith(b"\x1f\x8b"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace", newline="")
    return path.open("r", encoding="utf-8", errors="replace", newline="")


def is_sqlite(path: Path) -> bool:
    with path.open("rb") as probe:
        return probe.read(16) == b"SQLite format 3\x00"


def read_tsv(path: Path, stats: ReadStats | None = None) -> Iterator[PhotoRecord | MalformedRow]:
    """Rows of a YFCC100M TSV; the layout is detected from the first well-formed line."""
    stats = stats if stats is not None else ReadStats()
    fields: tuple[str, ...] | None = None
    with _open_text(path) as handle:
        for line_no, line in enumerate(handle, start=1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            stats.rows += 1
            columns = line.split("\t")
            if fields is None:
                fields = {23: FIELDS_2014, 25: FIELDS_LATER}.get(len(columns))
                stats.layout = {23: "yfcc100m-2014-23col", 25: "yfcc100m-25col"}.get(len(columns), "")
            if fields is None or len(columns) != len(fields):
                expected = "23 or 25" if fields is None else str(len(fields))
                yield _count(
                    stats,
                    MalformedRow(line_no, "column-count", f"{len(columns)} columns, expected {expected}"),
                )
                continue
            result = record_from_fields(dict(zip(fields, columns, strict=True)), line_no)
            yield _count(stats, result) if isinstance(result, MalformedRow) else result


def read_sqlite(path: Path, stats: ReadStats | None = None) -> Iterator[PhotoRecord | MalformedRow]:
    stats = stats if stats is not None else ReadStats()
    stats.layout = "yfcc100m-sqlite"
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        names = [row[1].lower() for row in conn.execute(f"PRAGMA table_info({SQLITE_TABLE})")]
        if not names:
            raise MetadataError(f"{path}: no table {SQLITE_TABLE!r}; is this the YFCC100M SQLite release?")
        missing = sorted(set(SQLITE_COLUMNS) - set(names))
        if missing:
            raise MetadataError(f"{path}: table {SQLITE_TABLE!r} lacks columns {missing}")
        columns = ", ".join(SQLITE_COLUMNS)
        for rowid, *values in conn.execute(f"SELECT rowid, {columns} FROM {SQLITE_TABLE} ORDER BY rowid"):
            stats.rows += 1
            row = {
                field_name: "" if v is None else str(v)
                for field_name, v in zip(SQLITE_COLUMNS.values(), values, strict=True)
            }
            result = record_from_fields(row, int(rowid))
            yield _count(stats, result) if isinstance(result, MalformedRow) else result
    finally:
        conn.close()


def read_metadata(path: str | Path, stats: ReadStats | None = None) -> Iterator[PhotoRecord | MalformedRow]:
    """Any supported YFCC100M metadata file, detected by content rather than by name."""
    path = Path(path)
    if not path.is_file():
        raise MetadataError(f"metadata file {path} does not exist")
    return read_sqlite(path, stats) if is_sqlite(path) else read_tsv(path, stats)


def _count(stats: ReadStats, row: MalformedRow) -> MalformedRow:
    stats.malformed += 1
    stats.by_reason[row.reason] = stats.by_reason.get(row.reason, 0) + 1
    return row

"""Readers for the YFCC100M metadata: TSV (2014 23-column and later 25-column layouts), plain, bz2 or
gzip, and the SQLite release.

A file is read in `Part`s (byte ranges of a plain TSV, rowid ranges of SQLite, blocks of whole lines of
a compressed stream) so the planner can read them in parallel; reading them in order is reading the
file. Lines end at b"\\n" only. Only a row that cannot be a photo (column count, photo id, media type,
length) is malformed; an unreadable informational field is left blank and counted as a warning.
"""

from __future__ import annotations

import bz2
import gzip
import sqlite3
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from itertools import islice
from pathlib import Path
from typing import BinaryIO, Literal, NamedTuple
from urllib.parse import unquote_to_bytes

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
# Column names of the SQLite release's `yfcc100m_dataset` table, in FIELDS_2014 order.
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
LAYOUT_2014 = "yfcc100m-2014-23col"
LAYOUT_LATER = "yfcc100m-25col"
LAYOUT_SQLITE = "yfcc100m-sqlite"
LAYOUT_FIELDS = {LAYOUT_2014: FIELDS_2014, LAYOUT_LATER: FIELDS_LATER}
LAYOUT_SAMPLE = 100  # a TSV's layout is the majority of its first lines with a known column count
MAX_ROW_BYTES = 1 << 20  # a longer line is one malformed row; no line is held beyond this
PART_BYTES = 16 << 20  # input per part: enough to amortise a task, small enough to balance and stream
_ROW_BYTES = 512  # about one YFCC100M row, to size SQLite parts like TSV ones
_BLOCK = 1 << 20
_MIN_YEAR = 1826  # the oldest surviving photograph
_MAX_YEAR = datetime.now().year + 1


class PhotoRecord(NamedTuple):
    """One row that can be planned. A named tuple: built per row, and a frozen dataclass costs 3x."""

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
    capture_device: str = ""
    machine_tags: tuple[str, ...] = ()
    longitude: str = ""
    latitude: str = ""
    accuracy: str = ""


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
    warnings: Counter[str] = field(default_factory=Counter)  # field name -> rows kept despite it

    def add(self, other: ReadStats) -> None:
        """Fold in the counts of another part of the same file."""
        self.rows += other.rows
        self.malformed += other.malformed
        for reason, count in other.by_reason.items():
            self.by_reason[reason] = self.by_reason.get(reason, 0) + count
        self.warnings.update(other.warnings)


class MetadataError(ValueError):
    """The file as a whole cannot be read (not one bad row: those are MalformedRow)."""


@dataclass(frozen=True, slots=True)
class Part:
    """A piece of a metadata file that can be read on its own, in any process."""

    path: str
    layout: str
    kind: Literal["bytes", "rowids", "lines"]
    first_line: int = 1  # line number of its first line (TSV; SQLite rows are numbered by rowid)
    start: int = 0  # [start, end): byte offsets ("bytes") or rowids ("rowids")
    end: int = 0
    data: bytes = b""  # whole lines already decompressed ("lines")


# --- one row ----------------------------------------------------------------------------------------


def _text(raw: str, name: str, warnings: Counter[str]) -> str:
    """URL-decoded (`+` is a space); percent-encoded bytes that are not UTF-8 become U+FFFD."""
    if "+" in raw:
        raw = raw.replace("+", " ")
    if "%" not in raw:
        return raw.strip()
    data = unquote_to_bytes(raw)
    try:
        return data.decode().strip()
    except UnicodeDecodeError:
        warnings[name] += 1
        return data.decode(errors="replace").strip()


def _date_taken(raw: str, warnings: Counter[str]) -> str:
    raw = raw.strip()
    if not raw or raw.lower() == "null":
        return ""
    try:
        stamp = datetime.fromisoformat(raw)
    except ValueError:
        warnings["date_taken"] += 1
        return ""
    if not _MIN_YEAR <= stamp.year <= _MAX_YEAR:
        warnings["date_taken"] += 1  # a camera clock's year 4501: kept, the photo is still a photo
    if len(raw) >= 19 and raw[10] == " " and not stamp.microsecond and stamp.tzinfo is None:
        return raw[:19]  # what isoformat(sep=" ") gives for YFCC's "... 12:00:00.0", at a tenth the cost
    return stamp.isoformat(sep=" ")


def _number(raw: str, name: str, low: float, high: float, warnings: Counter[str]) -> str:
    raw = raw.strip()
    if not raw:
        return ""
    try:
        if low <= float(raw) <= high:
            return raw
    except ValueError:
        pass
    warnings[name] += 1
    return ""


def _digits(raw: str, name: str, warnings: Counter[str]) -> str:
    raw = raw.strip()
    if raw and not (raw.isascii() and raw.isdigit()):
        warnings[name] += 1
        return ""
    return raw


def _tags(raw: str, name: str, warnings: Counter[str]) -> tuple[str, ...]:
    if not raw:
        return ()
    if "%" not in raw:  # most rows: no escape in any tag
        return tuple(t for t in (tag.strip() for tag in raw.replace("+", " ").split(",")) if t)
    return tuple(t for t in (_text(tag, name, warnings) for tag in raw.split(",")) if t)


def record_from_values(
    v: Sequence[str], line: int, warnings: Counter[str], photo_hash: str = ""
) -> PhotoRecord | MalformedRow:
    """Validate and decode one row given in FIELDS_2014 order. Malformed only when it cannot be a photo
    to fetch (photo id, media type); every other unreadable field is blank and counted in `warnings`."""
    raw_id = v[0].strip()
    if not (raw_id.isascii() and raw_id.isdigit()):
        return MalformedRow(line, "bad-id", f"photo id {raw_id!r} is not a number")
    marker = v[22].strip()
    if marker not in ("0", "1"):
        return MalformedRow(line, "bad-marker", f"photo/video marker {marker!r} is neither 0 nor 1")
    uploaded = _digits(v[4], "date_uploaded", warnings)
    return PhotoRecord(
        line=line,
        photo_id=int(raw_id),
        user_nsid=v[1].strip(),
        user_nickname=_text(v[2], "user_nickname", warnings),
        date_taken=_date_taken(v[3], warnings),
        date_uploaded=int(uploaded) if uploaded else 0,
        title=_text(v[6], "title", warnings),
        description=_text(v[7], "description", warnings),
        tags=_tags(v[8], "user_tags", warnings),
        page_url=v[13].strip(),
        download_url=v[14].strip(),
        license_name=_text(v[15], "license_name", warnings),
        license_url=v[16].strip(),
        server=_digits(v[17], "server", warnings),
        farm=_digits(v[18], "farm", warnings),
        secret=v[19].strip(),
        secret_original=v[20].strip(),
        extension=v[21].strip().lower(),
        is_video=marker == "1",
        photo_hash=photo_hash.strip(),
        capture_device=_text(v[5], "capture_device", warnings),
        machine_tags=_tags(v[9], "machine_tags", warnings),
        longitude=_number(v[10], "longitude", -180, 180, warnings),
        latitude=_number(v[11], "latitude", -90, 90, warnings),
        accuracy=_digits(v[12], "accuracy", warnings),
    )


def _count(stats: ReadStats, row: MalformedRow) -> MalformedRow:
    stats.malformed += 1
    stats.by_reason[row.reason] = stats.by_reason.get(row.reason, 0) + 1
    return row


# --- TSV lines --------------------------------------------------------------------------------------


def _line_blocks(read: Callable[[int], bytes], size: int) -> Iterator[bytes]:
    """Whole lines (split on b"\\n" only), about `size` bytes at a time. A line longer than MAX_ROW_BYTES
    is cut to MAX_ROW_BYTES + 1 bytes, so it still reads as too long while memory stays bounded."""
    head = b""  # the unfinished last line so far
    while chunk := read(size):
        cut = chunk.rfind(b"\n")
        if cut < 0:
            head = (head + chunk)[: MAX_ROW_BYTES + 1]
            continue
        yield head + chunk[: cut + 1]
        head = chunk[cut + 1 : cut + 2 + MAX_ROW_BYTES]
    if head:
        yield head


def _columns(raw: bytes) -> tuple[list[str], list[int]]:
    """The line's columns, and which of them were not UTF-8 (kept with U+FFFD)."""
    try:
        return raw.decode().split("\t"), []
    except UnicodeDecodeError:
        columns = raw.decode(errors="replace").split("\t")
    return columns, [i for i, column in enumerate(raw.split(b"\t")) if not _utf8(column)]


def _utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def _rows_of_block(
    block: bytes, first_line: int, fields: tuple[str, ...], stats: ReadStats
) -> Iterator[PhotoRecord | MalformedRow]:
    later = len(fields) == len(FIELDS_LATER)
    warnings = stats.warnings
    lines = block.split(b"\n")
    if block.endswith(b"\n"):
        lines.pop()
    for line_no, raw in enumerate(lines, start=first_line):
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if not raw:
            continue
        stats.rows += 1
        if len(raw) > MAX_ROW_BYTES:
            yield _count(stats, MalformedRow(line_no, "too-long", f"longer than {MAX_ROW_BYTES} bytes"))
            continue
        columns, not_utf8 = _columns(raw)
        if len(columns) != len(fields):
            detail = f"{len(columns)} columns, expected {len(fields)}"
            yield _count(stats, MalformedRow(line_no, "column-count", detail))
            continue
        for index in not_utf8:
            warnings[fields[index]] += 1
        if later:
            result = record_from_values([columns[1], *columns[3:]], line_no, warnings, columns[2])
        else:
            result = record_from_values(columns, line_no, warnings)
        yield _count(stats, result) if isinstance(result, MalformedRow) else result


def _lines_in(block: bytes) -> int:
    return block.count(b"\n") + (0 if block.endswith(b"\n") else 1)


# --- files, parts and their errors ------------------------------------------------------------------


def _kind(path: Path) -> str:
    with path.open("rb") as probe:
        magic = probe.read(16)
    if magic == b"SQLite format 3\x00":
        return "sqlite"
    if magic.startswith(b"BZh"):
        return "bz2"
    if magic.startswith(b"\x1f\x8b"):
        return "gzip"
    return "plain"


def is_sqlite(path: Path) -> bool:
    return _kind(path) == "sqlite"


@contextmanager
def _reading(path: Path | str, kind: str) -> Iterator[None]:
    """Whatever breaks while reading the file becomes one MetadataError naming the file and the cause."""
    what = {"bz2": "bz2 data", "gzip": "gzip data", "sqlite": "SQLite file"}.get(kind, "file")
    try:
        yield
    except MetadataError:
        raise
    except EOFError as exc:
        raise MetadataError(f"{path}: truncated {what}: {exc}") from None
    except sqlite3.Error as exc:
        raise MetadataError(f"{path}: corrupt {what}: {exc}") from None
    except (OSError, zlib.error) as exc:
        raise MetadataError(f"{path}: unreadable {what}: {exc}") from None


def _open(path: Path, kind: str) -> BinaryIO:
    if kind == "bz2":
        return bz2.open(path, "rb")  # type: ignore[return-value]
    if kind == "gzip":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return path.open("rb")


def _tsv_layout(path: Path, kind: str) -> str:
    """The column layout most of the file's first lines have; a file none of them fits is refused."""
    seen: Counter[int] = Counter()
    sampled = 0
    with _reading(path, kind), _open(path, kind) as raw:
        for columns in islice(_column_counts(raw), 10 * LAYOUT_SAMPLE):
            sampled += 1
            if columns in (23, 25):
                seen[columns] += 1
                if seen.total() == LAYOUT_SAMPLE:
                    break
    if not seen:
        if not sampled:
            return ""  # an empty file: no rows
        raise MetadataError(
            f"{path}: not YFCC100M metadata: none of its first {sampled} lines has the 23 or 25 "
            "tab-separated columns of a YFCC100M row"
        )
    majority = max(seen, key=seen.__getitem__)  # a tie goes to the layout seen first
    return LAYOUT_2014 if majority == 23 else LAYOUT_LATER


def _column_counts(raw: BinaryIO) -> Iterator[int]:
    for block in _line_blocks(raw.read, _BLOCK):
        for line in block.split(b"\n"):
            if line := line.rstrip(b"\r"):
                yield line.count(b"\t") + 1


def _sqlite(path: str) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def _sqlite_check(path: Path) -> None:
    with _reading(path, "sqlite"):
        conn = _sqlite(str(path))
        try:
            names = [row[1].lower() for row in conn.execute(f"PRAGMA table_info({SQLITE_TABLE})")]
        finally:
            conn.close()
    if not names:
        raise MetadataError(f"{path}: no table {SQLITE_TABLE!r}; is this the YFCC100M SQLite release?")
    missing = sorted(set(SQLITE_COLUMNS) - set(names))
    if missing:
        raise MetadataError(f"{path}: table {SQLITE_TABLE!r} lacks columns {missing}")


def layout_of(path: str | Path) -> str:
    """The file's layout (LAYOUT_*; "" for an empty file), or a MetadataError saying why it has none."""
    path = Path(path)
    if not path.is_file():
        raise MetadataError(f"metadata file {path} does not exist")
    kind = _kind(path)
    if kind == "sqlite":
        _sqlite_check(path)
        return LAYOUT_SQLITE
    return _tsv_layout(path, kind)


def iter_parts(path: str | Path, layout: str, part_bytes: int = PART_BYTES) -> Iterator[Part]:
    """The file as consecutive parts of about `part_bytes` each, in file order."""
    path = Path(path)
    kind = _kind(path)
    if not layout:
        return
    if kind == "sqlite":
        yield from _rowid_parts(path, max(1, part_bytes // _ROW_BYTES))
    elif kind == "plain":
        yield from _byte_parts(path, layout, part_bytes)
    else:  # a compressed stream cannot be entered midway: decompress here, parse anywhere
        first_line = 1
        with _reading(path, kind), _open(path, kind) as raw:
            for block in _line_blocks(raw.read, part_bytes):
                yield Part(str(path), layout, "lines", first_line, data=block)
                first_line += _lines_in(block)


def _byte_parts(path: Path, layout: str, part_bytes: int) -> Iterator[Part]:
    """Byte ranges ending just after a newline; counting the newlines numbers each part's first line."""
    start, first_line, lines, offset = 0, 1, 0, 0
    with _reading(path, "plain"), path.open("rb") as raw:
        while chunk := raw.read(min(_BLOCK, part_bytes)):
            cut = chunk.rfind(b"\n") if offset + len(chunk) - start >= part_bytes else -1
            if cut < 0:
                lines += chunk.count(b"\n")
            else:
                end = offset + cut + 1
                yield Part(str(path), layout, "bytes", first_line, start, end)
                first_line += lines + chunk.count(b"\n", 0, cut + 1)
                start, lines = end, 0  # cut is the chunk's last newline
            offset += len(chunk)
    if start < offset:
        yield Part(str(path), layout, "bytes", first_line, start, offset)


def _rowid_parts(path: Path, rows: int) -> Iterator[Part]:
    with _reading(path, "sqlite"):
        conn = _sqlite(str(path))
        try:
            low, high = conn.execute(f"SELECT min(rowid), max(rowid) FROM {SQLITE_TABLE}").fetchone()
        finally:
            conn.close()
    if low is None:
        return
    for start in range(int(low), int(high) + 1, rows):
        yield Part(str(path), LAYOUT_SQLITE, "rowids", start=start, end=start + rows)


def read_part(part: Part, stats: ReadStats) -> Iterator[PhotoRecord | MalformedRow]:
    """The rows of one part, counted into `stats`."""
    stats.layout = part.layout
    if part.kind == "rowids":
        yield from _read_rowids(part, stats)
        return
    fields = LAYOUT_FIELDS[part.layout]
    if part.kind == "lines":
        yield from _rows_of_block(part.data, part.first_line, fields, stats)
        return
    with _reading(part.path, "plain"), open(part.path, "rb") as raw:
        raw.seek(part.start)
        left = part.end - part.start

        def read(size: int) -> bytes:
            nonlocal left
            chunk = raw.read(min(size, left))
            left -= len(chunk)
            return chunk

        line = part.first_line
        for block in _line_blocks(read, _BLOCK):
            yield from _rows_of_block(block, line, fields, stats)
            line += _lines_in(block)


def _read_rowids(part: Part, stats: ReadStats) -> Iterator[PhotoRecord | MalformedRow]:
    columns = ", ".join(SQLITE_COLUMNS)
    query = f"SELECT rowid, {columns} FROM {SQLITE_TABLE} WHERE rowid >= ? AND rowid < ? ORDER BY rowid"
    with _reading(part.path, "sqlite"):
        conn = _sqlite(part.path)
        conn.text_factory = bytes  # text that is not UTF-8 is one row's warning, not the file's error
        try:
            for rowid, *values in conn.execute(query, (part.start, part.end)):
                stats.rows += 1
                row = [
                    _sqlite_text(v, name, stats.warnings) for v, name in zip(values, FIELDS_2014, strict=True)
                ]
                result = record_from_values(row, int(rowid), stats.warnings)
                yield _count(stats, result) if isinstance(result, MalformedRow) else result
        finally:
            conn.close()


def _sqlite_text(value: object, name: str, warnings: Counter[str]) -> str:
    if value is None:
        return ""
    if not isinstance(value, bytes):
        return str(value)
    try:
        return value.decode()
    except UnicodeDecodeError:
        warnings[name] += 1
        return value.decode(errors="replace")


def read_metadata(path: str | Path, stats: ReadStats | None = None) -> Iterator[PhotoRecord | MalformedRow]:
    """Any supported YFCC100M metadata file, detected by content rather than by name, in file order."""
    stats = stats if stats is not None else ReadStats()
    stats.layout = layout_of(path)

    def rows() -> Iterator[PhotoRecord | MalformedRow]:
        for part in iter_parts(path, stats.layout):
            yield from read_part(part, stats)

    return rows()

"""Builders for YFCC100M metadata rows, shared by the metadata and planning tests.

Rows are written out column by column, as the real release lays them out, so a test shows exactly
which value it changes.  Text columns are URL-encoded like the real files (`+` for a space).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from commoncanvas.metadata import SQLITE_COLUMNS, SQLITE_TABLE

# One plausible, fully valid photo row of the 2014 23-column release (a CC BY photo), its columns in the
# release's order; written out here rather than taken from the reader, so the tests check its layout.
BASE_ROW: dict[str, str] = {
    "photo_id": "2911838707",
    "user_nsid": "12345678@N00",
    "user_nickname": "jane+doe",
    "date_taken": "2013-06-01 12:00:00.0",
    "date_uploaded": "1370088000",
    "capture_device": "Canon+EOS+5D",
    "title": "Harbour+at+dusk",
    "description": "Taken+from+the+pier",
    "user_tags": "harbour,boats",
    "machine_tags": "",
    "longitude": "-0.1234",
    "latitude": "51.5",
    "accuracy": "16",
    "page_url": "http://www.flickr.com/photos/12345678@N00/2911838707/",
    "download_url": "http://farm4.staticflickr.com/3164/2911838707_b3c6acd0df.jpg",
    "license_name": "Attribution+License",
    "license_url": "http://creativecommons.org/licenses/by/2.0/",
    "server": "3164",
    "farm": "4",
    "secret": "b3c6acd0df",
    "secret_original": "9a8b7c6d5e",
    "extension": "jpg",
    "marker": "0",
}


class YfccRows:
    """Make metadata rows and files: `values(**changes)`, `line(**changes)`, `line25(n, hash, ...)`."""

    def values(self, **changes: str) -> dict[str, str]:
        unknown = set(changes) - set(BASE_ROW)
        assert not unknown, f"not YFCC100M columns: {unknown}"
        return {**BASE_ROW, **changes}

    def line(self, **changes: str) -> str:
        """A line of the 2014 release (23 columns)."""
        row = self.values(**changes)
        return "\t".join(row[name] for name in BASE_ROW)

    def line25(self, line_number: int, photo_hash: str, **changes: str) -> str:
        """A line of the later release (25 columns: line number, photo id, photo hash, then the rest)."""
        row = self.values(**changes)
        rest = [row[name] for name in BASE_ROW if name != "photo_id"]
        return "\t".join([str(line_number), row["photo_id"], photo_hash, *rest])

    def write_tsv(self, path: Path, lines: list[str]) -> Path:
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        return path

    def write_sqlite(self, path: Path, rows: list[dict[str, str | int | None]]) -> Path:
        """The SQLite release: table `yfcc100m_dataset` with its own column names."""
        by_field = {field_name: column for column, field_name in SQLITE_COLUMNS.items()}
        integer_columns = {"photoid", "dateuploaded", "serverid", "farmid", "marker"}
        columns = ", ".join(f"{c} {'INTEGER' if c in integer_columns else 'TEXT'}" for c in SQLITE_COLUMNS)
        conn = sqlite3.connect(path)
        try:
            conn.execute(f"CREATE TABLE {SQLITE_TABLE} ({columns})")
            for row in rows:
                names = [by_field[name] for name in row]
                marks = ", ".join("?" for _ in names)
                conn.execute(
                    f"INSERT INTO {SQLITE_TABLE} ({', '.join(names)}) VALUES ({marks})", list(row.values())
                )
            conn.commit()
        finally:
            conn.close()
        return path


@pytest.fixture
def yfcc() -> YfccRows:
    return YfccRows()

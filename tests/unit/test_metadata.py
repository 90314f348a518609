"""YFCC100M metadata readers: both TSV layouts, compression, the SQLite release, malformed rows, warnings
on informational fields, and files that cannot be read at all."""

from __future__ import annotations

import bz2
import gzip
import random
import sqlite3
import tracemalloc
from pathlib import Path

import pytest

from commoncanvas.metadata import (
    FIELDS_2014,
    FIELDS_LATER,
    MAX_ROW_BYTES,
    SQLITE_COLUMNS,
    SQLITE_TABLE,
    MalformedRow,
    MetadataError,
    PhotoRecord,
    ReadStats,
    read_metadata,
)


def read_all(path: Path) -> tuple[list[PhotoRecord | MalformedRow], ReadStats]:
    stats = ReadStats()
    return list(read_metadata(path, stats)), stats


def only_record(rows: list[PhotoRecord | MalformedRow]) -> PhotoRecord:
    assert len(rows) == 1 and isinstance(rows[0], PhotoRecord), rows
    return rows[0]


# --- layouts ----------------------------------------------------------------------------------------


def test_reader_knows_the_2014_column_order(yfcc) -> None:
    assert tuple(yfcc.values()) == FIELDS_2014
    assert ("line_number", "photo_id", "photo_hash", *FIELDS_2014[1:]) == FIELDS_LATER


def test_2014_layout_of_23_columns_is_detected_and_every_field_read(yfcc, tmp_path: Path) -> None:
    rows, stats = read_all(yfcc.write_tsv(tmp_path / "yfcc100m_dataset", [yfcc.line()]))
    record = only_record(rows)
    assert stats.layout == "yfcc100m-2014-23col"
    assert record == PhotoRecord(
        line=1,
        photo_id=2911838707,
        user_nsid="12345678@N00",
        user_nickname="jane doe",
        date_taken="2013-06-01 12:00:00",
        date_uploaded=1370088000,
        title="Harbour at dusk",
        description="Taken from the pier",
        tags=("harbour", "boats"),
        page_url="http://www.flickr.com/photos/12345678@N00/2911838707/",
        download_url="http://farm4.staticflickr.com/3164/2911838707_b3c6acd0df.jpg",
        license_name="Attribution License",
        license_url="http://creativecommons.org/licenses/by/2.0/",
        server="3164",
        farm="4",
        secret="b3c6acd0df",
        secret_original="9a8b7c6d5e",
        extension="jpg",
        is_video=False,
        photo_hash="",
        capture_device="Canon EOS 5D",
        machine_tags=(),
        longitude="-0.1234",
        latitude="51.5",
        accuracy="16",
    )
    assert stats.warnings == {}


def test_25_column_layout_reads_photo_id_and_hash_from_their_own_columns(yfcc, tmp_path: Path) -> None:
    path = yfcc.write_tsv(
        tmp_path / "yfcc100m_dataset",
        [
            yfcc.line25(0, "5d4c3b2a1f0e", photo_id="111"),
            yfcc.line25(1, "0f1e2d3c4b5a", photo_id="222", title="Second"),
        ],
    )
    rows, stats = read_all(path)
    assert stats.layout == "yfcc100m-25col"
    assert all(isinstance(r, PhotoRecord) for r in rows)
    assert [(r.line, r.photo_id, r.photo_hash, r.title) for r in rows] == [
        (1, 111, "5d4c3b2a1f0e", "Harbour at dusk"),
        (2, 222, "0f1e2d3c4b5a", "Second"),
    ]
    assert rows[0].user_nsid == "12345678@N00" and rows[0].license_name == "Attribution License"


def test_layout_is_taken_from_the_first_line_with_a_known_column_count(yfcc, tmp_path: Path) -> None:
    short = "\t".join(yfcc.line().split("\t")[:12])
    rows, stats = read_all(yfcc.write_tsv(tmp_path / "m.tsv", [short, yfcc.line25(7, "ab")]))
    assert stats.layout == "yfcc100m-25col"
    assert isinstance(rows[0], MalformedRow) and rows[0].reason == "column-count"
    assert isinstance(rows[1], PhotoRecord) and rows[1].photo_hash == "ab"


def test_layout_is_the_majority_of_the_first_rows_so_one_odd_first_row_spoils_nothing(
    yfcc, tmp_path: Path
) -> None:
    lines = [yfcc.line25(0, "ab", photo_id="100"), *(yfcc.line(photo_id=str(n)) for n in range(1, 6))]
    rows, stats = read_all(yfcc.write_tsv(tmp_path / "m.tsv", lines))
    assert stats.layout == "yfcc100m-2014-23col"
    assert rows[0] == MalformedRow(1, "column-count", "25 columns, expected 23")
    assert [r.photo_id for r in rows[1:] if isinstance(r, PhotoRecord)] == [1, 2, 3, 4, 5]


def test_a_23_column_line_in_a_25_column_file_is_malformed(yfcc, tmp_path: Path) -> None:
    rows, _ = read_all(yfcc.write_tsv(tmp_path / "m.tsv", [yfcc.line25(0, "ab"), yfcc.line()]))
    assert isinstance(rows[0], PhotoRecord)
    assert rows[1] == MalformedRow(2, "column-count", "23 columns, expected 25")


# --- compression and detection by content -----------------------------------------------------------


@pytest.mark.parametrize("compress", [None, bz2.compress, gzip.compress], ids=["plain", "bz2", "gzip"])
def test_plain_bz2_and_gzip_files_read_the_same_whatever_their_name(yfcc, tmp_path: Path, compress) -> None:
    text = "".join(line + "\n" for line in [yfcc.line(photo_id="1"), yfcc.line(photo_id="2")]).encode()
    path = tmp_path / "metadata.dat"  # no telling suffix: detection is by content
    path.write_bytes(compress(text) if compress else text)
    rows, stats = read_all(path)
    assert [r.photo_id for r in rows if isinstance(r, PhotoRecord)] == [1, 2]
    assert stats.rows == 2 and stats.malformed == 0


def test_missing_metadata_file_is_a_metadata_error(tmp_path: Path) -> None:
    with pytest.raises(MetadataError, match="does not exist"):
        read_metadata(tmp_path / "nope.tsv")


def test_windows_line_endings_are_not_part_of_the_last_column(yfcc, tmp_path: Path) -> None:
    path = tmp_path / "m.tsv"
    path.write_bytes((yfcc.line(marker="1") + "\r\n").encode())
    record = only_record(read_all(path)[0])
    assert record.is_video is True


# --- decoding ---------------------------------------------------------------------------------------


def test_url_encoded_text_is_decoded(yfcc, tmp_path: Path) -> None:
    line = yfcc.line(
        title="Sunset+over+the+bay%0Aday%26night",
        user_nickname="M%C3%BCller+%26+Sons",
        description="line+one%0Aline+two",
        capture_device="Apple+iPhone+4",
        license_name="Attribution-NonCommercial+License",
        user_tags="new+york,sky,,caf%C3%A9",
    )
    record = only_record(read_all(yfcc.write_tsv(tmp_path / "m.tsv", [line]))[0])
    assert record.title == "Sunset over the bay\nday&night"
    assert record.user_nickname == "Müller & Sons"
    assert record.description == "line one\nline two"
    assert record.license_name == "Attribution-NonCommercial License"
    assert record.tags == ("new york", "sky", "café")


def test_row_without_tags_has_no_tags(yfcc, tmp_path: Path) -> None:
    record = only_record(read_all(yfcc.write_tsv(tmp_path / "m.tsv", [yfcc.line(user_tags="")]))[0])
    assert record.tags == ()


def test_extension_is_lower_cased(yfcc, tmp_path: Path) -> None:
    record = only_record(read_all(yfcc.write_tsv(tmp_path / "m.tsv", [yfcc.line(extension="JPG")]))[0])
    assert record.extension == "jpg"


@pytest.mark.parametrize(("marker", "is_video"), [("0", False), ("1", True)])
def test_marker_1_flags_a_video_and_0_a_photo(yfcc, tmp_path: Path, marker: str, is_video: bool) -> None:
    record = only_record(read_all(yfcc.write_tsv(tmp_path / "m.tsv", [yfcc.line(marker=marker)]))[0])
    assert record.is_video is is_video


@pytest.mark.parametrize("date_taken", ["", "null", "NULL"])
def test_unknown_date_taken_is_empty_not_malformed(yfcc, tmp_path: Path, date_taken: str) -> None:
    line = yfcc.line(date_taken=date_taken)
    rows, stats = read_all(yfcc.write_tsv(tmp_path / "m.tsv", [line]))
    assert only_record(rows).date_taken == ""
    assert stats.warnings == {}


# --- informational fields: kept, never a reason to exclude --------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field_name"),
    [
        ({"date_taken": "2013-13-45 00:00:00.0"}, "date_taken"),
        ({"date_taken": "yesterday"}, "date_taken"),
        ({"date_uploaded": "last week"}, "date_uploaded"),
        ({"longitude": "east"}, "longitude"),
        ({"latitude": "95"}, "latitude"),
        ({"accuracy": "x"}, "accuracy"),
        ({"farm": "four"}, "farm"),
        ({"server": "x1"}, "server"),
    ],
)
def test_unreadable_informational_field_is_blank_and_counted_as_a_warning(
    yfcc, tmp_path: Path, changes: dict[str, str], field_name: str
) -> None:
    rows, stats = read_all(yfcc.write_tsv(tmp_path / "m.tsv", [yfcc.line(**changes)]))
    record = only_record(rows)
    assert getattr(record, field_name) in ("", 0)
    assert (record.photo_id, record.title) == (2911838707, "Harbour at dusk")
    assert stats.warnings == {field_name: 1}
    assert stats.malformed == 0


def test_camera_clock_year_4501_is_a_valid_row_kept_with_its_date_and_a_warning(yfcc, tmp_path: Path) -> None:
    rows, stats = read_all(
        yfcc.write_tsv(tmp_path / "m.tsv", [yfcc.line(date_taken="4501-01-01 00:00:00.0")])
    )
    assert only_record(rows).date_taken == "4501-01-01 00:00:00"
    assert stats.warnings == {"date_taken": 1}


def test_percent_encoded_text_that_is_not_utf8_is_kept_with_replacement_characters_and_a_warning(
    yfcc, tmp_path: Path
) -> None:
    rows, stats = read_all(yfcc.write_tsv(tmp_path / "m.tsv", [yfcc.line(title="caf%E9+au+lait")]))
    assert only_record(rows).title == "caf\ufffd au lait"
    assert stats.warnings == {"title": 1}


def test_invalid_utf8_bytes_are_kept_with_replacement_characters_and_counted_by_field(
    yfcc, tmp_path: Path
) -> None:
    line = yfcc.line(user_nickname="M\x00ller", description="d\x00j\x00").encode()
    path = tmp_path / "m.tsv"
    path.write_bytes(line.replace(b"\x00", b"\xff") + b"\n")
    rows, stats = read_all(path)
    record = only_record(rows)
    assert (record.user_nickname, record.description) == ("M\ufffdller", "d\ufffdj\ufffd")
    assert stats.warnings == {"user_nickname": 1, "description": 1}


# --- lines end at "\n" only --------------------------------------------------------------------------


@pytest.mark.parametrize("separator", ["\r", "\u2028", "\u2029", "\x85", "\x0b", "\x0c"])
def test_a_line_separator_inside_a_field_stays_in_its_field(yfcc, tmp_path: Path, separator: str) -> None:
    lines = [yfcc.line(photo_id="1", title=f"a{separator}b"), yfcc.line(photo_id="2")]
    rows, stats = read_all(yfcc.write_tsv(tmp_path / "m.tsv", lines))
    assert [(r.line, r.photo_id, r.title) for r in rows if isinstance(r, PhotoRecord)] == [
        (1, 1, f"a{separator}b"),
        (2, 2, "Harbour at dusk"),
    ]
    assert stats.malformed == 0


# --- malformed rows ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"photo_id": "abc"}, "bad-id"),
        ({"photo_id": "-5"}, "bad-id"),
        ({"photo_id": ""}, "bad-id"),
        ({"photo_id": "\u00b2"}, "bad-id"),
        ({"marker": "2"}, "bad-marker"),
        ({"marker": ""}, "bad-marker"),
    ],
)
def test_row_that_cannot_be_a_photo_is_malformed_with_its_reason(
    yfcc, tmp_path: Path, changes: dict[str, str], reason: str
) -> None:
    rows, _ = read_all(yfcc.write_tsv(tmp_path / "m.tsv", [yfcc.line(**changes)]))
    assert len(rows) == 1 and isinstance(rows[0], MalformedRow)
    assert (rows[0].line, rows[0].reason) == (1, reason)
    assert rows[0].detail


def test_malformed_rows_are_reported_with_line_numbers_and_reading_goes_on(yfcc, tmp_path: Path) -> None:
    lines = [
        yfcc.line(photo_id="1"),
        "\t".join(yfcc.line().split("\t")[:12]),  # truncated
        yfcc.line(photo_id="3"),
        yfcc.line(photo_id="4", marker="x"),
        yfcc.line(photo_id="5x"),
        yfcc.line(photo_id="6") + "\textra",  # one column too many
        yfcc.line(photo_id="7"),
    ]
    rows, stats = read_all(yfcc.write_tsv(tmp_path / "m.tsv", lines))
    assert [r.photo_id for r in rows if isinstance(r, PhotoRecord)] == [1, 3, 7]
    assert [(r.line, r.reason) for r in rows if isinstance(r, MalformedRow)] == [
        (2, "column-count"),
        (4, "bad-marker"),
        (5, "bad-id"),
        (6, "column-count"),
    ]
    assert (stats.rows, stats.malformed) == (7, 4)
    assert stats.by_reason == {"column-count": 2, "bad-marker": 1, "bad-id": 1}


def test_line_numbers_count_blank_lines_of_the_file(yfcc, tmp_path: Path) -> None:
    path = tmp_path / "m.tsv"
    path.write_text(yfcc.line(photo_id="1") + "\n\n" + yfcc.line(photo_id="bad") + "\n")
    rows, stats = read_all(path)
    assert [r.line for r in rows] == [1, 3]
    assert stats.rows == 2


def test_a_row_longer_than_the_bound_is_one_malformed_row_and_reading_goes_on(yfcc, tmp_path: Path) -> None:
    path = tmp_path / "m.tsv"
    huge = yfcc.line(photo_id="2", description="x" * (3 * MAX_ROW_BYTES))
    path.write_text("\n".join([yfcc.line(photo_id="1"), huge, yfcc.line(photo_id="3")]) + "\n")
    rows, stats = read_all(path)
    assert [(r.line, r.reason) for r in rows if isinstance(r, MalformedRow)] == [(2, "too-long")]
    assert [(r.line, r.photo_id) for r in rows if isinstance(r, PhotoRecord)] == [(1, 1), (3, 3)]
    assert stats.by_reason == {"too-long": 1}


def test_memory_stays_bounded_by_the_row_bound_however_long_a_line(yfcc, tmp_path: Path) -> None:
    path = tmp_path / "m.tsv"
    with path.open("w") as out:
        out.write(yfcc.line(photo_id="1") + "\n")
        for _ in range(32):  # 32 MiB without a newline
            out.write("x" * MAX_ROW_BYTES)
        out.write("\n" + yfcc.line(photo_id="3") + "\n")
    tracemalloc.start()
    try:
        rows, _ = read_all(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [r.reason if isinstance(r, MalformedRow) else r.photo_id for r in rows] == [1, "too-long", 3]
    assert peak < 8 * MAX_ROW_BYTES


# --- files that cannot be read at all: one clear error naming the file ------------------------------


def test_random_bytes_are_one_metadata_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "noise.tsv"
    path.write_bytes(random.Random(7).randbytes(200_000))
    with pytest.raises(MetadataError, match="not YFCC100M metadata") as error:
        list(read_metadata(path))
    assert str(path) in str(error.value)


@pytest.mark.parametrize(("compress", "kind"), [(bz2.compress, "bz2"), (gzip.compress, "gzip")])
def test_truncated_compressed_file_is_one_metadata_error_naming_the_file_and_the_cause(
    yfcc, tmp_path: Path, compress, kind: str
) -> None:
    text = "".join(yfcc.line(photo_id=str(n), title=f"t{n * 7919}") + "\n" for n in range(1, 3000)).encode()
    path = tmp_path / "metadata.dat"
    path.write_bytes(compress(text)[: len(compress(text)) // 2])
    with pytest.raises(MetadataError, match=f"truncated {kind} data") as error:
        list(read_metadata(path))
    assert str(path) in str(error.value)


def test_corrupt_sqlite_file_is_one_metadata_error_naming_the_file_and_the_cause(
    yfcc, tmp_path: Path
) -> None:
    path = yfcc.write_sqlite(tmp_path / "db", [sqlite_row()])
    data = bytearray(path.read_bytes())
    data[16:] = random.Random(3).randbytes(len(data) - 16)  # the magic header, then noise
    path.write_bytes(bytes(data))
    with pytest.raises(MetadataError, match="corrupt SQLite file") as error:
        list(read_metadata(path))
    assert str(path) in str(error.value)


# --- the SQLite release -----------------------------------------------------------------------------


def sqlite_row(**changes: str | int | None) -> dict[str, str | int | None]:
    row: dict[str, str | int | None] = {
        "photo_id": 2911838707,
        "user_nsid": "12345678@N00",
        "user_nickname": "jane+doe",
        "date_taken": "2013-06-01 12:00:00.0",
        "date_uploaded": 1370088000,
        "capture_device": "Canon",
        "title": "Harbour+at+dusk%26more",
        "description": "",
        "user_tags": "harbour,boats",
        "machine_tags": "",
        "longitude": None,
        "latitude": None,
        "accuracy": None,
        "page_url": "http://www.flickr.com/photos/12345678@N00/2911838707/",
        "download_url": "http://farm4.staticflickr.com/3164/2911838707_b3c6acd0df.jpg",
        "license_name": "Attribution+License",
        "license_url": "http://creativecommons.org/licenses/by/2.0/",
        "server": 3164,
        "farm": 4,
        "secret": "b3c6acd0df",
        "secret_original": "9a8b7c6d5e",
        "extension": "jpg",
        "marker": 0,
    }
    row.update(changes)
    return row


def test_sqlite_release_is_detected_by_content_and_read(yfcc, tmp_path: Path) -> None:
    path = yfcc.write_sqlite(tmp_path / "yfcc100m.tsv", [sqlite_row(), sqlite_row(photo_id=42, marker=1)])
    rows, stats = read_all(path)
    assert stats.layout == "yfcc100m-sqlite"
    assert all(isinstance(r, PhotoRecord) for r in rows)
    first, second = rows
    assert (first.line, first.photo_id, first.is_video) == (1, 2911838707, False)
    assert (second.line, second.photo_id, second.is_video) == (2, 42, True)
    assert first.title == "Harbour at dusk&more" and first.license_name == "Attribution License"
    assert (first.farm, first.server, first.date_uploaded) == ("4", "3164", 1370088000)
    assert first.tags == ("harbour", "boats")


def test_sqlite_nulls_read_as_empty_values(yfcc, tmp_path: Path) -> None:
    path = yfcc.write_sqlite(
        tmp_path / "db", [sqlite_row(description=None, secret_original=None, date_taken=None)]
    )
    record = only_record(read_all(path)[0])
    assert (record.description, record.secret_original, record.date_taken) == ("", "", "")


def test_sqlite_malformed_row_is_reported_with_its_row_number(yfcc, tmp_path: Path) -> None:
    path = yfcc.write_sqlite(
        tmp_path / "db",
        [sqlite_row(), sqlite_row(marker=7), sqlite_row(photo_id="x")],
    )
    rows, stats = read_all(path)
    assert isinstance(rows[0], PhotoRecord)
    assert [(r.line, r.reason) for r in rows[1:]] == [(2, "bad-marker"), (3, "bad-id")]
    assert stats.malformed == 2


def test_sqlite_text_that_is_not_utf8_is_kept_with_replacement_characters_and_a_warning(
    yfcc, tmp_path: Path
) -> None:
    path = yfcc.write_sqlite(tmp_path / "db", [sqlite_row()])
    conn = sqlite3.connect(path)
    conn.execute(f"UPDATE {SQLITE_TABLE} SET title = CAST(X'4dff6c6c6572' AS TEXT)")  # b"M\xffller"
    conn.commit()
    conn.close()
    rows, stats = read_all(path)
    assert only_record(rows).title == "M\ufffdller"
    assert stats.warnings == {"title": 1}


def test_sqlite_file_without_the_yfcc_table_is_a_metadata_error(tmp_path: Path) -> None:
    path = tmp_path / "other.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE photos (id INTEGER)")
    conn.commit()
    conn.close()
    with pytest.raises(MetadataError, match=SQLITE_TABLE):
        list(read_metadata(path))


def test_sqlite_table_missing_a_column_is_a_metadata_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "partial.sqlite"
    columns = [c for c in SQLITE_COLUMNS if c != "licenseurl"]
    conn = sqlite3.connect(path)
    conn.execute(f"CREATE TABLE {SQLITE_TABLE} ({', '.join(columns)})")
    conn.commit()
    conn.close()
    with pytest.raises(MetadataError, match="licenseurl"):
        list(read_metadata(path))

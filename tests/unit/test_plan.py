"""Planning: candidate URLs, per-row decisions, work units per split, the written plan and its summary,
and the `commoncanvas scrape plan` command's one-JSON-object contract."""

from __future__ import annotations

import bz2
import gzip
import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path
from urllib.parse import quote

import pytest

from commoncanvas.licenses import LicensePolicy
from commoncanvas.metadata import PART_BYTES, PhotoRecord
from commoncanvas.scrape.plan import (
    MALFORMED_REPORTED,
    PLAN_SUMMARY,
    PlannedSample,
    PlanSummary,
    candidate_urls,
    plan_hash,
    plan_record,
    read_unit_plan,
    read_units,
    unit_plan_key,
    write_plan,
)
from commoncanvas.specs.scrape import FetchPolicy, ScrapeJobSpec
from commoncanvas.storage import LocalStorage

CC_BY = ("Attribution License", "http://creativecommons.org/licenses/by/2.0/")
CC_BY_NC = ("Attribution-NonCommercial License", "http://creativecommons.org/licenses/by-nc/2.0/")
CC_BY_ND = ("Attribution-NoDerivs License", "http://creativecommons.org/licenses/by-nd/2.0/")
ORIGINAL = "https://farm4.staticflickr.com/3164/2911838707_9a8b7c6d5e_o.jpg"
LARGE = "https://farm4.staticflickr.com/3164/2911838707_b3c6acd0df_b.jpg"
DOWNLOAD = "http://farm4.staticflickr.com/3164/2911838707_b3c6acd0df.jpg"


def record(
    photo_id: int = 2911838707, license: tuple[str, str] = CC_BY, line: int = 1, **changes
) -> PhotoRecord:
    values = {
        "line": line,
        "photo_id": photo_id,
        "user_nsid": "12345678@N00",
        "user_nickname": "jane doe",
        "date_taken": "2013-06-01 12:00:00",
        "date_uploaded": 1370088000,
        "title": "Harbour at dusk",
        "description": "",
        "tags": ("harbour", "boats"),
        "page_url": f"http://www.flickr.com/photos/12345678@N00/{photo_id}/",
        "download_url": f"http://farm4.staticflickr.com/3164/{photo_id}_b3c6acd0df.jpg",
        "license_name": license[0],
        "license_url": license[1],
        "server": "3164",
        "farm": "4",
        "secret": "b3c6acd0df",
        "secret_original": "9a8b7c6d5e",
        "extension": "jpg",
        "is_video": False,
    }
    values.update(changes)
    return PhotoRecord(**values)


# --- candidate URLs ---------------------------------------------------------------------------------


def test_candidates_are_original_then_large_then_download_url() -> None:
    assert candidate_urls(record(), FetchPolicy()) == (ORIGINAL, LARGE, DOWNLOAD)


def test_original_url_uses_secret_original_and_the_rows_extension() -> None:
    urls = candidate_urls(record(extension="png"), FetchPolicy())
    assert urls[0] == "https://farm4.staticflickr.com/3164/2911838707_9a8b7c6d5e_o.png"
    assert urls[1] == LARGE  # the sized copy is always a JPEG


@pytest.mark.parametrize("missing", ["secret_original", "extension"])
def test_without_original_secret_or_extension_the_large_size_comes_first(missing: str) -> None:
    assert candidate_urls(record(**{missing: ""}), FetchPolicy()) == (LARGE, DOWNLOAD)


@pytest.mark.parametrize("missing", ["farm", "server"])
def test_without_farm_or_server_only_the_download_url_is_left(missing: str) -> None:
    assert candidate_urls(record(**{missing: ""}), FetchPolicy()) == (DOWNLOAD,)


def test_download_url_is_left_out_when_the_policy_says_so() -> None:
    assert candidate_urls(record(), FetchPolicy(use_download_url=False)) == (ORIGINAL, LARGE)


def test_a_url_listed_twice_is_tried_once() -> None:
    assert candidate_urls(record(download_url=LARGE), FetchPolicy()) == (ORIGINAL, LARGE)


def test_url_templates_from_the_policy_are_used() -> None:
    fetch = FetchPolicy(
        original_url_template="http://mirror/{farm}/{server}/{id}_{secret_original}_o.{ext}",
        sized_url_template="http://mirror/{farm}/{server}/{id}_{secret}_b.jpg",
    )
    assert candidate_urls(record(), fetch)[:2] == (
        "http://mirror/4/3164/2911838707_9a8b7c6d5e_o.jpg",
        "http://mirror/4/3164/2911838707_b3c6acd0df_b.jpg",
    )


# --- one row ----------------------------------------------------------------------------------------


def test_planned_sample_carries_license_attribution_candidates_and_every_field_read() -> None:
    extra = {
        "description": "A calm evening\u2028by the sea",
        "machine_tags": ("geo:lat=51.5",),
        "capture_device": "Canon EOS 5D",
        "longitude": "-0.12",
        "latitude": "51.5",
        "accuracy": "16",
        "photo_hash": "0123456789abcdef0123456789abcdef",
    }
    sample = plan_record(record(line=17, **extra), LicensePolicy(), FetchPolicy())
    assert sample == PlannedSample(
        photo_id=2911838707,
        line=17,
        split="commercial",
        license_code="cc-by",
        license_name="Attribution License",
        license_url="https://creativecommons.org/licenses/by/2.0/",
        author="jane doe",
        author_nsid="12345678@N00",
        title="Harbour at dusk",
        tags=("harbour", "boats"),
        page_url="http://www.flickr.com/photos/12345678@N00/2911838707/",
        candidates=(ORIGINAL, LARGE, DOWNLOAD),
        date_taken="2013-06-01 12:00:00",
        date_uploaded=1370088000,
        download_url=DOWNLOAD,
        **extra,
    )
    assert PlannedSample.from_json(sample.to_json()) == sample


def test_noncommercial_license_is_planned_into_the_noncommercial_split() -> None:
    sample = plan_record(record(license=CC_BY_NC), LicensePolicy(), FetchPolicy())
    assert isinstance(sample, PlannedSample)
    assert (sample.split, sample.license_code) == ("noncommercial", "cc-by-nc")


def test_video_is_excluded_even_under_an_allowed_license() -> None:
    assert plan_record(record(is_video=True), LicensePolicy(), FetchPolicy()) == "video"


@pytest.mark.parametrize(
    ("license", "reason"),
    [
        (CC_BY_ND, "license-not-allowed:cc-by-nd"),
        (("All Rights Reserved", ""), "license-not-allowed:all-rights-reserved"),
        (("Some Custom License", ""), "license-unknown"),
        (("", ""), "license-missing"),
        (("Attribution License", "http://creativecommons.org/licenses/by-nc/2.0/"), "license-conflict"),
    ],
)
def test_row_without_a_usable_license_is_excluded_with_the_reason(
    license: tuple[str, str], reason: str
) -> None:
    assert plan_record(record(license=license), LicensePolicy(), FetchPolicy()) == reason


def test_row_with_no_url_to_try_is_excluded() -> None:
    row = record(farm="", download_url="")
    assert plan_record(row, LicensePolicy(), FetchPolicy()) == "no-candidate-url"


def test_planned_sample_survives_a_json_round_trip_as_one_line_of_plain_json() -> None:
    title = 'Ünïcode "quoted"\nline\\ \x00\u2028'
    sample = plan_record(record(title=title, tags=("a\tb", "\x85")), LicensePolicy(), FetchPolicy())
    assert isinstance(sample, PlannedSample)
    assert PlannedSample.from_json(sample.to_json()) == sample
    assert sample.to_json() == json.dumps(sample._asdict(), ensure_ascii=False)
    assert "\n" not in sample.to_json()


# --- units ------------------------------------------------------------------------------------------

NC_COLUMNS = {
    "license_name": "Attribution-NonCommercial+License",
    "license_url": "http://creativecommons.org/licenses/by-nc/2.0/",
}


def plan_of(yfcc, tmp_path: Path, lines: list[str], **options) -> tuple[LocalStorage, PlanSummary]:
    """Write `lines` as a metadata file and plan it (options: unitSize ..., processes, part_bytes)."""
    run = {k: options.pop(k) for k in ("processes", "part_bytes") if k in options}
    metadata = yfcc.write_tsv(tmp_path / "yfcc100m.tsv", lines)
    storage = LocalStorage(tmp_path / "plan")
    summary = write_plan(spec_for(metadata, tmp_path / "out", **options), storage, **run)
    return storage, summary


def unit_ids(storage: LocalStorage) -> list[tuple[str, list[int]]]:
    return [
        (u["split"], [s.photo_id for s in read_unit_plan(storage, u["unit"])]) for u in read_units(storage)
    ]


@pytest.mark.parametrize("part_bytes", [PART_BYTES, 1], ids=["one-part", "a-part-per-line"])
def test_units_hold_one_split_each_and_fill_in_turn(yfcc, tmp_path: Path, part_bytes: int) -> None:
    nc = [4, 5, 7]
    lines = [yfcc.line(photo_id=str(n), **(NC_COLUMNS if n in nc else {})) for n in range(1, 8)]
    storage, summary = plan_of(yfcc, tmp_path, lines, unitSize=2, processes=1, part_bytes=part_bytes)
    assert unit_ids(storage) == [
        ("commercial", [1, 2]),
        ("noncommercial", [4, 5]),
        ("commercial", [3, 6]),
        ("noncommercial", [7]),
    ]
    assert summary.licenses == Counter({"cc-by": 4, "cc-by-nc": 3})


def test_every_planned_sample_lands_in_exactly_one_unit_no_larger_than_the_unit_size(
    yfcc, tmp_path: Path
) -> None:
    lines = [yfcc.line(photo_id=str(n), **({} if n % 3 else NC_COLUMNS)) for n in range(1, 50)]
    storage, _ = plan_of(yfcc, tmp_path, lines, unitSize=4, processes=1, part_bytes=700)
    units = read_units(storage)
    ids = [s.photo_id for u in units for s in read_unit_plan(storage, u["unit"])]
    assert sorted(ids) == list(range(1, 50))
    assert all(
        0 < u["samples"] <= 4 and {s.split for s in read_unit_plan(storage, u["unit"])} == {u["split"]}
        for u in units
    )


def test_exclusions_and_malformed_rows_are_counted_and_malformed_lines_kept(yfcc, tmp_path: Path) -> None:
    lines = [
        yfcc.line(photo_id="1"),
        yfcc.line(photo_id="2x"),
        yfcc.line(photo_id="3", marker="1"),
        yfcc.line(photo_id="4", license_name=CC_BY_ND[0], license_url=CC_BY_ND[1]),
        "\t".join(yfcc.line(photo_id="5").split("\t")[:12]),
    ]
    _, summary = plan_of(yfcc, tmp_path, lines)
    assert len(summary.units) == 1
    assert summary.excluded == Counter(
        {"malformed:bad-id": 1, "malformed:column-count": 1, "video": 1, "license-not-allowed:cc-by-nd": 1}
    )
    assert summary.malformed == [
        {"line": 2, "reason": "bad-id", "detail": "photo id '2x' is not a number"},
        {"line": 5, "reason": "column-count", "detail": "12 columns, expected 23"},
    ]


@pytest.mark.parametrize("part_bytes", [PART_BYTES, 50_000], ids=["one-part", "many-parts"])
def test_malformed_line_list_is_capped_but_the_count_stays_exact(
    yfcc, tmp_path: Path, part_bytes: int
) -> None:
    lines = [yfcc.line(photo_id=f"{n}x") for n in range(1, MALFORMED_REPORTED + 6)]
    _, summary = plan_of(yfcc, tmp_path, lines, processes=1, part_bytes=part_bytes)
    assert summary.excluded["malformed:bad-id"] == MALFORMED_REPORTED + 5
    assert len(summary.malformed) == MALFORMED_REPORTED
    assert [m["line"] for m in summary.malformed] == list(range(1, MALFORMED_REPORTED + 1))


def test_unreadable_informational_fields_are_warnings_by_field_and_never_exclude(
    yfcc, tmp_path: Path
) -> None:
    lines = [
        yfcc.line(photo_id="1", date_taken="4501-01-01 00:00:00.0"),
        yfcc.line(photo_id="2", date_taken="yesterday", longitude="east"),
        yfcc.line(photo_id="3", description="caf%E9"),
        yfcc.line(photo_id="4", date_uploaded="soon", accuracy="-"),
    ]
    _, summary = plan_of(yfcc, tmp_path, lines)
    assert (summary.commercial, summary.excluded) == (4, Counter())
    assert summary.to_dict()["warnings"] == {
        "accuracy": 1,
        "date_taken": 2,
        "date_uploaded": 1,
        "description": 1,
        "longitude": 1,
    }


def test_row_whose_farm_is_unreadable_is_fetched_from_its_download_url_alone(yfcc, tmp_path: Path) -> None:
    storage, summary = plan_of(yfcc, tmp_path, [yfcc.line(farm="four")])
    assert [s.candidates for s in read_unit_plan(storage, 0)] == [(DOWNLOAD,)]
    assert summary.warnings == Counter({"farm": 1})


# --- line separators inside fields -------------------------------------------------------------------


@pytest.mark.parametrize("encoded", [False, True], ids=["raw", "url-encoded"])
@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85", "\r"], ids=["LS", "PS", "NEL", "CR"])
def test_a_line_separator_in_title_author_or_tag_survives_plan_write_and_read(
    yfcc, tmp_path: Path, separator: str, encoded: bool
) -> None:
    text = quote(separator) if encoded else separator
    lines = [
        yfcc.line(photo_id="1", title=f"a{text}b", user_nickname=f"jane{text}doe", user_tags=f"x{text}y,z"),
        yfcc.line(photo_id="2"),
    ]
    storage, summary = plan_of(yfcc, tmp_path, lines)
    first, second = read_unit_plan(storage, 0)
    assert (first.title, first.author, first.tags) == (
        f"a{separator}b",
        f"jane{separator}doe",
        (f"x{separator}y", "z"),
    )
    assert (second.photo_id, second.title) == (2, "Harbour at dusk")
    assert summary.commercial == 2 and not summary.excluded


# --- the same plan whatever the parallelism ------------------------------------------------------------


def plan_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def mixed_rows(yfcc, count: int) -> list[str]:
    """Every kind of row, in an irregular order: C, NC, ND, video, malformed, warnings, blank lines."""
    nd = {"license_name": CC_BY_ND[0], "license_url": CC_BY_ND[1]}
    kinds = [
        {},
        NC_COLUMNS,
        nd,
        {"marker": "1"},
        {"photo_id": "x"},
        {"date_taken": "4501-01-01"},
        {},
        NC_COLUMNS,
    ]
    rows = []
    for n in range(1, count + 1):
        kind = kinds[(n * n + n // 7) % len(kinds)]
        rows.append(yfcc.line(**{"photo_id": str(n), "title": f"photo+{n}", **kind}))
        if n % 97 == 0:
            rows.append("")
    return rows


@pytest.mark.parametrize("container", ["plain", "gzip", "bz2", "sqlite"])
def test_plan_is_byte_identical_whatever_the_number_of_processes_and_parts(
    yfcc, tmp_path: Path, container: str
) -> None:
    lines = mixed_rows(yfcc, 3000)
    text = "".join(line + "\n" for line in lines).encode()
    metadata = tmp_path / "metadata"
    if container == "sqlite":
        yfcc.write_sqlite(metadata, [sqlite_values(yfcc, line) for line in lines if line])
    else:
        metadata.write_bytes(
            {"plain": text, "gzip": gzip.compress(text), "bz2": bz2.compress(text)}[container]
        )
    plans = {}
    for processes, part_bytes in [(1, PART_BYTES), (1, 20_000), (3, 20_000)]:
        root = tmp_path / f"plan-{processes}-{part_bytes}"
        write_plan(
            spec_for(metadata, tmp_path / "out", unitSize=37), LocalStorage(root), processes, part_bytes
        )
        plans[(processes, part_bytes)] = plan_files(root)
    sequential = plans[(1, PART_BYTES)]
    assert len([key for key in sequential if key.startswith("units/")]) > 20
    assert all(plan == sequential for plan in plans.values())


def sqlite_values(yfcc, line: str) -> dict[str, str]:
    return dict(zip(yfcc.values(), line.split("\t"), strict=True))


# --- the written plan -------------------------------------------------------------------------------


@pytest.fixture
def metadata_file(yfcc, tmp_path: Path) -> Path:
    """Three CC BY, two CC BY-NC, one CC BY-ND, one video and two malformed lines (4 and 9)."""
    nc = {
        "license_name": "Attribution-NonCommercial+License",
        "license_url": "http://creativecommons.org/licenses/by-nc/2.0/",
    }
    return yfcc.write_tsv(
        tmp_path / "yfcc100m.tsv",
        [
            yfcc.line(photo_id="1"),
            yfcc.line(photo_id="2", **nc),
            yfcc.line(photo_id="3"),
            yfcc.line(photo_id="4x"),
            yfcc.line(
                photo_id="5",
                license_name="Attribution-NoDerivs+License",
                license_url="http://creativecommons.org/licenses/by-nd/2.0/",
            ),
            yfcc.line(photo_id="6", marker="1"),
            yfcc.line(photo_id="7", **nc),
            yfcc.line(photo_id="8"),
            "\t".join(yfcc.line(photo_id="9").split("\t")[:12]),
        ],
    )


def spec_for(metadata: Path, output: Path, **changes) -> ScrapeJobSpec:
    return ScrapeJobSpec.model_validate(
        {"source": {"uri": str(metadata)}, "output": {"uri": str(output)}, **changes}
    )


def test_write_plan_writes_each_unit_the_unit_list_and_the_summary(
    metadata_file: Path, tmp_path: Path
) -> None:
    storage = LocalStorage(tmp_path / "plan")
    summary = write_plan(spec_for(metadata_file, tmp_path / "out", unitSize=2), storage)
    units = read_units(storage)
    assert units == [
        {"unit": 0, "split": "commercial", "samples": 2},
        {"unit": 1, "split": "noncommercial", "samples": 2},
        {"unit": 2, "split": "commercial", "samples": 1},
    ]
    assert [[s.photo_id for s in read_unit_plan(storage, u["unit"])] for u in units] == [[1, 3], [2, 7], [8]]
    assert storage.exists(unit_plan_key(2)) and not storage.exists(unit_plan_key(3))
    assert json.loads(storage.read_text(PLAN_SUMMARY)) == summary.to_dict()


def test_plan_summary_counts_every_row_exactly_once(metadata_file: Path, tmp_path: Path) -> None:
    summary = write_plan(spec_for(metadata_file, tmp_path / "out"), LocalStorage(tmp_path / "plan")).to_dict()
    assert (summary["commercial"], summary["noncommercial"], summary["rows"]) == (3, 2, 9)
    assert summary["excluded"] == {
        "license-not-allowed:cc-by-nd": 1,
        "malformed:bad-id": 1,
        "malformed:column-count": 1,
        "video": 1,
    }
    assert (
        summary["commercial"] + summary["noncommercial"] + sum(summary["excluded"].values())
        == summary["rows"]
    )
    assert summary["licenses"] == {"cc-by": 3, "cc-by-nc": 2}
    assert [(m["line"], m["reason"]) for m in summary["malformed"]] == [(4, "bad-id"), (9, "column-count")]
    assert summary["layout"] == "yfcc100m-2014-23col"


def test_plan_summary_has_the_documented_keys(metadata_file: Path, tmp_path: Path) -> None:
    summary = write_plan(spec_for(metadata_file, tmp_path / "out"), LocalStorage(tmp_path / "plan")).to_dict()
    assert set(summary) == {
        "commercial",
        "noncommercial",
        "excluded",
        "licenses",
        "warnings",
        "rows",
        "layout",
        "units",
        "malformed",
        "spec_hash",
    }
    assert summary["units"] == 2
    json.dumps(summary)  # JSON-serialisable as is


def test_license_policy_of_the_spec_decides_what_is_planned(metadata_file: Path, tmp_path: Path) -> None:
    spec = spec_for(metadata_file, tmp_path / "out", licenses={"allow": ["cc-by-nc"]})
    summary = write_plan(spec, LocalStorage(tmp_path / "plan"))
    assert (summary.commercial, summary.noncommercial) == (0, 2)
    assert summary.excluded["license-not-allowed:cc-by"] == 3


def test_plan_hash_changes_with_what_the_plan_depends_on_and_nothing_else(tmp_path: Path) -> None:
    base = spec_for(tmp_path / "m.tsv", tmp_path / "out")
    same = [
        spec_for(tmp_path / "m.tsv", tmp_path / "elsewhere"),
        spec_for(tmp_path / "m.tsv", tmp_path / "out", parallelism=64),
    ]
    different = [
        spec_for(tmp_path / "other.tsv", tmp_path / "out"),
        spec_for(tmp_path / "m.tsv", tmp_path / "out", unitSize=7),
        spec_for(tmp_path / "m.tsv", tmp_path / "out", licenses={"allow": ["cc0"]}),
        spec_for(tmp_path / "m.tsv", tmp_path / "out", fetch={"useDownloadUrl": False}),
    ]
    assert all(plan_hash(s) == plan_hash(base) for s in same)
    assert all(plan_hash(s) != plan_hash(base) for s in different)


# --- the CLI contract -------------------------------------------------------------------------------


def commoncanvas(*args: str) -> subprocess.CompletedProcess[str]:
    executable = Path(sys.executable).parent / "commoncanvas"
    return subprocess.run([str(executable), *args], capture_output=True, text=True, timeout=300, check=False)


def test_scrape_plan_prints_exactly_one_json_object_with_counts_and_malformed_lines(
    metadata_file: Path, tmp_path: Path
) -> None:
    done = commoncanvas(
        "scrape", "plan", "--metadata", str(metadata_file), "--output", str(tmp_path / "plan")
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1, f"stdout must be one JSON object, got: {done.stdout!r}"
    report = json.loads(lines[0])
    assert isinstance(report, dict)
    assert (report["commercial"], report["noncommercial"]) == (3, 2)
    assert report["excluded"]["video"] == 1
    assert report["excluded"]["license-not-allowed:cc-by-nd"] == 1
    assert [(m["line"], m["reason"]) for m in report["malformed"]] == [(4, "bad-id"), (9, "column-count")]
    assert (tmp_path / "plan" / PLAN_SUMMARY).is_file()


def test_scrape_plan_refuses_a_noderivs_license_with_a_message_naming_the_option(
    metadata_file: Path, tmp_path: Path
) -> None:
    done = commoncanvas(
        "scrape",
        "plan",
        "--metadata",
        str(metadata_file),
        "--output",
        str(tmp_path / "plan"),
        "--allow",
        "cc-by-nd",
    )
    assert done.returncode != 0
    assert done.stdout == ""
    assert "licenses.allow" in done.stderr


@pytest.mark.parametrize("damage", ["random-bytes", "truncated-gzip", "truncated-bz2", "corrupt-sqlite"])
def test_scrape_plan_of_an_unreadable_file_fails_with_one_line_naming_the_file_and_the_cause(
    yfcc, tmp_path: Path, damage: str
) -> None:
    text = "".join(yfcc.line(photo_id=str(n), title=f"t{n * 7919}") + "\n" for n in range(1, 3000)).encode()
    noise = random.Random(11).randbytes(100_000)
    data = {
        "random-bytes": noise,
        "truncated-gzip": half(gzip.compress(text)),
        "truncated-bz2": half(bz2.compress(text)),
        "corrupt-sqlite": b"SQLite format 3\x00" + noise,
    }[damage]
    metadata = tmp_path / "metadata"
    metadata.write_bytes(data)
    done = commoncanvas("scrape", "plan", "--metadata", str(metadata), "--output", str(tmp_path / "plan"))
    assert done.returncode != 0 and done.stdout == ""
    message = done.stderr.strip()
    assert len(message.splitlines()) == 1, message
    assert str(metadata) in message
    assert "Traceback" not in message and "Aborted!" not in message


def half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def test_scrape_plan_of_a_missing_file_fails_without_a_traceback(tmp_path: Path) -> None:
    done = commoncanvas(
        "scrape", "plan", "--metadata", str(tmp_path / "none.tsv"), "--output", str(tmp_path / "plan")
    )
    assert done.returncode != 0
    assert "does not exist" in done.stderr and "Traceback" not in done.stderr

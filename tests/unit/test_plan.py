"""Planning: candidate URLs, per-row decisions, work units per split, the written plan and its summary,
and the `commoncanvas scrape plan` command's one-JSON-object contract."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from commoncanvas.licenses import LicensePolicy
from commoncanvas.metadata import MalformedRow, PhotoRecord
from commoncanvas.scrape.plan import (
    MALFORMED_REPORTED,
    PLAN_SUMMARY,
    PlannedSample,
    PlanSummary,
    candidate_urls,
    iter_plan,
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


def test_planned_sample_carries_license_attribution_and_candidates() -> None:
    sample = plan_record(record(line=17), LicensePolicy(), FetchPolicy())
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
    )


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


def test_planned_sample_survives_a_json_round_trip() -> None:
    sample = plan_record(record(title='Ünïcode "quoted"\nline'), LicensePolicy(), FetchPolicy())
    assert isinstance(sample, PlannedSample)
    assert PlannedSample.from_json(sample.to_json()) == sample


# --- units ------------------------------------------------------------------------------------------


def test_units_hold_one_split_each_and_fill_in_turn() -> None:
    rows = [
        record(1),
        record(2),
        record(3),
        record(4, CC_BY_NC),
        record(5, CC_BY_NC),
        record(6),
        record(7, CC_BY_NC),
    ]
    summary = PlanSummary()
    units = [
        (split, [s.photo_id for s in samples])
        for split, samples in iter_plan(rows, LicensePolicy(), FetchPolicy(), 2, summary)
    ]
    assert units == [
        ("commercial", [1, 2]),
        ("noncommercial", [4, 5]),
        ("commercial", [3, 6]),
        ("noncommercial", [7]),
    ]
    assert summary.licenses == Counter({"cc-by": 4, "cc-by-nc": 3})


def test_every_planned_sample_lands_in_exactly_one_unit_no_larger_than_the_unit_size() -> None:
    rows = [record(i, CC_BY if i % 3 else CC_BY_NC) for i in range(1, 50)]
    units = list(iter_plan(rows, LicensePolicy(), FetchPolicy(), 4, PlanSummary()))
    ids = [s.photo_id for _, samples in units for s in samples]
    assert sorted(ids) == list(range(1, 50))
    assert all(0 < len(samples) <= 4 and {s.split for s in samples} == {split} for split, samples in units)


def test_exclusions_and_malformed_rows_are_counted_and_malformed_lines_kept() -> None:
    rows = [
        record(1),
        MalformedRow(2, "bad-date", "year 4501"),
        record(3, is_video=True),
        record(4, CC_BY_ND),
        MalformedRow(5, "column-count", "12 columns"),
    ]
    summary = PlanSummary()
    assert len(list(iter_plan(rows, LicensePolicy(), FetchPolicy(), 10, summary))) == 1
    assert summary.excluded == Counter(
        {"malformed:bad-date": 1, "malformed:column-count": 1, "video": 1, "license-not-allowed:cc-by-nd": 1}
    )
    assert summary.malformed == [
        {"line": 2, "reason": "bad-date", "detail": "year 4501"},
        {"line": 5, "reason": "column-count", "detail": "12 columns"},
    ]


def test_malformed_line_list_is_capped_but_the_count_stays_exact() -> None:
    rows = [MalformedRow(n, "bad-id") for n in range(1, MALFORMED_REPORTED + 6)]
    summary = PlanSummary()
    list(iter_plan(rows, LicensePolicy(), FetchPolicy(), 10, summary))
    assert summary.excluded["malformed:bad-id"] == MALFORMED_REPORTED + 5
    assert len(summary.malformed) == MALFORMED_REPORTED
    assert summary.malformed[0]["line"] == 1


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
            yfcc.line(photo_id="4", date_taken="4501-01-01 00:00:00.0"),
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
        "malformed:bad-date": 1,
        "malformed:column-count": 1,
        "video": 1,
    }
    assert (
        summary["commercial"] + summary["noncommercial"] + sum(summary["excluded"].values())
        == summary["rows"]
    )
    assert summary["licenses"] == {"cc-by": 3, "cc-by-nc": 2}
    assert [(m["line"], m["reason"]) for m in summary["malformed"]] == [(4, "bad-date"), (9, "column-count")]
    assert summary["layout"] == "yfcc100m-2014-23col"


def test_plan_summary_has_the_documented_keys(metadata_file: Path, tmp_path: Path) -> None:
    summary = write_plan(spec_for(metadata_file, tmp_path / "out"), LocalStorage(tmp_path / "plan")).to_dict()
    assert set(summary) == {
        "commercial",
        "noncommercial",
        "excluded",
        "licenses",
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
    assert [(m["line"], m["reason"]) for m in report["malformed"]] == [(4, "bad-date"), (9, "column-count")]
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


def test_scrape_plan_of_a_missing_file_fails_without_a_traceback(tmp_path: Path) -> None:
    done = commoncanvas(
        "scrape", "plan", "--metadata", str(tmp_path / "none.tsv"), "--output", str(tmp_path / "plan")
    )
    assert done.returncode != 0
    assert "does not exist" in done.stderr and "Traceback" not in done.stderr

"""The data card: counts of what was trained on, an attribution manifest, and a loud license check."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from commoncanvas.licenses import BY_CODE
from commoncanvas.storage import open_storage
from commoncanvas.train.datacard import (
    DatasetStream,
    LicenseViolation,
    build_datacard,
    license_problem,
    write_datacard,
)


def record(photo: int, code: str, split: str = "commercial", **extra: Any) -> dict[str, Any]:
    return {
        "photo_id": photo,
        "split": split,
        "license_code": code,
        "license_url": BY_CODE[code].url if code in BY_CODE else "",
        "author": f"author {photo}",
        "page_url": f"https://www.flickr.com/photos/x/{photo}/",
        "caption_model": "Salesforce/blip2-opt-2.7b",
        "caption_model_revision": "abc",
        **extra,
    }


STREAMS = [DatasetStream("s3://b/captions/commercial", "commercial", 3)]


def card_of(records: list[dict[str, Any]], tmp_path: Path) -> dict[str, Any]:
    return build_datacard(
        records, STREAMS, tmp_path / "m.jsonl", run="r", step=5, images_seen=10, manifest_url="m"
    )


def test_counts_are_of_distinct_photos_by_split_and_license(tmp_path: Path) -> None:
    records = [record(1, "cc-by"), record(2, "cc0"), record(1, "cc-by", epoch=1), record(3, "cc-by")]
    card = card_of(records, tmp_path)
    assert card["trained"] == {
        "samplesSeen": 4,
        "distinctSamples": 3,
        "bySplit": {"commercial": 3},
        "byLicense": {"cc-by": 2, "cc0": 1},
        "bySplitAndLicense": {"commercial": {"cc-by": 2, "cc0": 1}},
    }
    assert card["captioner"] == [{"model": "Salesforce/blip2-opt-2.7b", "revision": "abc"}]


def test_the_manifest_attributes_each_photo_once_with_author_license_and_page(tmp_path: Path) -> None:
    card_of([record(1, "cc-by"), record(1, "cc-by"), record(2, "cc-by-sa")], tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "m.jsonl").read_bytes().decode().split("\n") if line]
    assert [line["photo_id"] for line in lines] == [1, 2]
    assert lines[1] == {
        "photo_id": 2,
        "split": "commercial",
        "license_code": "cc-by-sa",
        "license_url": "https://creativecommons.org/licenses/by-sa/2.0/",
        "author": "author 2",
        "page_url": "https://www.flickr.com/photos/x/2/",
    }


@pytest.mark.parametrize(
    ("code", "split", "why"),
    [
        ("cc-by-nd", "commercial", "forbids derivatives"),
        ("cc-by-nc-nd", "noncommercial", "forbids derivatives"),
        ("all-rights-reserved", "commercial", "forbids derivatives"),
        ("cc-by-9000", "commercial", "unknown license"),
        ("cc-by-nc", "commercial", "forbids commercial use"),
    ],
)
def test_a_license_that_does_not_allow_training_fails_the_card_naming_the_photo(
    tmp_path: Path, code: str, split: str, why: str
) -> None:
    assert why in license_problem(code, split)
    with pytest.raises(LicenseViolation, match=rf"{why}.*photo ids \[42\]"):
        card_of([record(1, "cc-by"), record(42, code, split)], tmp_path)


def test_every_license_that_allows_derivatives_may_train_in_its_split() -> None:
    for lic in (lic for lic in BY_CODE.values() if lic.derivatives):
        assert license_problem(lic.code, "noncommercial") == ""
        assert (license_problem(lic.code, "commercial") == "") == lic.commercial


def test_the_card_is_written_as_json_and_markdown_next_to_the_manifest(tmp_path: Path) -> None:
    output = open_storage(tmp_path)
    write_datacard(output, [record(1, "cc-by"), record(2, "cc0")], STREAMS, run="r", step=5, images_seen=10)
    card = json.loads((tmp_path / "datacard.json").read_text())
    assert card["attributionManifest"] == str(tmp_path / "attribution.jsonl")
    assert card["licenses"]["cc0"]["derivatives"] is True
    markdown = (tmp_path / "datacard.md").read_text()
    assert "| commercial | cc-by | 1 |" in markdown
    assert "Salesforce/blip2-opt-2.7b @ abc" in markdown

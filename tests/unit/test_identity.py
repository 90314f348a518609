"""One output, one set of settings: a rerun into an output made otherwise is refused, naming the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from commoncanvas.caption.unitplan import ensure_caption_plan
from commoncanvas.identity import OutputReused
from commoncanvas.scrape.worker import ensure_plan, layout_of
from commoncanvas.specs import CaptionJobSpec, ScrapeJobSpec
from commoncanvas.units import StageLayout


@pytest.fixture
def metadata(yfcc: Any, tmp_path: Path) -> Path:
    return yfcc.write_tsv(tmp_path / "yfcc.tsv", [yfcc.line(photo_id="1"), yfcc.line(photo_id="2")])


def scrape_spec(metadata: Path, output: Path, **changes: Any) -> ScrapeJobSpec:
    return ScrapeJobSpec.model_validate(
        {"source": {"uri": str(metadata)}, "output": {"uri": str(output)}, **changes}
    )


def catalog(root: Path) -> Path:
    for split in ("commercial", "noncommercial"):
        (root / split).mkdir(parents=True)
        (root / split / "index.json").write_text(json.dumps({"version": 2, "shards": []}))
    return root


def caption_spec(source: Path, output: Path, **changes: Any) -> CaptionJobSpec:
    return CaptionJobSpec.model_validate(
        {"input": {"uris": [str(source)]}, "output": {"uri": str(output)}, **changes}
    )


def test_a_scrape_rerun_with_another_min_side_is_refused_naming_the_field(
    metadata: Path, tmp_path: Path
) -> None:
    first = scrape_spec(metadata, tmp_path / "out")
    ensure_plan(first, layout_of(first))
    ensure_plan(first, layout_of(first))  # the same settings again: reused
    changed = scrape_spec(metadata, tmp_path / "out", filters={"minSide": 512})
    with pytest.raises(OutputReused, match=r"made with spec\.filters\.minSide=256, this ScrapeJob has 512"):
        ensure_plan(changed, layout_of(changed))


def test_settings_that_do_not_change_outputs_may_change(metadata: Path, tmp_path: Path) -> None:
    first = scrape_spec(metadata, tmp_path / "out")
    ensure_plan(first, layout_of(first))
    faster = scrape_spec(metadata, tmp_path / "out", parallelism=64, fetch={"concurrency": 8, "retries": 9})
    ensure_plan(faster, layout_of(faster))


def test_a_caption_rerun_with_another_prompt_or_decoding_is_refused(tmp_path: Path) -> None:
    source = catalog(tmp_path / "catalog")
    spec = caption_spec(source, tmp_path / "captions")
    ensure_caption_plan(spec, StageLayout.at(spec.output.uri), None)
    for changes, field in (
        ({"prompt": "a picture of"}, r"spec\.prompt"),
        ({"decoding": {"numBeams": 3}}, r"spec\.decoding\.numBeams"),
        ({"imageSize": 384}, r"spec\.imageSize"),
        ({"model": {"source": "other/blip2"}}, r"spec\.model\.source"),
    ):
        changed = caption_spec(source, tmp_path / "captions", **changes)
        with pytest.raises(OutputReused, match=rf"made with {field}="):
            ensure_caption_plan(changed, StageLayout.at(changed.output.uri), None)


def test_another_stages_output_is_refused(metadata: Path, tmp_path: Path) -> None:
    scrape = scrape_spec(metadata, tmp_path / "shared")
    ensure_plan(scrape, layout_of(scrape))
    catalog(tmp_path / "catalog")
    spec = caption_spec(tmp_path / "catalog", tmp_path / "shared")
    with pytest.raises(
        OutputReused, match=r"holds a ScrapeJob's output; give this CaptionJob its own spec\.output\.uri"
    ):
        ensure_caption_plan(spec, StageLayout.at(spec.output.uri), None)


@pytest.mark.parametrize("output", ["catalog", "catalog/", "catalog/captions"])
def test_a_caption_output_that_is_or_lies_in_its_input_is_refused(tmp_path: Path, output: str) -> None:
    source = catalog(tmp_path / "catalog")
    spec = caption_spec(source, tmp_path / output)
    with pytest.raises(
        OutputReused, match=r"spec\.output\.uri .* overlaps spec\.input\.uris .* a place of its own"
    ):
        ensure_caption_plan(spec, StageLayout.at(spec.output.uri), None)
    assert not (tmp_path / "catalog" / "_plan").exists(), "nothing may be written into the input"


def test_a_credential_in_a_setting_never_reaches_the_recorded_identity(
    metadata: Path, tmp_path: Path
) -> None:
    spec = scrape_spec(
        metadata,
        tmp_path / "out",
        fetch={"originalUrlTemplate": "https://user:s3cret@mirror.example/{id}.jpg"},
    )
    ensure_plan(spec, layout_of(spec))
    assert "s3cret" not in "".join(p.read_text() for p in (tmp_path / "out" / "_plan").glob("*.json"))

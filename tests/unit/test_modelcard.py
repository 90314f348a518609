"""The model card: the license derived from the trained data, front matter the Hub parses, and
evaluation results recorded into it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from huggingface_hub import ModelCard

from commoncanvas.storage import LocalStorage
from commoncanvas.train.datacard import CARD_JSON, DatasetStream, build_datacard
from commoncanvas.train.modelcard import (
    MIXED_LICENSE_NAME,
    MODEL_CARD,
    NOT_DECLARED,
    InvalidEvaluation,
    model_license,
    record_evaluation,
    write_model_card,
)


@pytest.mark.parametrize(
    ("by_license", "hub_id", "commercial"),
    [
        ({"cc-by": 5, "cc0": 2, "public-domain-mark": 1}, "cc-by-4.0", True),
        ({"cc-by": 5, "cc-by-sa": 1}, "cc-by-sa-4.0", True),
        ({"cc-by": 5, "cc-by-nc": 1}, "cc-by-nc-4.0", False),
        ({"cc-by-nc": 3, "cc-by-nc-sa": 1, "cc-by": 4}, "cc-by-nc-sa-4.0", False),
        ({"cc-by-sa": 2, "cc-by-nc": 1}, "other", False),  # BY-SA's terms cannot carry an NC photo
        ({"cc-by-sa": 2, "cc-by-nc-sa": 1}, "other", False),  # two ShareAlike licenses
    ],
)
def test_the_model_license_allows_commercial_use_only_if_every_photo_does_and_names_share_alike(
    by_license: dict[str, int], hub_id: str, commercial: bool
) -> None:
    lic = model_license(by_license)

    assert (lic.hub_id, lic.commercial) == (hub_id, commercial)
    text = " ".join(lic.restrictions)
    assert ("Non-commercial use only" in text) == (not commercial)
    assert ("ShareAlike" in text) == any("sa" in code.split("-") for code in by_license)
    assert (lic.name, lic.link) == ((MIXED_LICENSE_NAME, CARD_JSON) if hub_id == "other" else (None, None))


@pytest.mark.parametrize("codes", [{"cc-by": 1, "cc-by-nd": 1}, {"mystery": 1}, {}])
def test_no_model_license_is_derived_from_nd_unknown_or_no_data(codes: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="no license can be derived"):
        model_license(codes)


def datacard(tmp_path: Path, codes: list[tuple[str, str]], captioner: str) -> dict[str, Any]:
    records = [
        {
            "photo_id": n,
            "split": split,
            "license_code": code,
            "license_url": "https://creativecommons.org/licenses/by/2.0/",
            "author": f"author {n}",
            "page_url": f"https://www.flickr.com/photos/x/{n}/",
            "caption_model": captioner,
            "caption_model_revision": "abc123",
        }
        for n, (split, code) in enumerate(codes)
    ]
    return build_datacard(
        records,
        [DatasetStream("s3://data/captions/commercial", "commercial", len(records))],
        tmp_path / "attribution.jsonl",
        run="tiny-run",
        step=10,
        images_seen=20,
        manifest_url="s3://out/attribution.jsonl",
    )


def front_matter(text: str) -> dict[str, Any]:
    assert text.startswith("---\n")
    parsed: dict[str, Any] = yaml.safe_load(text.split("---\n", 2)[1])
    return parsed


def results(name: str, fid: float) -> dict[str, Any]:
    return {
        "name": name,
        "prompts": {"source": "s3://captions/evaluation/captions.jsonl", "count": 30},
        "references": {"source": "s3://catalog/evaluation", "count": 30},
        "resolution": 512,
        "rows": [
            {"guidanceScale": 3.0, "fid": fid, "kid": 0.01, "clipFid": 5.5, "clipScore": 0.3},
            {"guidanceScale": 7.5, "fid": fid + 1, "kid": None, "clipFid": 6.0, "clipScore": 0.31},
        ],
    }


def test_the_card_front_matter_parses_as_yaml_with_the_keys_the_hub_reads(tmp_path: Path) -> None:
    card = datacard(
        tmp_path, [("commercial", "cc-by"), ("noncommercial", "cc-by-nc-sa")], "Salesforce/blip2-opt-2.7b"
    )
    pipeline = LocalStorage(tmp_path / "pipeline")

    write_model_card(pipeline, card)

    text = pipeline.read_text(MODEL_CARD)
    meta = front_matter(text)
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "text-to-image"
    assert meta["license"] == "cc-by-nc-sa-4.0"
    assert {"text-to-image", "stable-diffusion", "creative-commons"} <= set(meta["tags"])
    assert meta["datasets"] == ["s3://data/captions/commercial"]
    assert "model-index" not in meta, "no metrics before an evaluation"
    assert ModelCard(text).data.license == "cc-by-nc-sa-4.0", "huggingface_hub reads it back"
    assert "| noncommercial | cc-by-nc-sa | 1 |" in text and "| commercial | cc-by | 1 |" in text
    assert "s3://out/attribution.jsonl" in text and "LAION-400M" in text and "abc123" in text
    assert json.loads(pipeline.read_text(CARD_JSON)) == card


def test_an_unknown_captioner_is_said_to_declare_no_training_data(tmp_path: Path) -> None:
    pipeline = LocalStorage(tmp_path / "pipeline")
    write_model_card(pipeline, datacard(tmp_path, [("commercial", "cc-by")], "someone/own-captioner"))

    assert f"| someone/own-captioner | abc123 | {NOT_DECLARED} |" in pipeline.read_text(MODEL_CARD)


def test_recording_an_evaluation_twice_under_one_name_replaces_it_in_files_and_model_index(
    tmp_path: Path,
) -> None:
    pipeline = LocalStorage(tmp_path / "pipeline")
    write_model_card(pipeline, datacard(tmp_path, [("commercial", "cc-by")], "Salesforce/blip2-opt-2.7b"))

    record_evaluation(pipeline, results("nd-eval", 20.0))
    record_evaluation(pipeline, results("nd-eval", 12.5))
    record_evaluation(pipeline, results("coco-30k", 15.0))

    assert sorted(pipeline.list("evaluation")) == ["evaluation/coco-30k.json", "evaluation/nd-eval.json"]
    text = pipeline.read_text(MODEL_CARD)
    metrics = {
        (entry["dataset"]["name"], metric["type"], metric.get("config")): metric["value"]
        for model in front_matter(text)["model-index"]
        for entry in model["results"]
        for metric in entry["metrics"]
    }
    assert metrics[("nd-eval", "fid", "guidanceScale=3")] == 12.5
    assert metrics[("nd-eval", "fid", "guidanceScale=7.5")] == 13.5
    assert ("nd-eval", "kid", "guidanceScale=7.5") not in metrics, "a missing metric is not invented"
    assert len([k for k in metrics if k[0] == "nd-eval"]) == 7
    assert text.count("### nd-eval") == 1 and "| 3 | 12.5 | 0.01 | 5.5 | 0.3 |" in text


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"name": "../escape"}, "results.name"),
        ({"rows": []}, "results.rows"),
        ({"rows": [{"guidanceScale": 7.5, "fid": float("nan")}]}, r"results.rows\[0\].fid"),
        ({"rows": [{"guidanceScale": "high"}]}, r"results.rows\[0\].guidanceScale"),
    ],
)
def test_evaluation_results_that_cannot_go_into_a_card_are_refused_naming_the_field(
    tmp_path: Path, bad: dict[str, Any], field: str
) -> None:
    pipeline = LocalStorage(tmp_path / "pipeline")
    write_model_card(pipeline, datacard(tmp_path, [("commercial", "cc-by")], "Salesforce/blip2-opt-2.7b"))

    with pytest.raises(InvalidEvaluation, match=field):
        record_evaluation(pipeline, {**results("ok", 1.0), **bad})
    assert not list(pipeline.list("evaluation"))

"""EvalRun on this machine, after its TrainRun in the same file: the tiny SD2 trained for a few steps,
then FID/KID/CLIP-FID/CLIP score at two guidance scales over two workers, with tiny extractors."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image
from tests.integration.test_train import COMMERCIAL, train_run, write_split

from commoncanvas import units
from commoncanvas.models import TINY_CLIP_SEED, write_tiny_clip, write_tiny_inception
from commoncanvas.runner import LocalRun, run_file
from commoncanvas.specs import EvalRun
from commoncanvas.storage import open_storage

pytestmark = pytest.mark.integration
PROMPTS = ["a cat on a sofa", "a red bicycle", "a bowl of fruit", "a mountain lake", "a city street at night"]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("eval")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COMMONCANVAS_MODEL_CACHE", str(work / "models"))
        patch.setenv("HF_HUB_OFFLINE", "1")
        write_split(work / "data", "commercial", [COMMERCIAL[i % 3] for i in range(6)], 1000)
        clip = write_tiny_clip(work / "clip", seed=TINY_CLIP_SEED)
        inception = write_tiny_inception(work / "inception")
        (work / "prompts.jsonl").write_text(
            "".join(json.dumps({"id": i, "caption": c}) + "\n" for i, c in enumerate(PROMPTS))
        )
        train = train_run(
            "tiny-train",
            str(work / "data"),
            str(work / "train"),
            str(work / "ckpt"),
            dataset={"mix": [{"split": "commercial", "weight": 1.0}]},
            schedule={"maxSteps": 2, "warmupSteps": 1},
        )
        evalrun = {
            "apiVersion": "commoncanvas.dev/v1alpha1",
            "kind": "EvalRun",
            "metadata": {"name": "tiny-eval"},
            "spec": {
                "model": {"trainRunRef": "tiny-train"},
                "prompts": {"uri": str(work / "prompts.jsonl"), "limit": 4},
                # The training split itself as references (an MDS dataset with an image column).
                "references": {"uri": str(work / "data" / "commercial")},
                "extractors": {"inception": str(inception), "clip": str(clip)},
                "output": {"uri": str(work / "out")},
                "resolution": 64,
                "guidanceScales": [1.5, 7.5],
                "inferenceSteps": 2,
                "samplesPerUnit": 2,
                "parallelism": 2,
                "gpusPerPod": 0,
            },
        }
        path = work / "pipeline.yaml"
        documents = [train.model_dump(mode="json", by_alias=True, exclude_none=True), evalrun]
        path.write_text(yaml.safe_dump_all(documents))
        first = run_file(path, show_progress=False)
        listing = sorted(
            p.relative_to(work / "out").as_posix() for p in (work / "out").rglob("*") if p.is_file()
        )
        markers = units.read_markers(open_storage(work / "out"))
        # The EvalRun again (its TrainRun is done): every unit has its marker, so nothing runs twice.
        local = LocalRun(show_progress=False)
        local.outputs[("TrainRun", "tiny-train")] = str(work / "train")
        again = [local.run(EvalRun.model_validate(evalrun))]
    return {"work": work, "first": first[-1], "again": again[-1], "listing": listing, "markers": markers}


def test_results_have_every_metric_per_guidance_scale(evaluated: dict[str, Any]) -> None:
    results = evaluated["first"]
    assert results["kind"] == "EvalRun" and results["model"].endswith("/train/pipeline")
    assert [row["guidanceScale"] for row in results["rows"]] == [1.5, 7.5]
    for row in results["rows"]:
        assert row["fid"] >= 0 and row["clipFid"] >= 0 and 0 < row["clipScore"] <= 100
        assert isinstance(row["kid"], float)
    assert results["prompts"]["count"] == 4 and results["prompts"]["available"] == 5
    assert results["references"]["count"] == 6
    assert (results["workers"], results["modelLoads"]) == (2, 2)
    stored = json.loads((evaluated["work"] / "out" / "results.json").read_text())
    assert stored["rows"] == results["rows"]


def test_the_plot_is_a_png_that_decodes(evaluated: dict[str, Any]) -> None:
    image = Image.open(io.BytesIO(Path(evaluated["first"]["outputs"]["plot"]).read_bytes()))
    image.load()
    assert image.format == "PNG" and image.size[0] > 100


def test_generation_was_sharded_and_a_rerun_duplicates_nothing(evaluated: dict[str, Any]) -> None:
    markers, listing = evaluated["markers"], evaluated["listing"]
    # 4 prompts x 2 scales in units of 2, then 6 reference images in units of 2 or more (whole shards).
    generated = [m for m in markers.values() if m["split"] == "generated"]
    assert len(generated) == 4 and sum(m["written"] for m in generated) == 8
    assert len({m["worker"] for m in markers.values()}) == 2
    assert sum(m["written"] for m in markers.values() if m["split"] == "references") == 6
    assert all(m["attempt"] == 0 for m in markers.values())
    assert sum(1 for p in listing if p.endswith("/features.npz")) == len(markers)
    assert any(p.startswith("generated/unit-000000/a000/images/") for p in listing)
    after = sorted(
        p.relative_to(evaluated["work"] / "out").as_posix()
        for p in (evaluated["work"] / "out").rglob("*")
        if p.is_file() and not p.name.startswith(("w0", "fid-vs"))
    )
    assert [p for p in after if not p.startswith("_workers/")] == [
        p for p in listing if not p.startswith("_workers/") and not p.startswith("fid-vs")
    ]
    assert evaluated["again"]["rows"] == evaluated["first"]["rows"]


def test_the_model_card_of_the_trained_pipeline_records_the_evaluation(evaluated: dict[str, Any]) -> None:
    pipeline = evaluated["work"] / "train" / "pipeline"
    recorded = json.loads((pipeline / "evaluation" / "tiny-eval.json").read_text())
    assert recorded["rows"] == evaluated["first"]["rows"]
    assert "tiny-eval" in (pipeline / "README.md").read_text()

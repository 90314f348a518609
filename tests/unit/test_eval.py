"""EvalRun: its spec, its unit plan, and metric math that is clean-fid's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from commoncanvas.eval import plan
from commoncanvas.eval.features import clip_scores
from commoncanvas.eval.score import fid_from_features, kid_from_features, score_rows
from commoncanvas.identity import OutputReused
from commoncanvas.specs import KINDS, load_resources
from commoncanvas.specs.common import SpecError
from commoncanvas.specs.eval import EvalRunSpec
from commoncanvas.units import StageLayout


def spec_body(tmp_path: Path, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": {"pipelineUri": str(tmp_path / "pipeline")},
        "prompts": {"uri": str(tmp_path / "prompts.jsonl"), "limit": 5, "seed": 3},
        "references": {"uri": str(tmp_path / "refs")},
        "extractors": {"inception": str(tmp_path / "inception.pt"), "clip": str(tmp_path / "clip")},
        "output": {"uri": str(tmp_path / "out")},
        "guidanceScales": [1.5, 7.5],
        "samplesPerUnit": 2,
    }
    body.update(changes)
    return body


def write_inputs(tmp_path: Path, captions: int = 7, images: int = 3) -> None:
    lines = [
        json.dumps({"id": i, "caption": f"caption {i}", "license_code": "cc-by-nd"}) for i in range(captions)
    ]
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "refs").mkdir()
    for i in range(images):
        (tmp_path / "refs" / f"{i}.png").write_bytes(b"not decoded when planning")


def test_the_spec_defaults_to_every_metric_at_512_px_and_four_guidance_scales(tmp_path: Path) -> None:
    body = spec_body(tmp_path)
    del body["guidanceScales"]
    spec = EvalRunSpec.model_validate(body)
    assert spec.metrics == ["fid", "kid", "clipFid", "clipScore"]
    assert (spec.resolution, spec.guidance_scales, spec.seeds) == (512, [1.5, 3.0, 5.0, 7.5], [0])


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"model": {"pipelineUri": "/p", "trainRunRef": "t"}}, "model", "exactly one of model.trainRunRef"),
        ({"model": {}}, "model", "exactly one of model.trainRunRef"),
        ({"prompts": {"uri": "/p", "captionJobRef": "c"}}, "prompts", "exactly one of prompts.uri"),
        ({"guidanceScales": [3, 3]}, "guidanceScales", "repeat"),
        ({"guidanceScales": [-1]}, "guidanceScales", "between 0 and 50"),
        ({"metrics": ["fid", "isc"]}, "metrics.1", "'fid', 'kid', 'clipFid' or 'clipScore'"),
        ({"resolution": 100}, "resolution", "multiple of 8"),
    ],
)
def test_each_bad_field_is_one_error_line_naming_it(
    tmp_path: Path, changes: dict[str, Any], field: str, message: str
) -> None:
    body = spec_body(tmp_path, **changes)
    document = {
        "apiVersion": "commoncanvas.dev/v1alpha1",
        "kind": "EvalRun",
        "metadata": {"name": "e"},
        "spec": body,
    }
    path = tmp_path / "eval.yaml"
    path.write_text(json.dumps(document))
    with pytest.raises(SpecError) as caught:
        load_resources(path, KINDS)
    text = str(caught.value)
    assert "\n" not in text
    assert text.startswith(f"{path}:1: ") and f"spec.{field}" in text and message in text


def test_the_crd_asks_the_api_server_for_exactly_one_model_and_prompt_source() -> None:
    from commoncanvas.crd import build_crd

    crd = build_crd("EvalRun")
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert crd["spec"]["names"]["shortNames"] == ["er"] and crd["spec"]["names"]["plural"] == "evalruns"
    rules = [spec[part]["x-kubernetes-validations"][0]["rule"] for part in ("model", "prompts")]
    assert rules == [
        "has(self.trainRunRef) != has(self.pipelineUri)",
        "has(self.uri) != has(self.captionJobRef)",
    ]


def test_the_plan_has_units_per_scale_seed_and_slice_of_sampled_prompts_then_reference_units(
    tmp_path: Path,
) -> None:
    write_inputs(tmp_path)
    spec = EvalRunSpec.model_validate(spec_body(tmp_path, seeds=[0, 1]))
    layout = StageLayout.at(spec.output.uri)
    planned = plan.read_units(plan.ensure_plan(spec, layout))
    generated = [u for u in planned if u.split == plan.GENERATED]
    # 5 of 7 prompts, 2 per unit: 3 slices x 2 scales x 2 seeds; then 3 images in 2 reference units.
    assert [(u.guidance_scale, u.seed, u.start, u.end) for u in generated[:4]] == [
        (1.5, 0, 0, 2),
        (1.5, 0, 2, 4),
        (1.5, 0, 4, 5),
        (1.5, 1, 0, 2),
    ]
    assert len(generated) == 12
    references = planned[12:]
    assert [u.files for u in references] == [["0.png", "1.png"], ["2.png"]]
    assert [u.unit for u in planned] == list(range(14))
    prompts = plan.read_planned_prompts(layout.plan)
    assert prompts["available"] == 7 and len(prompts["prompts"]) == 5
    ids = [p["id"] for p in prompts["prompts"]]
    assert ids == sorted(ids) and all(p["license_code"] == "cc-by-nd" for p in prompts["prompts"])


def test_planning_again_changes_nothing_and_another_setting_is_refused_naming_it(tmp_path: Path) -> None:
    write_inputs(tmp_path)
    spec = EvalRunSpec.model_validate(spec_body(tmp_path))
    layout = StageLayout.at(spec.output.uri)
    plan.ensure_plan(spec, layout)
    first = layout.plan.read_text(plan.PLAN_FILE)
    (tmp_path / "prompts.jsonl").write_text((tmp_path / "prompts.jsonl").read_text() + '{"caption": "new"}\n')
    plan.ensure_plan(spec, layout)
    assert layout.plan.read_text(plan.PLAN_FILE) == first
    other = EvalRunSpec.model_validate(spec_body(tmp_path, inferenceSteps=10))
    with pytest.raises(OutputReused, match=r"spec\.inferenceSteps=50"):
        plan.ensure_plan(other, layout)


def test_prompts_come_from_jsonl_or_a_tsv_header_and_a_bad_line_names_file_and_line(tmp_path: Path) -> None:
    assert [r["caption"] for r in plan.parse_prompts("id\tcaption\n1\ta  cat\n2\t\n", "tsv", "p.tsv")] == [
        "a cat"
    ]
    with pytest.raises(SpecError, match=r"^p.tsv:1: the TSV header has no `caption` column"):
        plan.parse_prompts("id\ttext\n1\ta cat\n", "tsv", "p.tsv")
    with pytest.raises(SpecError, match=r"^p.jsonl:2: not JSON"):
        plan.parse_prompts('{"caption": "a"}\n{"caption": \n', "jsonl", "p.jsonl")
    with pytest.raises(SpecError, match=r"^p.jsonl:1: not a JSON object with a string `caption`"):
        plan.parse_prompts('{"text": "a"}\n', "jsonl", "p.jsonl")


def test_a_reference_is_resolved_to_its_output_and_unresolvable_one_names_the_field(tmp_path: Path) -> None:
    from commoncanvas.shardplan import InputMissing

    body = spec_body(tmp_path, model={"trainRunRef": "train"}, prompts={"captionJobRef": "captions"})
    spec = EvalRunSpec.model_validate(body)
    outputs = {("TrainRun", "train"): "s3://b/train/", ("CaptionJob", "captions"): "s3://b/cap"}
    done = plan.resolved(spec, lambda kind, name: outputs[(kind, name)])
    assert done.model.pipeline_uri == "s3://b/train/pipeline" and done.model.train_run_ref is None
    assert done.prompts.uri == "s3://b/cap/evaluation/captions.jsonl" and done.prompts.format == "jsonl"
    with pytest.raises(InputMissing, match=r"^spec.model.trainRunRef 'train' cannot be resolved here"):
        plan.resolved(spec, None)


def test_fid_and_kid_are_clean_fids_numbers_zero_for_identical_sets_and_grow_with_a_shift() -> None:
    from cleanfid.fid import fid_from_feats

    rng = np.random.default_rng(0)
    reference = rng.normal(size=(400, 8))
    assert fid_from_features(reference, reference) == pytest.approx(0, abs=1e-6)
    same_distribution = rng.normal(size=(400, 8))
    kid_same = kid_from_features(same_distribution, reference)
    shifted = reference + 1.0
    # Same covariance, mean moved by 1 in each of 8 dimensions: FID is |shift|^2 = 8.
    assert fid_from_features(shifted, reference) == pytest.approx(8.0, rel=1e-6)
    assert fid_from_features(shifted, reference) == pytest.approx(fid_from_feats(shifted, reference))
    assert (
        abs(kid_same)
        < 0.1
        < kid_from_features(reference + 0.3, reference)
        < kid_from_features(shifted, reference)
    )
    assert kid_from_features(shifted, reference, seed=1) == kid_from_features(shifted, reference, seed=1)


def test_clip_score_is_100_times_the_cosine_floored_at_zero() -> None:
    images = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    texts = np.array([[2.0, 0.0], [-1.0, 0.0], [1.0, 1.0]])
    assert clip_scores(images, texts) == pytest.approx([100.0, 0.0, 100 / np.sqrt(2)])


def test_rows_hold_only_the_metrics_asked_for_one_per_guidance_scale(tmp_path: Path) -> None:
    spec = EvalRunSpec.model_validate(spec_body(tmp_path, metrics=["fid", "clipScore"]))
    rng = np.random.default_rng(1)
    features = {
        "inception": rng.normal(size=(20, 4)),
        "clip": rng.normal(size=(20, 3)),
        "clipScore": np.full(20, 30.0),
    }
    rows = score_rows(spec, {1.5: features, 7.5: features}, features)
    assert [sorted(row) for row in rows] == [["clipScore", "fid", "guidanceScale"]] * 2
    assert [row["guidanceScale"] for row in rows] == [1.5, 7.5] and rows[0]["clipScore"] == 30.0


def test_eval_gauges_carry_the_evalrun_and_guidance_scale() -> None:
    from prometheus_client import REGISTRY

    from commoncanvas import metrics

    metrics.record_evaluation("unit-test-eval", [{"guidanceScale": 7.5, "fid": 12.5, "clipScore": None}])
    labels = {"evalrun": "unit-test-eval", "guidance_scale": "7.5"}
    assert REGISTRY.get_sample_value("commoncanvas_eval_fid", labels) == 12.5
    assert REGISTRY.get_sample_value("commoncanvas_eval_clip_score", labels) is None


@pytest.mark.parametrize("with_matplotlib", [True, False])
def test_the_plot_is_a_png_with_or_without_matplotlib(
    with_matplotlib: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io
    import sys

    from PIL import Image

    from commoncanvas.eval.score import plot

    if not with_matplotlib:  # as in the worker images, which leave it out
        monkeypatch.setitem(sys.modules, "matplotlib", None)
    rows = [
        {"guidanceScale": 1.5, "fid": 30.0, "clipScore": 25.0},
        {"guidanceScale": 7.5, "fid": 20.0, "clipScore": 31.0},
    ]
    image = Image.open(io.BytesIO(plot(rows, "run")))
    image.load()
    assert image.format == "PNG" and image.size == (500, 400)
    # Something was drawn: the curve's colour is there.
    assert (31, 119, 180) in {pixel[:3] for pixel in image.convert("RGB").getdata()}


def test_the_operator_runs_an_evalrun_as_gpu_sharded_work_on_its_trainruns_pipeline() -> None:
    from commoncanvas_operator import builders
    from commoncanvas_operator.settings import Settings

    settings = Settings()
    body = {
        "apiVersion": "commoncanvas.dev/v1alpha1",
        "kind": "EvalRun",
        "metadata": {"name": "coco", "namespace": "ml"},
        "spec": {
            "model": {"trainRunRef": "sd2"},
            "prompts": {"uri": "s3://b/coco.jsonl"},
            "references": {"uri": "s3://b/coco-images"},
            "extractors": {"inception": "s3://b/inception.pt"},
            "output": {"uri": "s3://b/eval"},
            "parallelism": 8,
            "gpusPerPod": 8,
        },
    }
    assert builders.upstream_ref("EvalRun", body["spec"]) == ("TrainRun", "sd2")
    job_file = builders.resolve_resource(body, "s3://b/runs/sd2/")
    assert job_file["spec"]["model"] == {"pipelineUri": "s3://b/runs/sd2/pipeline"}
    work = builders.stage_work(body, settings)
    assert (work.command, work.gpus, work.parallelism, work.pool) == ("eval", 8, 8, "a100")
    images = {
        step: builders.build_sharded_job(work, step, settings, units=600)["spec"]["template"]["spec"][
            "containers"
        ][0]
        for step in builders.STEPS
    }
    assert images["units"]["args"] == ["eval", "work", builders.JOB_FILE]
    assert images["units"]["resources"]["limits"][builders.GPU_RESOURCE] == "8"
    # clean-fid imports torch: finalize needs the GPU image (on the control pool, with no GPU).
    assert images["finalize"]["image"] == settings.gpu_image
    assert builders.GPU_RESOURCE not in images["finalize"].get("resources", {}).get("limits", {})
    assert images["plan"]["image"] == settings.cpu_image


def test_the_operator_copies_the_summary_numbers_into_the_evalruns_status() -> None:
    from commoncanvas_operator import reducers

    summary = {
        "results": [{"guidanceScale": 7.5, "fid": 20.5, "kid": 0.01, "clipFid": 5.0, "clipScore": 30.1}],
        "prompts": 30000,
        "references": 30000,
        "outputs": {"results": "s3://b/eval/results.json", "plot": "s3://b/eval/fid-vs-clip-score.png"},
    }
    counts = reducers._counts_from_summary("EvalRun", summary, "s3://b/eval")
    assert counts == summary

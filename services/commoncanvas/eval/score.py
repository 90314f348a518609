"""EvalRun finalize: once every unit has its marker, the statistics (clean-fid's own Frechet distance
and KID), `results.json`, and a plot of FID against CLIP score across guidance scales.

The reference features are the reference units' output, computed once under the EvalRun's output and
shared by every guidance scale. Reads features, never images: no model, no GPU.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from commoncanvas import units
from commoncanvas.eval.plan import (
    FEATURES_FILE,
    GENERATED,
    REFERENCES,
    EvalUnit,
    ensure_plan,
    read_planned_prompts,
    read_units,
    resolved,
)
from commoncanvas.specs.eval import EvalRunSpec
from commoncanvas.storage import Storage, open_storage
from commoncanvas.units import StageLayout

log = logging.getLogger(__name__)
RESULTS_FILE = "results.json"
# The stage summary every sharded stage leaves (the operator reads it into the EvalRun's status).
SUMMARY_FILE = "summary.json"
PLOT_FILE = "fid-vs-clip-score.png"
# clean-fid's KID defaults: 100 subsets of at most 1000 samples; seeded so a rerun gives the same KID.
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000


def fid_from_features(generated: np.ndarray, reference: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (clean-fid's `frechet_distance`)."""
    from cleanfid.fid import frechet_distance

    mu1, sigma1 = np.mean(generated, axis=0), np.cov(generated, rowvar=False)
    mu2, sigma2 = np.mean(reference, axis=0), np.cov(reference, rowvar=False)
    return float(frechet_distance(mu1, sigma1, mu2, sigma2))


def kid_from_features(generated: np.ndarray, reference: np.ndarray, seed: int = 0) -> float:
    """Kernel Inception Distance (clean-fid's `kernel_distance`, its subsets drawn with `seed`)."""
    from cleanfid.fid import kernel_distance

    state = np.random.get_state()
    np.random.seed(seed)  # kernel_distance draws its subsets from numpy's global generator
    try:
        return float(kernel_distance(generated, reference, KID_SUBSETS, KID_SUBSET_SIZE))
    finally:
        np.random.set_state(state)


def score_rows(
    spec: EvalRunSpec,
    generated: Mapping[float, Mapping[str, np.ndarray]],
    reference: Mapping[str, np.ndarray],
) -> list[dict[str, Any]]:
    """One row per guidance scale (spec order) with the metrics the spec asks for."""
    wanted = set(spec.metrics)
    rows: list[dict[str, Any]] = []
    for scale in spec.guidance_scales:
        features = generated[scale]
        row: dict[str, Any] = {"guidanceScale": scale}
        if "fid" in wanted:
            row["fid"] = fid_from_features(features["inception"], reference["inception"])
        if "kid" in wanted:
            row["kid"] = kid_from_features(features["inception"], reference["inception"], spec.prompts.seed)
        if "clipFid" in wanted:
            row["clipFid"] = fid_from_features(features["clip"], reference["clip"])
        if "clipScore" in wanted:
            row["clipScore"] = float(np.mean(features["clipScore"]))
        rows.append(row)
    return rows


def read_features(
    output: Storage, units_of: list[EvalUnit], markers: dict[int, dict[str, Any]]
) -> dict[str, np.ndarray]:
    """The winning attempts' features of some units, concatenated in unit order."""
    parts: dict[str, list[np.ndarray]] = {}
    for unit in units_of:
        if not markers[unit.unit].get("written"):
            continue
        key = f"{units.winning_prefix(unit.split, unit.unit, markers[unit.unit])}/{FEATURES_FILE}"
        with np.load(io.BytesIO(output.read_bytes(key)), allow_pickle=False) as data:
            for name in data.files:
                parts.setdefault(name, []).append(data[name])
    return {name: np.concatenate(values) for name, values in parts.items()}


def _axes(rows: list[dict[str, Any]]) -> tuple[str, str]:
    """(x, y) metric names: FID against CLIP score (the paper's trade-off curve); where a run lacks one
    of the two, the other metric against the guidance scale."""
    y_name = next((name for name in ("fid", "clipFid", "kid", "clipScore") if name in rows[0]), "fid")
    x_name = "clipScore" if "clipScore" in rows[0] and y_name != "clipScore" else "guidanceScale"
    return x_name, y_name


def plot(rows: list[dict[str, Any]], title: str) -> bytes:
    """PNG, one point per guidance scale (`_axes`): matplotlib where installed (the dev environment),
    else drawn with PIL (the worker images leave matplotlib out)."""
    try:
        import matplotlib
    except ImportError:
        return plot_with_pil(rows, title)
    matplotlib.use("Agg")
    from matplotlib import pyplot

    x_name, y_name = _axes(rows)
    figure, axes = pyplot.subplots(figsize=(5, 4), dpi=100)
    xs, ys = [row[x_name] for row in rows], [row[y_name] for row in rows]
    axes.plot(xs, ys, marker="o")
    for row, x, y in zip(rows, xs, ys, strict=True):
        axes.annotate(f"w={row['guidanceScale']:g}", (x, y), textcoords="offset points", xytext=(4, 4))
    axes.set_xlabel(x_name)
    axes.set_ylabel(y_name)
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, format="png")
    pyplot.close(figure)
    return png.getvalue()


def plot_with_pil(rows: list[dict[str, Any]], title: str, size: tuple[int, int] = (500, 400)) -> bytes:
    """The same plot with PIL's drawing primitives: frame, the curve, each point labelled w=scale, and
    the axes' names and ranges."""
    from PIL import Image, ImageDraw

    x_name, y_name = _axes(rows)
    xs, ys = [float(row[x_name]) for row in rows], [float(row[y_name]) for row in rows]
    width, height = size
    left, top, right, bottom = 70, 30, width - 20, height - 50
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)

    def scaled(values: list[float], low: int, high: int) -> list[float]:
        lo, hi = min(values), max(values)
        span = (hi - lo) or 1.0
        return [low + (value - lo) / span * (high - low) for value in values]

    # Inset from the frame, so the points and their labels stay inside it.
    points = list(zip(scaled(xs, left + 20, right - 50), scaled(ys, bottom - 20, top + 20), strict=True))
    draw.rectangle((left, top, right, bottom), outline="black")
    if len(points) > 1:
        draw.line(points, fill=(31, 119, 180), width=2)
    for row, (x, y) in zip(rows, points, strict=True):
        draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=(31, 119, 180))
        draw.text((x + 6, y - 14), f"w={row['guidanceScale']:g}", fill="black")
    draw.text((left, 8), title, fill="black")
    draw.text((left, bottom + 8), f"{min(xs):.4g}", fill="black")
    draw.text((right - 40, bottom + 8), f"{max(xs):.4g}", fill="black")
    draw.text(((left + right) // 2 - 30, bottom + 26), x_name, fill="black")
    draw.text((4, bottom - 12), f"{min(ys):.4g}", fill="black")
    draw.text((4, top), f"{max(ys):.4g}", fill="black")
    draw.text((4, (top + bottom) // 2), y_name, fill="black")
    png = io.BytesIO()
    image.save(png, format="PNG")
    return png.getvalue()


def finalize(
    spec: EvalRunSpec, resolve: Callable[[str, str], str] | None = None, name: str = ""
) -> dict[str, Any]:
    """Once every unit has its marker: the metrics per guidance scale, results.json and the plot, the
    model card's evaluation (when the pipeline folder takes it). Reruns compute the same numbers."""
    spec = resolved(spec, resolve)
    layout = StageLayout.at(spec.output.uri)
    plan = ensure_plan(spec, layout)
    planned = read_units(plan)
    markers = units.read_markers(layout.output)
    missing = sorted({u.unit for u in planned} - set(markers))
    if missing:
        raise RuntimeError(f"{len(missing)} units have no marker yet (first: {missing[:5]}); rerun to finish")
    for split in (GENERATED, REFERENCES):
        units.remove_losers(
            layout.output, split, {u.unit: markers[u.unit] for u in planned if u.split == split}
        )
    reference = read_features(layout.output, [u for u in planned if u.split == REFERENCES], markers)
    if len(reference.get("inception", ())) < 2:
        raise RuntimeError(f"spec.references.uri: {spec.references.uri} gave fewer than 2 usable images")
    generated = {
        scale: read_features(
            layout.output, [u for u in planned if u.split == GENERATED and u.guidance_scale == scale], markers
        )
        for scale in spec.guidance_scales
    }
    rows = score_rows(spec, generated, reference)
    prompts = read_planned_prompts(plan)
    from commoncanvas.workqueue import progress_totals, read_progress

    progress = progress_totals(read_progress(layout.output))
    failed: dict[str, int] = {}
    for marker in markers.values():
        for outcome, count in marker["outcomes"].items():
            if outcome != "ok":
                failed[outcome] = failed.get(outcome, 0) + int(count)
    title = name or layout.output.uri.rstrip("/").rsplit("/", 1)[-1]
    layout.output.write_bytes(PLOT_FILE, plot(rows, title))
    results: dict[str, Any] = {
        "name": title,
        "model": spec.model.pipeline_uri,
        "prompts": {
            "source": spec.prompts.uri,
            "count": len(prompts["prompts"]),
            "available": prompts["available"],
        },
        "references": {"source": spec.references.uri, "count": len(reference["inception"])},
        "resolution": spec.resolution,
        "inferenceSteps": spec.inference_steps,
        "seeds": spec.seeds,
        "extractors": spec.extractors.model_dump(by_alias=True),
        "rows": rows,
        "excluded": failed,
        "units": len(planned),
        "workers": progress["workers"],
        "modelLoads": progress["modelLoads"],
        "outputs": {"results": layout.output.url(RESULTS_FILE), "plot": layout.output.url(PLOT_FILE)},
    }
    layout.output.write_text(RESULTS_FILE, json.dumps(results, indent=1))
    summary = {
        "results": rows,
        "prompts": results["prompts"]["count"],
        "references": results["references"]["count"],
        "outputs": results["outputs"],
        **{key: results[key] for key in ("units", "workers", "modelLoads", "excluded")},
    }
    layout.output.write_text(SUMMARY_FILE, json.dumps(summary, indent=1))
    record_on_model_card(spec, results)
    return results


def record_on_model_card(spec: EvalRunSpec, results: Mapping[str, Any]) -> None:
    """Add the results to the evaluated pipeline's model card (commoncanvas.train.modelcard), where that
    module exists and the pipeline folder can be written; the results stand without it."""
    from commoncanvas.storage import StorageError

    try:
        from commoncanvas.train.modelcard import record_evaluation  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        log.info("no commoncanvas.train.modelcard: the model card is not updated")
        return
    assert spec.model.pipeline_uri
    try:
        record_evaluation(open_storage(spec.model.pipeline_uri), results)
    except (StorageError, OSError) as error:  # a read-only model (a shared release): the results stand
        log.warning("model card of %s not updated: %s", spec.model.pipeline_uri, error)

"""The model card of an exported pipeline: `pipeline/README.md`, with the YAML front matter the Hugging
Face Hub renders (license, tags, datasets, `model-index` metrics) and a body made from the run's data card.

The model's license is derived from what it was trained on (the data card's license counts):
commercial use only if every trained photograph allows it, ShareAlike when any is ShareAlike. Where no
single license carries every sample's terms (two ShareAlike licenses, or BY-SA beside a NonCommercial
license: each demands its own license for derivatives) the license is `other`, pointing at the data card.

The card is rebuilt from files in the pipeline folder alone: `datacard.json` (copied there at export) and
`evaluation/{name}.json` (one per evaluation, `record_evaluation`), so an EvalRun can add its results to
a pipeline long after the TrainRun finished, and the folder uploads to the Hub as it is.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from commoncanvas.licenses import BY_CODE
from commoncanvas.redact import strip_userinfo
from commoncanvas.storage import Storage
from commoncanvas.train.datacard import CARD_JSON

MODEL_CARD = "README.md"
EVALUATION_DIR = "evaluation"
TAGS = ("text-to-image", "stable-diffusion", "creative-commons")
# (commercial use allowed, ShareAlike) -> the Hub's license identifier.
HUB_LICENSES = {
    (True, False): "cc-by-4.0",
    (True, True): "cc-by-sa-4.0",
    (False, False): "cc-by-nc-4.0",
    (False, True): "cc-by-nc-sa-4.0",
}
MIXED_LICENSE_NAME = "mixed-creative-commons"
# The captioners whose training data their own model card declares. Every BLIP-2 checkpoint shares the
# Q-Former's pretraining set (BLIP-2 paper, arXiv:2301.12597, section 4; the Hub cards point there).
_BLIP2_DATA = (
    "129M images: COCO, Visual Genome, CC3M, CC12M, SBU and 115M images of LAION-400M (captions "
    "filtered and synthesized with BLIP's CapFilt); the frozen image encoder (EVA-CLIP ViT-g) and "
    "language model bring their own pretraining data"
)
KNOWN_CAPTIONERS: dict[str, str] = {
    "Salesforce/blip2-opt-2.7b": _BLIP2_DATA + " (OPT-2.7b: the OPT corpus)",
    "Salesforce/blip2-opt-6.7b": _BLIP2_DATA + " (OPT-6.7b: the OPT corpus)",
    "Salesforce/blip2-flan-t5-xl": _BLIP2_DATA + " (Flan-T5-XL: C4 and the Flan collection)",
    "Salesforce/blip2-flan-t5-xxl": _BLIP2_DATA + " (Flan-T5-XXL: C4 and the Flan collection)",
}
NOT_DECLARED = "not declared"
# An evaluation's row: its field -> (the Hub's metric type, the name shown).
METRICS = {
    "fid": ("fid", "FID"),
    "kid": ("kid", "KID"),
    "clipFid": ("clip-fid", "CLIP-FID"),
    "clipScore": ("clip-score", "CLIP score"),
}
_EVALUATION_NAME = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,251}[a-z0-9])?$")


class InvalidEvaluation(ValueError):
    """Evaluation results that cannot go into a card; the message names the field."""


@dataclass(frozen=True)
class ModelLicense:
    """The model's license as the Hub names it, and what using the model demands, in sentences."""

    hub_id: str
    name: str | None  # only for `other`
    link: str | None  # only for `other`
    commercial: bool
    restrictions: tuple[str, ...]


def model_license(by_license: Mapping[str, int]) -> ModelLicense:
    """The model's license from the trained photographs per license code (data card `byLicense`)."""
    codes = sorted(code for code, count in by_license.items() if count)
    unknown = [code for code in codes if code not in BY_CODE or not BY_CODE[code].derivatives]
    if not codes or unknown:
        raise ValueError(
            f"no license can be derived from trained licenses {codes}: "
            + (f"{unknown} are unknown or NoDerivs" if unknown else "nothing was trained on")
        )
    licenses = [BY_CODE[code] for code in codes]
    commercial = all(lic.commercial for lic in licenses)
    share_alike = [lic.code for lic in licenses if lic.share_alike]
    noncommercial = [lic.code for lic in licenses if not lic.commercial]
    restrictions: list[str] = []
    if not commercial:
        restrictions.append(
            f"Non-commercial use only: photographs under {', '.join(noncommercial)} were trained on."
        )
    if share_alike:
        restrictions.append(
            f"ShareAlike: photographs under {', '.join(share_alike)} were trained on; share adaptations "
            "under the same terms."
        )
    if any(lic.attribution for lic in licenses):
        restrictions.append("Attribution: credit the photographs' authors (the attribution manifest).")
    # One SA license's terms can hold every sample's only if it is the sole SA license and no sample
    # demands more than it (BY-SA allows commercial use, so beside an NC license it cannot).
    conflict = len(share_alike) > 1 or (share_alike == ["cc-by-sa"] and not commercial)
    if conflict:
        restrictions.append(
            "No single license carries every photograph's terms ("
            + ", ".join(codes)
            + f"): the model is under each of them; see {CARD_JSON}."
        )
        return ModelLicense("other", MIXED_LICENSE_NAME, CARD_JSON, commercial, tuple(restrictions))
    hub_id = HUB_LICENSES[(commercial, bool(share_alike))]
    return ModelLicense(hub_id, None, None, commercial, tuple(restrictions))


def captioner_data(model: str) -> str:
    return KNOWN_CAPTIONERS.get(model, NOT_DECLARED)


def _number(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidEvaluation(f"{where} must be a finite number or null, not {value!r}")
    return float(value)


def check_evaluation(results: Mapping[str, Any]) -> dict[str, Any]:
    """The results as stored, or InvalidEvaluation naming the field (the name becomes a file name)."""
    name = results.get("name")
    if not isinstance(name, str) or not _EVALUATION_NAME.match(name):
        raise InvalidEvaluation(
            f"results.name {name!r} must be a lower-case name (letters, digits, '.', '_', '-'), as a "
            "Kubernetes resource name is"
        )
    rows = results.get("rows")
    if not isinstance(rows, list) or not rows:
        raise InvalidEvaluation(f"results.rows of {name!r} must be a non-empty list")
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise InvalidEvaluation(f"results.rows[{i}] of {name!r} must be an object")
        _number(row.get("guidanceScale"), f"results.rows[{i}].guidanceScale")
        for field in METRICS:
            _number(row.get(field), f"results.rows[{i}].{field}")
    for part in ("prompts", "references"):
        if not isinstance(results.get(part, {}), Mapping):
            raise InvalidEvaluation(f"results.{part} of {name!r} must be an object with source and count")
    checked: dict[str, Any] = json.loads(json.dumps(dict(results), allow_nan=False))
    return checked


def eval_results(evaluations: Iterable[Mapping[str, Any]]) -> list[EvalResult]:
    """Every metric of every evaluation as the Hub's model-index entries."""
    found: list[EvalResult] = []
    for evaluation in evaluations:
        # The Hub groups results by dataset type: one per evaluation, so two never merge.
        sources = {
            part: str(evaluation[part]["source"])
            for part in ("prompts", "references")
            if evaluation.get(part, {}).get("source")
        }
        for row in evaluation["rows"]:
            guidance = row.get("guidanceScale")
            for field, (metric_type, shown) in METRICS.items():
                if row.get(field) is None:
                    continue
                found.append(
                    EvalResult(
                        task_type="text-to-image",
                        dataset_type=str(evaluation["name"]),
                        dataset_name=str(evaluation["name"]),
                        dataset_args=sources or None,
                        metric_type=metric_type,
                        metric_value=row[field],
                        metric_name=f"{shown} (guidance {guidance:g})" if guidance is not None else shown,
                        metric_config=f"guidanceScale={guidance:g}" if guidance is not None else None,
                    )
                )
    return found


def card_data(card: Mapping[str, Any], evaluations: Sequence[Mapping[str, Any]]) -> ModelCardData:
    lic = model_license(card["trained"]["byLicense"])
    return ModelCardData(
        library_name="diffusers",
        pipeline_tag="text-to-image",
        license=lic.hub_id,
        license_name=lic.name,
        license_link=lic.link,
        tags=list(TAGS),
        datasets=sorted({strip_userinfo(s["uri"]) for s in card["dataset"]["streams"]}),
        model_name=str(card["run"]),
        eval_results=eval_results(evaluations) or None,
    )


def _cell(value: Any) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def render_body(card: Mapping[str, Any], evaluations: Sequence[Mapping[str, Any]]) -> str:
    trained = card["trained"]
    lic = model_license(trained["byLicense"])
    lines = [
        f"# {card['run']}",
        "",
        "A Stable Diffusion 2-class text-to-image model (a diffusers `StableDiffusionPipeline`) trained by "
        "CommonCanvas on Creative-Commons-licensed photographs of YFCC100M with synthetic captions: "
        f"{card['step']} steps, {card['imagesSeen']} images, {trained['distinctSamples']} distinct "
        "photographs.",
        "",
        "## License and usage restrictions",
        "",
        f"License: `{lic.hub_id}`" + (f" ({lic.name}, see `{lic.link}`)" if lic.name else "") + ", derived "
        "from the licenses of the photographs trained on (not legal advice):",
        "",
        *[f"- {line}" for line in lic.restrictions],
        "- No NoDerivs or unknown license was trained on: every sample was checked against the license "
        "table.",
        "",
        "## Training data",
        "",
        f"From the run's data card (`{CARD_JSON}` in this folder):",
        "",
        "| split | license | photographs |",
        "|---|---|---:|",
    ]
    for split, counts in trained["bySplitAndLicense"].items():
        lines += [f"| {split} | {code} | {count} |" for code, count in counts.items()]
    lines += ["", "| license | name | commercial | ShareAlike | url |", "|---|---|---|---|---|"]
    for code, info in card["licenses"].items():
        lines.append(
            f"| {code} | {info['name']} | {'yes' if info['commercial'] else 'no'} | "
            f"{'yes' if info['shareAlike'] else 'no'} | {info['url']} |"
        )
    lines += [
        "",
        "## Attribution",
        "",
        "Author, license and source page of every photograph trained on: "
        f"`{card['attributionManifest']}` (JSON lines, one per photograph).",
        "",
        "## Captions",
        "",
        "| captioner | revision | its training data (as its card declares) |",
        "|---|---|---|",
    ]
    captioners = card.get("captioner") or [{"model": "unrecorded", "revision": ""}]
    for captioner in captioners:
        lines.append(
            f"| {captioner['model']} | {captioner['revision'] or 'not pinned'} | "
            f"{captioner_data(captioner['model'])} |"
        )
    lines += ["", "## Evaluation results", ""]
    if not evaluations:
        lines += ["No evaluation recorded yet.", ""]
    for evaluation in evaluations:
        prompts, references = evaluation.get("prompts", {}), evaluation.get("references", {})
        lines += [
            f"### {evaluation['name']}",
            "",
            f"Prompts: {_cell(prompts.get('count'))} from `{prompts.get('source', '-')}`; references: "
            f"{_cell(references.get('count'))} from `{references.get('source', '-')}`; resolution "
            f"{_cell(evaluation.get('resolution'))}.",
            "",
            "| guidance scale | " + " | ".join(shown for _, shown in METRICS.values()) + " |",
            "|---:|" + "---:|" * len(METRICS),
        ]
        for row in evaluation["rows"]:
            cells = [_cell(row.get("guidanceScale")), *(_cell(row.get(field)) for field in METRICS)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def render_model_card(card: Mapping[str, Any], evaluations: Sequence[Mapping[str, Any]]) -> str:
    """README.md: the front matter (huggingface_hub writes the YAML) and the body."""
    data = card_data(card, evaluations)
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{render_body(card, evaluations)}"))


def read_evaluations(pipeline: Storage) -> list[dict[str, Any]]:
    """The evaluations recorded in a pipeline folder, by name."""
    keys = [key for key in pipeline.list(EVALUATION_DIR) if key.endswith(".json")]
    return [json.loads(pipeline.read_text(key)) for key in sorted(keys)]


def render_into(pipeline: Storage) -> None:
    if not pipeline.exists(CARD_JSON):
        raise FileNotFoundError(
            f"{pipeline.url(CARD_JSON)} does not exist: the pipeline was not exported by a finished TrainRun "
            "(its export writes the data card there)"
        )
    card = json.loads(pipeline.read_text(CARD_JSON))
    pipeline.write_text(MODEL_CARD, render_model_card(card, read_evaluations(pipeline)))


def write_model_card(pipeline: Storage, card: Mapping[str, Any]) -> None:
    """At export: the data card into the pipeline folder (the model card's source), then README.md."""
    pipeline.write_text(CARD_JSON, json.dumps(card, indent=1, ensure_ascii=False))
    render_into(pipeline)


def record_evaluation(storage: Storage, results: Mapping[str, Any]) -> None:
    """Store `evaluation/{results['name']}.json` in the pipeline folder `storage` (an exported
    `pipeline/`) and re-render its README.md; the same name again replaces the earlier results."""
    checked = check_evaluation(results)
    storage.write_text(f"{EVALUATION_DIR}/{checked['name']}.json", json.dumps(checked, indent=1))
    render_into(storage)

"""The data card of a training run: what the model saw, by split and license, who captioned it, and an
attribution manifest (one JSON line per distinct photo: id, author, license, page) built from the samples
the run actually trained on, as recorded in its checkpoints.

Every license is checked against the license table: a NoDerivs or unknown license, or a non-commercial
license in the commercial split, fails the card loudly instead of being written into it.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from commoncanvas.licenses import BY_CODE, TRAINING_SPLITS, Split
from commoncanvas.scrape.dedup import CREDITS_COLUMN
from commoncanvas.storage import Storage

# What a sample carries through training so the run can name exactly what it saw.
ATTRIBUTION_FIELDS = ("photo_id", "split", "license_code", "license_url", "author", "page_url")
CARD_JSON = "datacard.json"
CARD_MARKDOWN = "datacard.md"
MANIFEST = "attribution.jsonl"


class LicenseViolation(RuntimeError):
    """A sample whose license does not allow this use; the message names the photos and licenses."""


def license_problem(code: str, split: str) -> str:
    """Why a sample with license `code` in `split` must not train a model; '' when it may."""
    lic = BY_CODE.get(code)
    if lic is None:
        return f"unknown license {code!r}"
    if not lic.derivatives:
        return f"license {code} forbids derivatives"
    if split == Split.EVALUATION:
        return "the evaluation split is for evaluation only, never for training"
    if split not in TRAINING_SPLITS:
        return f"unknown split {split!r}"
    if split == Split.COMMERCIAL and not lic.commercial:
        return f"license {code} forbids commercial use but the sample is in the commercial split"
    return ""


@dataclass(frozen=True)
class DatasetStream:
    """One stream of the training set: a captioned (or latents) split and how many samples it holds."""

    uri: str
    split: str
    samples: int


def build_datacard(
    records: Iterable[Mapping[str, Any]],
    streams: list[DatasetStream],
    manifest_path: Path,
    *,
    run: str,
    step: int,
    images_seen: int,
    manifest_url: str,
) -> dict[str, Any]:
    """Check every record's license, write the manifest (first sighting of each photo), count."""
    seen: set[tuple[str, int]] = set()
    by_split_license: dict[str, Counter[str]] = {}
    captioners: set[tuple[str, str]] = set()
    problems: dict[str, list[int]] = {}
    samples_seen = 0
    with manifest_path.open("w", encoding="utf-8") as manifest:
        for record in records:
            samples_seen += 1
            split, code, photo = str(record["split"]), str(record["license_code"]), int(record["photo_id"])
            problem = license_problem(code, split)
            if problem:
                problems.setdefault(problem, []).append(photo)
                continue
            if record.get("caption_model"):
                captioners.add((str(record["caption_model"]), str(record.get("caption_model_revision", ""))))
            if (split, photo) in seen:
                continue  # a later epoch (or an up-sampled split) saw it again
            seen.add((split, photo))
            by_split_license.setdefault(split, Counter())[code] += 1
            entry = {name: record[name] for name in ATTRIBUTION_FIELDS}
            if record.get(CREDITS_COLUMN):  # identical copies by other authors, dropped for this one
                entry[CREDITS_COLUMN] = record[CREDITS_COLUMN]
            manifest.write(json.dumps(entry, ensure_ascii=False) + "\n")
    if problems:
        listing = "\n".join(
            f"  {problem}: {len(photos)} samples, e.g. photo ids {sorted(set(photos))[:10]}"
            for problem, photos in sorted(problems.items())
        )
        raise LicenseViolation(
            f"run {run!r} trained on samples whose license does not allow it (no data card written):\n"
            f"{listing}\nRebuild the catalog with the default license policy and train again."
        )
    by_license: Counter[str] = Counter()
    for counts in by_split_license.values():
        by_license.update(counts)
    return {
        "run": run,
        "step": step,
        "imagesSeen": images_seen,
        "dataset": {
            "streams": [asdict(stream) for stream in streams],
            "samples": sum(stream.samples for stream in streams),
        },
        "trained": {
            "samplesSeen": samples_seen,
            "distinctSamples": len(seen),
            "bySplit": {split: sum(c.values()) for split, c in sorted(by_split_license.items())},
            "byLicense": dict(sorted(by_license.items())),
            "bySplitAndLicense": {
                split: dict(sorted(c.items())) for split, c in sorted(by_split_license.items())
            },
        },
        "licenses": {
            code: {
                "name": BY_CODE[code].name,
                "url": BY_CODE[code].url,
                "commercial": BY_CODE[code].commercial,
                "derivatives": BY_CODE[code].derivatives,
                "shareAlike": BY_CODE[code].share_alike,
            }
            for code in sorted(by_license)
        },
        "captioner": [{"model": model, "revision": revision} for model, revision in sorted(captioners)],
        "attributionManifest": manifest_url,
        "checks": {
            "everyLicenseKnownAndAllowsDerivatives": True,
            "noNonCommercialLicenseInCommercialSplit": True,
        },
    }


def render_markdown(card: Mapping[str, Any]) -> str:
    trained = card["trained"]
    lines = [
        f"# Data card: {card['run']}",
        "",
        f"Trained for {card['step']} steps on {card['imagesSeen']} images: "
        f"{trained['distinctSamples']} distinct photographs ({trained['samplesSeen']} samples seen).",
        "",
        "## Composition (distinct photographs trained on)",
        "",
        "| split | license | photographs |",
        "|---|---|---:|",
    ]
    for split, counts in trained["bySplitAndLicense"].items():
        lines += [f"| {split} | {code} | {count} |" for code, count in counts.items()]
    lines += ["", "## Licenses", "", "| code | name | commercial | url |", "|---|---|---|---|"]
    for code, lic in card["licenses"].items():
        lines.append(f"| {code} | {lic['name']} | {'yes' if lic['commercial'] else 'no'} | {lic['url']} |")
    lines += [
        "",
        "Every license above allows derivatives: NoDerivs and unknown licenses were checked to be absent, "
        "and the commercial split holds only licenses that allow commercial use.",
        "",
        "## Dataset",
        "",
        "| stream | split | samples |",
        "|---|---|---:|",
    ]
    lines += [f"| {s['uri']} | {s['split']} | {s['samples']} |" for s in card["dataset"]["streams"]]
    captioners = ", ".join(
        f"{c['model']}" + (f" @ {c['revision']}" if c["revision"] else "") for c in card["captioner"]
    )
    lines += [
        "",
        "## Captions",
        "",
        f"Synthetic captions by {captioners or 'an unrecorded captioner'}.",
        "",
        "## Attribution",
        "",
        f"Author, license and source page of every photograph: `{card['attributionManifest']}` (JSON lines).",
        "",
    ]
    return "\n".join(lines)


def write_datacard(
    output: Storage,
    records: Iterable[Mapping[str, Any]],
    streams: list[DatasetStream],
    *,
    run: str,
    step: int,
    images_seen: int,
) -> dict[str, Any]:
    """`datacard.json`, `datacard.md` and `attribution.jsonl` under `output`; the card is written last."""
    with tempfile.TemporaryDirectory(prefix="commoncanvas-datacard-") as tmp:
        manifest = Path(tmp) / MANIFEST
        card = build_datacard(
            records,
            streams,
            manifest,
            run=run,
            step=step,
            images_seen=images_seen,
            manifest_url=output.url(MANIFEST),
        )
        output.upload_file(MANIFEST, manifest)
    output.write_text(CARD_MARKDOWN, render_markdown(card))
    output.write_text(CARD_JSON, json.dumps(card, indent=1, ensure_ascii=False))
    return card

"""One output, one set of settings: what a stage's output was made from, kept beside its plan.

Every setting that changes a stage's outputs (a ScrapeJob's filters, a CaptionJob's model, prompt and
decoding, a latents phase's resolution and encoders) is recorded in `_plan/identity.json` the first
time the output is planned. A later run into the same output with another value, another stage's
output, or an output that is also the stage's input, is refused with one line naming the field:
finished units made with the old settings would otherwise be returned as if they were new.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from commoncanvas.redact import redact_text
from commoncanvas.specs.common import PlanMismatch
from commoncanvas.units import StageLayout

IDENTITY_KEY = "identity.json"  # under the output's _plan/


class OutputReused(PlanMismatch):
    """An output made by another stage or with other settings, or one that is also the input."""


def _root(uri: str) -> str:
    return uri.rstrip("/") + "/"


def check_not_input(
    output: str, output_field: str, inputs: Iterable[tuple[str, str]], nested: bool = True
) -> None:
    """Refuse an output that is one of the `(input URI, field)` inputs or, with `nested`, holds one or
    lies inside one (a dataset root: its splits would be overwritten)."""
    out = _root(output)
    for uri, field in inputs:
        given = _root(uri)
        if out == given or (nested and (out.startswith(given) or given.startswith(out))):
            raise OutputReused(
                f"{output_field} {redact_text(output)!r} overlaps {field} {redact_text(uri)!r}: a stage "
                f"would overwrite what it reads; give {output_field} a place of its own"
            )


def _shown(value: Any) -> str:
    return redact_text(json.dumps(value, sort_keys=True))


def claim_output(layout: StageLayout, kind: str, settings: Mapping[str, Any], output_field: str) -> None:
    """Record `settings` (field path -> value, as the resource spells it) for this output, or check
    them against what was recorded. Values are stored redacted: a credential never reaches a plan."""
    wanted = {name: json.loads(_shown(value)) for name, value in settings.items()}
    plan = layout.plan
    if not plan.exists(IDENTITY_KEY):
        plan.write_text(
            IDENTITY_KEY, json.dumps({"kind": kind, "settings": wanted}, indent=1, sort_keys=True)
        )
        return
    recorded = json.loads(plan.read_text(IDENTITY_KEY))
    uri = redact_text(layout.output.uri)
    if recorded.get("kind") != kind:
        raise OutputReused(
            f"{output_field} {uri!r} holds a {recorded.get('kind')}'s output; give this {kind} its own "
            f"{output_field}"
        )
    old: dict[str, Any] = recorded.get("settings", {})
    changed = sorted(name for name in old.keys() | wanted.keys() if old.get(name) != wanted.get(name))
    if changed:
        first = changed[0]
        raise OutputReused(
            f"{output_field} {uri!r} was made with {first}={_shown(old.get(first))}, this {kind} has "
            f"{_shown(wanted.get(first))}"
            + (f" (and {len(changed) - 1} more: {', '.join(changed[1:4])})" if len(changed) > 1 else "")
            + f"; use a new {output_field}, or set it back"
        )

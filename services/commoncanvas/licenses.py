"""The Flickr / YFCC100M license table, recognition by name or URL, and the keep/split policy.

One table, one place: every other module asks this one what a license allows.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from urllib.parse import urlsplit


class Split(StrEnum):
    COMMERCIAL = "commercial"
    NONCOMMERCIAL = "noncommercial"
    # NoDerivs photos, kept apart for evaluation only (prompts and reference images, never trained on).
    EVALUATION = "evaluation"


TRAINING_SPLITS: tuple[str, ...] = (Split.COMMERCIAL.value, Split.NONCOMMERCIAL.value)


def evaluation_root_problem(uri: str) -> str:
    """Why a dataset root `uri` must not be trained on or read as a dataset root ('' when none): it is
    the NoDerivs evaluation split itself."""
    if uri.rstrip("/").rsplit("/", 1)[-1] != Split.EVALUATION:
        return ""
    return (
        f"{uri} is an evaluation split: its NoDerivs photos are for evaluation only (EvalRun reads its "
        "captions as prompts), never trained on; give the stage's output root and train on commercial "
        "or noncommercial"
    )


@dataclass(frozen=True, slots=True)
class License:
    flickr_id: int
    code: str
    name: str
    url: str
    commercial: bool
    derivatives: bool
    attribution: bool
    share_alike: bool


LICENSES: tuple[License, ...] = (
    License(0, "all-rights-reserved", "All Rights Reserved", "", False, False, True, False),
    License(
        1,
        "cc-by-nc-sa",
        "Attribution-NonCommercial-ShareAlike License",
        "https://creativecommons.org/licenses/by-nc-sa/2.0/",
        False,
        True,
        True,
        True,
    ),
    License(
        2,
        "cc-by-nc",
        "Attribution-NonCommercial License",
        "https://creativecommons.org/licenses/by-nc/2.0/",
        False,
        True,
        True,
        False,
    ),
    License(
        3,
        "cc-by-nc-nd",
        "Attribution-NonCommercial-NoDerivs License",
        "https://creativecommons.org/licenses/by-nc-nd/2.0/",
        False,
        False,
        True,
        False,
    ),
    License(
        4,
        "cc-by",
        "Attribution License",
        "https://creativecommons.org/licenses/by/2.0/",
        True,
        True,
        True,
        False,
    ),
    License(
        5,
        "cc-by-sa",
        "Attribution-ShareAlike License",
        "https://creativecommons.org/licenses/by-sa/2.0/",
        True,
        True,
        True,
        True,
    ),
    License(
        6,
        "cc-by-nd",
        "Attribution-NoDerivs License",
        "https://creativecommons.org/licenses/by-nd/2.0/",
        True,
        False,
        True,
        False,
    ),
    License(
        7,
        "no-known-copyright",
        "No known copyright restrictions",
        "https://www.flickr.com/commons/usage/",
        True,
        True,
        False,
        False,
    ),
    License(
        8,
        "us-government-work",
        "United States Government Work",
        "http://www.usa.gov/copyright.shtml",
        True,
        True,
        False,
        False,
    ),
    License(
        9,
        "cc0",
        "Public Domain Dedication (CC0)",
        "https://creativecommons.org/publicdomain/zero/1.0/",
        True,
        True,
        False,
        False,
    ),
    License(
        10,
        "public-domain-mark",
        "Public Domain Mark",
        "https://creativecommons.org/publicdomain/mark/1.0/",
        True,
        True,
        False,
        False,
    ),
)

BY_CODE: dict[str, License] = {lic.code: lic for lic in LICENSES}


def restrictiveness(code: str) -> tuple[bool, bool, bool, bool]:
    """Orders licenses by what they forbid or demand: no-derivatives first, then non-commercial, then
    share-alike, then attribution. Of copies of one image, the most restrictive license is the one that
    may stand (so an image that is also NoDerivs somewhere is evaluated on, never trained on)."""
    lic = BY_CODE[code]
    return (not lic.derivatives, not lic.commercial, lic.share_alike, lic.attribution)


BY_FLICKR_ID: dict[int, License] = {lic.flickr_id: lic for lic in LICENSES}
LICENSE_CODES: tuple[str, ...] = tuple(BY_CODE)
# The default policy: everything that allows derivatives (drops every NoDerivs license and ARR).
DEFAULT_ALLOWED: tuple[str, ...] = tuple(lic.code for lic in LICENSES if lic.derivatives)
# The evaluation split's licenses: Creative Commons NoDerivs (cc-by-nd, cc-by-nc-nd) allow sharing a
# verbatim copy with credit, which is all evaluation does; All Rights Reserved allows nothing.
EVALUATION_LICENSES: tuple[str, ...] = tuple(
    lic.code for lic in LICENSES if lic.code.startswith("cc-") and not lic.derivatives
)

_CC_ELEMENTS = {"by", "nc", "nd", "sa"}
_WORD_TO_ELEMENT = {
    "attribution": "by",
    "noncommercial": "nc",
    "noderivs": "nd",
    "noderivatives": "nd",
    "noderivative": "nd",
    "sharealike": "sa",
}
_NAMED = {
    "all rights reserved": "all-rights-reserved",
    "no known copyright restrictions": "no-known-copyright",
    "united states government work": "us-government-work",
    "us government work": "us-government-work",
    "public domain dedication cc0": "cc0",
    "public domain dedication": "cc0",
    "cc0": "cc0",
    "public domain mark": "public-domain-mark",
}


def _code_from_elements(elements: Iterable[str]) -> str | None:
    """('by', 'nc', 'sa') -> 'cc-by-nc-sa'; anything unrecognised -> None (never guess)."""
    present = list(elements)
    if not present or not set(present) <= _CC_ELEMENTS or len(set(present)) != len(present):
        return None
    ordered = [e for e in ("by", "nc", "nd", "sa") if e in present]
    if ordered[0] != "by" or ("nd" in ordered and "sa" in ordered):
        return None
    code = "cc-" + "-".join(ordered)
    return code if code in BY_CODE else None


def license_from_name(name: str) -> License | None:
    """'Attribution-NonCommercial License', 'CC BY-NC 2.0', 'Public Domain Mark' ... -> License."""
    text = name.strip().lower()
    if not text:
        return None
    text = text.replace("creative commons", " ").replace("non-commercial", "noncommercial")
    text = text.replace("share-alike", "sharealike").replace("no-derivs", "noderivs")
    text = re.sub(r"\blicen[cs]e\b", " ", text)
    text = re.sub(r"\b\d+(\.\d+)*\b", " ", text)  # any version
    text = re.sub(r"\b(international|universal|unported|generic)\b", " ", text)  # version suffixes
    words = [w for w in re.split(r"[^a-z0-9]+", text) if w]
    if not words:
        return None
    joined = " ".join(words)
    if joined in _NAMED:
        return BY_CODE[_NAMED[joined]]
    if words[0] == "cc":
        words = words[1:]
    elements = [_WORD_TO_ELEMENT.get(w, w) for w in words]
    if elements and all(e in _CC_ELEMENTS for e in elements):
        code = _code_from_elements(elements)
        return BY_CODE[code] if code else None
    return None


def license_from_url(url: str) -> License | None:
    """Any http(s) form of a license URL, any version, with or without a trailing slash."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https"):
        return None
    host = parts.netloc.lower().removeprefix("www.")
    path = [p for p in parts.path.lower().split("/") if p]
    if host == "creativecommons.org" and len(path) >= 2:
        if path[0] == "licenses":
            return BY_CODE.get(_code_from_elements(path[1].split("-")) or "")
        if path[0] == "publicdomain":
            return {"zero": BY_CODE["cc0"], "mark": BY_CODE["public-domain-mark"]}.get(path[1])
    if host == "flickr.com" and path[:2] == ["commons", "usage"]:
        return BY_CODE["no-known-copyright"]
    if host == "usa.gov" and path[:1] == ["copyright.shtml"]:
        return BY_CODE["us-government-work"]
    return None


@dataclass(frozen=True, slots=True)
class LicenseDecision:
    """Either a license and its split, or the reason the row is excluded."""

    license: License | None
    split: Split | None
    reason: str | None


def resolve_license(name: str, url: str) -> License | str:
    """The license a metadata row states, or why none can be trusted. Never guesses:
    everything stated must be recognised, and name and URL must agree."""
    stated = [
        parse(value) for value, parse in ((url, license_from_url), (name, license_from_name)) if value.strip()
    ]
    if not stated:
        return "license-missing"
    if None in stated:
        return "license-unknown"
    if len(set(stated)) > 1:
        return "license-conflict"
    found = stated[0]
    assert found is not None
    return found


@dataclass(frozen=True, slots=True)
class LicensePolicy:
    allowed: frozenset[str] = frozenset(DEFAULT_ALLOWED)
    # NoDerivs photos go to the evaluation split instead of being excluded (never to C or NC).
    evaluation: bool = False

    def decide(self, name: str, url: str) -> LicenseDecision:
        return _decide(self.allowed, self.evaluation, name, url)


# A metadata file states a few dozen (name, URL) pairs over millions of rows: decide each pair once.
@lru_cache(maxsize=4096)
def _decide(allowed: frozenset[str], evaluation: bool, name: str, url: str) -> LicenseDecision:
    found = resolve_license(name, url)
    if isinstance(found, str):
        return LicenseDecision(None, None, found)
    if evaluation and found.code in EVALUATION_LICENSES:
        return LicenseDecision(found, Split.EVALUATION, None)
    if found.code not in allowed:
        return LicenseDecision(found, None, f"license-not-allowed:{found.code}")
    split = Split.COMMERCIAL if found.commercial else Split.NONCOMMERCIAL
    return LicenseDecision(found, split, None)


@lru_cache(maxsize=4096)
def normalized_license_url(lic: License, stated_url: str) -> str:
    """Keep the version the source stated (https, trailing slash); fall back to the canonical URL."""
    if not stated_url.strip() or license_from_url(stated_url) != lic:
        return lic.url
    parts = urlsplit(stated_url.strip())
    if parts.netloc.lower().removeprefix("www.") != "creativecommons.org":
        return lic.url
    return f"https://creativecommons.org{parts.path.rstrip('/')}/"

"""The Flickr / YFCC100M license table, recognition by name and URL, and the keep/split policy."""

from __future__ import annotations

import pytest

from commoncanvas.licenses import (
    BY_CODE,
    BY_FLICKR_ID,
    DEFAULT_ALLOWED,
    LICENSES,
    LicensePolicy,
    Split,
    license_from_name,
    license_from_url,
    normalized_license_url,
    resolve_license,
)

# Flickr id -> (code, commercial use, derivatives, share-alike), as Flickr's license table defines them.
FLICKR_TABLE = {
    0: ("all-rights-reserved", False, False, False),
    1: ("cc-by-nc-sa", False, True, True),
    2: ("cc-by-nc", False, True, False),
    3: ("cc-by-nc-nd", False, False, False),
    4: ("cc-by", True, True, False),
    5: ("cc-by-sa", True, True, True),
    6: ("cc-by-nd", True, False, False),
    7: ("no-known-copyright", True, True, False),
    8: ("us-government-work", True, True, False),
    9: ("cc0", True, True, False),
    10: ("public-domain-mark", True, True, False),
}
COMMERCIAL_KEPT = {
    "cc-by",
    "cc-by-sa",
    "no-known-copyright",
    "us-government-work",
    "cc0",
    "public-domain-mark",
}
NONCOMMERCIAL_KEPT = {"cc-by-nc", "cc-by-nc-sa"}
DROPPED = {"all-rights-reserved", "cc-by-nd", "cc-by-nc-nd"}


# --- the table --------------------------------------------------------------------------------------


def test_table_holds_flickr_license_ids_0_to_10_once_each() -> None:
    assert [lic.flickr_id for lic in LICENSES] == list(range(11))
    assert len(BY_CODE) == len(LICENSES) == len(BY_FLICKR_ID)


@pytest.mark.parametrize("flickr_id", sorted(FLICKR_TABLE))
def test_each_license_has_flickrs_code_and_permissions(flickr_id: int) -> None:
    code, commercial, derivatives, share_alike = FLICKR_TABLE[flickr_id]
    lic = BY_FLICKR_ID[flickr_id]
    assert (lic.code, lic.commercial, lic.derivatives, lic.share_alike) == (
        code,
        commercial,
        derivatives,
        share_alike,
    )
    assert BY_CODE[code] is lic


def test_cc_licenses_require_attribution_and_public_domain_ones_do_not() -> None:
    for lic in LICENSES:
        expected = lic.code.startswith("cc-by") or lic.code == "all-rights-reserved"
        assert lic.attribution is expected, lic.code


def test_default_policy_allows_exactly_the_licenses_that_permit_derivatives() -> None:
    assert set(DEFAULT_ALLOWED) == COMMERCIAL_KEPT | NONCOMMERCIAL_KEPT
    assert not set(DEFAULT_ALLOWED) & DROPPED


# --- recognition by name ----------------------------------------------------------------------------


@pytest.mark.parametrize("lic", LICENSES, ids=lambda lic: lic.code)
def test_flickrs_own_license_name_is_recognised(lic) -> None:
    assert license_from_name(lic.name) == lic


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("attribution-noncommercial-sharealike license", "cc-by-nc-sa"),
        ("  Attribution License  ", "cc-by"),
        ("CC BY-NC 2.0", "cc-by-nc"),
        ("CC BY-SA 4.0", "cc-by-sa"),
        ("cc-by-nc-nd", "cc-by-nc-nd"),
        ("Creative Commons Attribution-ShareAlike 3.0", "cc-by-sa"),
        ("Attribution-Non-Commercial-Share-Alike License", "cc-by-nc-sa"),
        ("Attribution-NoDerivatives 4.0", "cc-by-nd"),
        ("Attribution-NonCommercial-NoDerivs Licence", "cc-by-nc-nd"),
        ("CC0", "cc0"),
        ("CC0 1.0", "cc0"),
        ("Public Domain Dedication", "cc0"),
        ("US Government Work", "us-government-work"),
        ("public domain mark 1.0", "public-domain-mark"),
    ],
)
def test_license_name_variants_are_recognised_whatever_the_version_or_spelling(name: str, code: str) -> None:
    found = license_from_name(name)
    assert found is not None and found.code == code


@pytest.mark.parametrize(
    "name",
    [
        "",
        "   ",
        "Some Custom License",
        "NonCommercial-ShareAlike License",  # no Attribution element: not a CC license Flickr uses
        "Attribution-NoDerivs-ShareAlike License",  # contradictory: NoDerivs and ShareAlike
        "Attribution-Whatever License",
        "GPL",
    ],
)
def test_unrecognised_license_name_gives_none(name: str) -> None:
    assert license_from_name(name) is None


# --- recognition by URL -----------------------------------------------------------------------------


@pytest.mark.parametrize("lic", [lic for lic in LICENSES if lic.url], ids=lambda lic: lic.code)
def test_canonical_license_url_is_recognised(lic) -> None:
    assert license_from_url(lic.url) == lic


@pytest.mark.parametrize("lic", [lic for lic in LICENSES if lic.url], ids=lambda lic: lic.code)
@pytest.mark.parametrize("scheme", ["http", "https"])
@pytest.mark.parametrize("slash", ["/", ""])
def test_license_url_is_recognised_over_http_or_https_with_or_without_trailing_slash(
    lic, scheme: str, slash: str
) -> None:
    url = scheme + "://" + lic.url.split("://", 1)[1].rstrip("/") + slash
    assert license_from_url(url) == lic


@pytest.mark.parametrize("version", ["1.0", "2.0", "2.5", "3.0", "4.0"])
@pytest.mark.parametrize("code", ["cc-by", "cc-by-sa", "cc-by-nc", "cc-by-nc-sa", "cc-by-nd", "cc-by-nc-nd"])
def test_cc_license_url_is_recognised_in_any_version(code: str, version: str) -> None:
    url = f"https://creativecommons.org/licenses/{code.removeprefix('cc-')}/{version}/"
    assert license_from_url(url) == BY_CODE[code]


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("http://www.creativecommons.org/licenses/by-nc/2.0/", "cc-by-nc"),
        ("HTTPS://CreativeCommons.org/Licenses/BY-SA/2.0/", "cc-by-sa"),
        ("https://creativecommons.org/licenses/by-nd-nc/1.0/", "cc-by-nc-nd"),  # CC 1.0's element order
        ("https://creativecommons.org/licenses/by/2.0/deed.en", "cc-by"),
        ("http://creativecommons.org/publicdomain/zero/1.0", "cc0"),
        ("http://creativecommons.org/publicdomain/mark/1.0/", "public-domain-mark"),
        ("http://flickr.com/commons/usage", "no-known-copyright"),
        ("https://www.usa.gov/copyright.shtml", "us-government-work"),
    ],
)
def test_license_url_variants_are_recognised(url: str, code: str) -> None:
    assert license_from_url(url) == BY_CODE[code]


@pytest.mark.parametrize(
    "url",
    [
        "",
        "not a url",
        "ftp://creativecommons.org/licenses/by/2.0/",
        "https://example.com/licenses/by/2.0/",
        "https://creativecommons.org.example.com/licenses/by/2.0/",
        "https://creativecommons.org/licenses/",
        "https://creativecommons.org/licenses/nc-sa/1.0/",  # no BY element
        "https://creativecommons.org/licenses/by-nd-sa/2.0/",  # contradictory
        "https://creativecommons.org/publicdomain/other/1.0/",
        "https://www.flickr.com/photos/someone/",
    ],
)
def test_unrecognised_license_url_gives_none(url: str) -> None:
    assert license_from_url(url) is None


@pytest.mark.parametrize(
    "url",
    [
        "https://creativecommons.org/licenses/by-foo/2.0/",
        "https://creativecommons.org/licenses/by-nc-xyz/2.0/",
        "https://creativecommons.org/licenses/sampling+by/1.0/",
    ],
)
def test_license_url_with_an_unknown_element_is_not_guessed_to_be_a_known_license(url: str) -> None:
    # Never guess: a path element that is not by/nc/nd/sa makes the URL unknown, as it does for names.
    assert license_from_url(url) is None


# --- resolving what a row states --------------------------------------------------------------------


def test_row_stating_no_license_is_license_missing() -> None:
    assert resolve_license("", "") == "license-missing"
    assert resolve_license("  ", " ") == "license-missing"


@pytest.mark.parametrize(
    ("name", "url"),
    [
        ("Some Custom License", ""),
        ("", "https://example.com/my-license"),
        ("Attribution License", "https://example.com/my-license"),  # one part known is not enough
        ("Some Custom License", "https://creativecommons.org/licenses/by/2.0/"),
    ],
)
def test_row_with_any_unrecognised_license_statement_is_license_unknown(name: str, url: str) -> None:
    assert resolve_license(name, url) == "license-unknown"


def test_row_whose_name_and_url_disagree_is_license_conflict() -> None:
    assert (
        resolve_license("Attribution License", "https://creativecommons.org/licenses/by-nc/2.0/")
        == "license-conflict"
    )


@pytest.mark.parametrize(
    ("name", "url"),
    [
        ("Attribution-ShareAlike License", "http://creativecommons.org/licenses/by-sa/2.0/"),
        ("Attribution-ShareAlike License", ""),
        ("", "http://creativecommons.org/licenses/by-sa/2.0/"),
        ("CC BY-SA 4.0", "https://creativecommons.org/licenses/by-sa/4.0"),
    ],
)
def test_row_whose_stated_parts_agree_resolves_to_that_license(name: str, url: str) -> None:
    assert resolve_license(name, url) == BY_CODE["cc-by-sa"]


# --- the policy -------------------------------------------------------------------------------------


@pytest.mark.parametrize("lic", LICENSES, ids=lambda lic: lic.code)
def test_default_policy_splits_commercial_and_noncommercial_and_drops_the_rest(lic) -> None:
    decision = LicensePolicy().decide(lic.name, lic.url)
    assert decision.license == lic
    if lic.code in COMMERCIAL_KEPT:
        assert (decision.split, decision.reason) == (Split.COMMERCIAL, None)
    elif lic.code in NONCOMMERCIAL_KEPT:
        assert (decision.split, decision.reason) == (Split.NONCOMMERCIAL, None)
    else:
        assert (decision.split, decision.reason) == (None, f"license-not-allowed:{lic.code}")


def test_policy_keeps_only_the_licenses_it_allows() -> None:
    policy = LicensePolicy(frozenset({"cc0"}))
    assert policy.decide("", "https://creativecommons.org/publicdomain/zero/1.0/").split == Split.COMMERCIAL
    dropped = policy.decide("Attribution License", "")
    assert (dropped.split, dropped.reason) == (None, "license-not-allowed:cc-by")


@pytest.mark.parametrize(
    ("name", "url", "reason"),
    [
        ("", "", "license-missing"),
        ("Some Custom License", "", "license-unknown"),
        ("Attribution License", "https://creativecommons.org/licenses/by-nc/2.0/", "license-conflict"),
    ],
)
def test_policy_excludes_missing_unknown_or_conflicting_license_with_its_reason(
    name: str, url: str, reason: str
) -> None:
    decision = LicensePolicy().decide(name, url)
    assert (decision.license, decision.split, decision.reason) == (None, None, reason)


# --- the URL kept with each sample ------------------------------------------------------------------


def test_normalized_url_keeps_the_stated_version_as_https_with_trailing_slash() -> None:
    assert (
        normalized_license_url(BY_CODE["cc-by-sa"], "http://creativecommons.org/licenses/by-sa/3.0")
        == "https://creativecommons.org/licenses/by-sa/3.0/"
    )


@pytest.mark.parametrize(
    ("code", "stated"),
    [
        ("cc-by", ""),  # nothing stated
        ("cc-by", "https://creativecommons.org/licenses/by-nc/2.0/"),  # a different license
        ("no-known-copyright", "http://flickr.com/commons/usage"),  # not a creativecommons.org URL
    ],
)
def test_normalized_url_falls_back_to_the_canonical_one(code: str, stated: str) -> None:
    assert normalized_license_url(BY_CODE[code], stated) == BY_CODE[code].url

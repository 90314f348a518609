"""Secrets out of URLs and messages: userinfo (`user:password@`) and secret-looking query values.

For anything that is logged, recorded or labelled: fetch details, the catalog's fetched URL, storage
errors (S3_ENDPOINT_URL may carry credentials), plans and markers."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

MASK = "***"
# Query keys whose values are credentials: presigned S3/GCS URLs, API keys, tokens, signatures.
_SECRET_KEY = re.compile(
    r"(?i)^(x-amz-(signature|credential|security-token)|x-goog-(signature|credential)|signature|sig"
    r"|.*token.*|.*secret.*|.*passw(or)?d.*|pwd|.*api[-_]?key.*|key|auth.*|credential.*|session.*)$"
)
# A URL's userinfo inside free text: "scheme://user:pass@" (stops at the first '/', space or quote).
_USERINFO_IN_TEXT = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@'\"<>]+@")
_QUERY_PAIR_IN_TEXT = re.compile(r"([?&])([^=&#\s'\"<>]+)=([^&#\s'\"<>]*)")


def _mask_pair(match: re.Match[str]) -> str:
    sep, key, value = match.groups()
    return f"{sep}{key}={MASK}" if value and _SECRET_KEY.match(key) else match.group(0)


def redact_url(url: str) -> str:
    """`url` with its userinfo replaced by *** and the values of secret-looking query keys masked."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact_text(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rpartition('@')[2]}"
    query = _QUERY_PAIR_IN_TEXT.sub(_mask_pair, "?" + parts.query)[1:] if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def strip_userinfo(url: str) -> str:
    """`url` without `user:password@` (cheap when there is none: called per planned row)."""
    if "@" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact_text(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def redact_text(text: str) -> str:
    """Every URL's userinfo and secret query values in free text (an exception's message) masked."""
    return _QUERY_PAIR_IN_TEXT.sub(_mask_pair, _USERINFO_IN_TEXT.sub(rf"\1{MASK}@", text))


def bare_host(url: str) -> str:
    """The host name alone (no userinfo, no port), lowercase: what a metrics label may carry."""
    try:
        return (urlsplit(url).hostname or "").rstrip(".")
    except ValueError:
        return ""

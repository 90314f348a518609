"""The fetcher: async HTTP with bounded concurrency, per-host rate limits, retries that honour
Retry-After within a per-sample time budget, fallback through candidate URLs, an SSRF policy on every
request and redirect hop, X-Robots-Tag opt-outs, Flickr's "photo unavailable" placeholder, and strict
image validation of what comes back.

Outcomes: "ok"; permanent exclusions ("http-404", "not-image", "blocked", "opt-out",
"unavailable", ...); and transient failures ("timeout", "connection-error", "truncated", "http-429",
"http-5xx"), which set `FetchResult.transient`: a rerun may well fetch those."""

from __future__ import annotations

import asyncio
import hashlib
import io
import random
import re
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from ipaddress import IPv4Address, IPv4Network, IPv6Address, ip_address
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from aiolimiter import AsyncLimiter
from PIL import Image

from commoncanvas import metrics
from commoncanvas.images import set_pixel_limit
from commoncanvas.redact import bare_host, redact_text, redact_url, strip_userinfo
from commoncanvas.scrape.plan import PlannedSample
from commoncanvas.specs.scrape import FetchPolicy, Filters

RETRY_AFTER_CAP_SECONDS = 120.0
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# img2dataset's default set: any of these in an X-Robots-Tag for us (or for every agent) is an opt-out.
ROBOTS_OPT_OUT = frozenset({"noai", "noimageai", "noindex", "noimageindex"})
# Instance metadata services (AWS/GCP/Azure, AWS over IPv6, ECS task metadata, Alibaba): refused even
# where private networks are allowed, since their answers are credentials.
METADATA_ADDRESSES = frozenset(
    ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "169.254.170.2", "100.100.100.200")
)
CGNAT = IPv4Network("100.64.0.0/10")
# Perceptual placeholder matching: within this many of 64 dHash bits; only on images this small, since
# placeholders are small and hashing a large original would cost a full decode.
DHASH_MAX_DISTANCE = 4
DHASH_MAX_PIXELS = 4_000_000
_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
_GENERIC_TYPES = ("application/octet-stream", "binary/octet-stream", "")


class FetchFailure(Exception):
    """A candidate URL did not yield a usable image; `reason` is the outcome label. Permanent: a rerun
    would get the same answer."""

    transient = False

    def __init__(self, reason: str, detail: str = "", retry_after: float | None = None) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.retry_after = retry_after


class RetryableFailure(FetchFailure):
    """429, 5xx, timeouts, resets and truncated bodies: worth another attempt at the same URL, and,
    once the attempts or the sample's time budget are spent, transient (a rerun may succeed)."""

    transient = True


class AddressRefused(OSError):
    """Raised by the resolver: aiohttp wraps OSErrors from resolution in ClientConnectorDNSError."""


@dataclass(frozen=True, slots=True)
class ValidImage:
    width: int
    height: int
    format: str
    sha256: str


@dataclass(slots=True)
class FetchResult:
    sample: PlannedSample
    outcome: str
    url: str = ""  # the final URL after redirects, with any credentials redacted
    data: bytes = b""
    width: int = 0
    height: int = 0
    sha256: str = ""
    detail: str = ""
    attempts: int = 0
    transient: bool = False  # a failure a rerun may not repeat (see the module docstring)


def sniff_format(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for magic, fmt in _MAGIC if data.startswith(magic)), None)


def _jpeg_complete(data: bytes) -> bool:
    """An end-of-image marker after the last start-of-scan (0xFF 0xDA cannot occur in entropy-coded
    data, which stuffs every 0xFF with 0x00): a truncated file has none."""
    last_scan = data.rfind(b"\xff\xda")
    return last_scan > 0 and data.find(b"\xff\xd9", last_scan) > 0


def validate_image(data: bytes, content_type: str, filters: Filters) -> ValidImage:
    """Content type, magic bytes, header size checks before decoding, then an integrity check:
    `filters.check == "decode"` decodes every pixel; "header" verifies the structure (Pillow's
    verify, JPEG end marker) at a fraction of the cost.  Also hashes the bytes, off the event loop."""
    mime = content_type.split(";")[0].strip().lower()
    if not (mime.startswith("image/") or mime in _GENERIC_TYPES):
        raise FetchFailure("not-image", f"content-type {mime!r}")
    fmt = sniff_format(data)
    if fmt is None:
        raise FetchFailure("not-image", f"unrecognised leading bytes {data[:8]!r}")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > filters.max_pixels:
                raise FetchFailure(
                    "decompression-bomb", f"{width}x{height} exceeds {filters.max_pixels} pixels"
                )
            if min(width, height) < filters.min_side:
                raise FetchFailure("too-small", f"{width}x{height} is below {filters.min_side} px")
            if filters.check == "header":
                if fmt == "JPEG" and not _jpeg_complete(data):
                    raise FetchFailure("corrupt", "JPEG has no end-of-image marker (truncated)")
                image.verify()
            else:
                if image.format == "JPEG":
                    # Decoding at 1/8 scale still reads every entropy-coded byte.
                    image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
                image.load()
    except FetchFailure:
        raise
    except Image.DecompressionBombError as exc:  # above twice Pillow's guard: refused by Image.open
        raise FetchFailure("decompression-bomb", str(exc)) from None
    except Exception as exc:  # Pillow raises many types for broken files
        raise FetchFailure("corrupt", f"{type(exc).__name__}: {exc}") from None
    return ValidImage(width, height, fmt, hashlib.sha256(data).hexdigest())


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), RETRY_AFTER_CAP_SECONDS)
    try:
        delay = parsedate_to_datetime(value).timestamp() - time.time()
    except (TypeError, ValueError):
        return None
    return min(max(delay, 0.0), RETRY_AFTER_CAP_SECONDS)


def robots_opt_out(values: Iterable[str], agent: str) -> str | None:
    """The X-Robots-Tag directive that opts out of use by `agent` (or by every agent), else None.
    `values` are the header's values: "noai, noimageai", or "agent: noindex" for one agent only."""
    for value in values:
        token, colon, rest = value.partition(":")
        directives = rest if colon else token
        # "unavailable_after: <date>" also has a colon; its token is not an agent we match.
        if colon and token.strip().lower() != agent:
            continue
        for directive in directives.split(","):
            if directive.strip().lower() in ROBOTS_OPT_OUT:
                return value.strip()
    return None


def dhash(data: bytes) -> int:
    """A 64-bit difference hash: survives re-encoding and resizing, unlike the bytes' sha256."""
    with Image.open(io.BytesIO(data)) as image:
        image.draft("L", (64, 64))  # JPEG decodes at a fraction of the size
        pixels = image.convert("L").resize((9, 8), Image.Resampling.BOX).tobytes()
    bits = 0
    for row in range(8):
        for col in range(8):
            bits = bits << 1 | (pixels[row * 9 + col] > pixels[row * 9 + col + 1])
    return bits


def fingerprints(data: bytes) -> list[str]:
    """An image's `fetch.placeholderFingerprints` entries: run it on a placeholder you have found."""
    return [f"sha256:{hashlib.sha256(data).hexdigest()}", f"dhash:{dhash(data):016x}"]


class Placeholders:
    """Flickr's "photo unavailable" image: by the redirect target's URL, or by content.

    Flickr sends a removed photo's URL to a placeholder (s.yimg.com/pw/images/en-us/photo_unavailable.png,
    older: www.flickr.com/images/photo_unavailable*.gif); `unavailable_url_markers` catch that before it
    is fetched. Some hosts serve the placeholder in place (status 200); only its content tells. The
    genuine placeholders' hashes are not shipped (we could not obtain them offline), so content
    matching is by the configured `placeholder_fingerprints`: exact sha256 of the bytes, or a dHash for
    re-encoded and resized copies (flat grey images all hash alike, so dHash is only ever compared
    with fingerprints someone took from a real placeholder)."""

    def __init__(self, policy: FetchPolicy) -> None:
        self.markers = [m.lower() for m in policy.unavailable_url_markers if m]
        self.sha256 = {
            f.partition(":")[2] for f in policy.placeholder_fingerprints if f.startswith("sha256:")
        }
        self.dhashes = [int(f[6:], 16) for f in policy.placeholder_fingerprints if f.startswith("dhash:")]

    def url_marker(self, url: str) -> str | None:
        """The marker in `url`'s path (not its query, which any page may fill), else None."""
        try:
            path = urlsplit(url).path.lower()
        except ValueError:
            return None
        return next((m for m in self.markers if m in path), None)

    def content_match(self, data: bytes, image: ValidImage) -> str | None:
        if image.sha256 in self.sha256:
            return f"sha256 {image.sha256} is a known placeholder"
        if self.dhashes and image.width * image.height <= DHASH_MAX_PIXELS:
            try:
                value = dhash(data)
            except Exception as exc:  # a header-checked image may still fail to decode
                raise FetchFailure("corrupt", f"{type(exc).__name__}: {exc}") from None
            for known in self.dhashes:
                if (value ^ known).bit_count() <= DHASH_MAX_DISTANCE:
                    return (
                        f"dhash {value:016x} is within {DHASH_MAX_DISTANCE} bits of placeholder {known:016x}"
                    )
        return None


class TemplateCredentials:
    """The `user:password@` of the spec's URL templates (a mirror behind basic auth), by the origin
    pattern it was written for. Plans hold URLs without it; it is put back on a request (and a
    redirect hop) only where the hop's host and port match that template's."""

    def __init__(self, fetch: FetchPolicy) -> None:
        self._by_origin: list[tuple[re.Pattern[str], str]] = []
        for template in (fetch.original_url_template, fetch.sized_url_template):
            netloc = template.split("://", 1)[-1].split("/", 1)[0]
            if "@" not in netloc:
                continue
            userinfo, _, origin = netloc.rpartition("@")
            # "{farm}" and the like in a host match any run of host characters.
            pattern = "".join(
                "[^/@]*" if piece.startswith("{") else re.escape(piece)
                for piece in re.split(r"(\{[^}]*\})", origin)
                if piece
            )
            self._by_origin.append((re.compile(pattern, re.IGNORECASE), userinfo))

    def apply(self, url: str) -> str:
        if not self._by_origin:
            return url
        scheme, _, rest = url.partition("://")
        netloc, slash, path = rest.partition("/")
        for origin, userinfo in self._by_origin:
            if origin.fullmatch(netloc):
                return f"{scheme}://{userinfo}@{netloc}{slash}{path}"
        return url


class HostPolicy:
    """The SSRF policy, in one place: the scheme and host every request and redirect hop may name,
    and the addresses a connection may go to (checked on the resolved address, so a name that
    resolves, or re-resolves, to an internal address is refused as well)."""

    def __init__(self, policy: FetchPolicy) -> None:
        self.patterns = [p.strip().lower().rstrip(".") for p in policy.allowed_hosts if p.strip()]
        self.allow_private = policy.allow_private_networks

    def host_allowed(self, host: str) -> bool:
        return any(
            p == "*" or host == p or (p.startswith("*.") and host.endswith(p[1:])) for p in self.patterns
        )

    def address_refusal(self, address: str) -> str | None:
        """Why a connection to `address` is refused, or None where it is allowed."""
        try:
            ip = ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
        except ValueError:
            return f"{address!r} is not an IP address"
        if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1
        if ip in METADATA_ADDRESSES:
            return f"{ip} is a cloud metadata address (always refused)"
        if self.allow_private:
            return None
        kind = (
            "loopback" if ip.is_loopback
            else "link-local" if ip.is_link_local
            else "multicast" if ip.is_multicast
            else "unspecified" if ip.is_unspecified
            else "CGNAT" if isinstance(ip, IPv4Address) and ip in CGNAT
            else "private" if ip.is_private
            else "non-global" if not ip.is_global
            else None
        )  # fmt: skip
        return f"{ip} is a {kind} address (fetch.allowPrivateNetworks is false)" if kind else None

    def check_url(self, url: str) -> None:
        """Raise FetchFailure("blocked") unless `url` may be requested."""
        shown = redact_url(url)
        try:
            parts = urlsplit(url)
            host = (parts.hostname or "").rstrip(".")
        except ValueError as exc:
            raise FetchFailure("blocked", f"{shown}: not a valid URL ({exc})") from None
        if parts.scheme not in ("http", "https"):
            raise FetchFailure("blocked", f"{shown}: scheme {parts.scheme!r} is not http or https")
        if not host or not self.host_allowed(host):
            raise FetchFailure("blocked", f"{shown}: host {host!r} is not in fetch.allowedHosts")
        try:
            ip_address(host.split("%", 1)[0])
        except ValueError:
            return  # a name: its addresses are checked once resolved (PolicyResolver)
        if (refusal := self.address_refusal(host)) is not None:
            raise FetchFailure("blocked", f"{shown}: {refusal}")


class PolicyResolver(AbstractResolver):
    """Resolves as usual, then refuses a name any of whose addresses the policy refuses. aiohttp
    connects only to addresses this returns (IP literals skip resolvers: check_url covers them)."""

    def __init__(self, hosts: HostPolicy) -> None:
        self.hosts = hosts
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            if (refusal := self.hosts.address_refusal(result["host"])) is not None:
                raise AddressRefused(f"{host} resolves to {refusal}")
        return results

    async def close(self) -> None:
        await self._inner.close()


class _Budget:
    """A sample's time: every attempt, retry wait and Retry-After wait comes out of it; waits for our
    own rate limit do not (they are not the host's doing)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def exclude(self, seconds: float) -> None:
        self.deadline += seconds


def _limiter_for(rate: float) -> AsyncLimiter:
    """A bucket of max(1, rate) per max(1, rate)/rate seconds: `rate` per second, and a fractional rate
    works (AsyncLimiter refuses to acquire more than max_rate at once, so max_rate must be >= 1)."""
    burst = max(1.0, rate)
    return AsyncLimiter(burst, burst / rate)


class Fetcher:
    """One per unit (one event loop); `fetch_all` streams results to a callback as they complete.
    Rate limits are per Fetcher, i.e. per worker process running a unit."""

    def __init__(self, fetch: FetchPolicy, filters: Filters, split: str = "") -> None:
        self.policy = fetch
        self.filters = filters
        # Pillow's guard from validate_image's header limit: it never refuses what that allows.
        set_pixel_limit(filters.max_pixels)
        self.split = split
        self.hosts = HostPolicy(fetch)
        self.placeholders = Placeholders(fetch)
        self.credentials = TemplateCredentials(fetch)
        self._agent = fetch.user_agent.split("/", 1)[0].strip().lower()
        self._limiters: dict[str, AsyncLimiter] = {}

    def _limiter(self, host: str) -> AsyncLimiter | None:
        if self.policy.per_host_rate <= 0:
            return None
        if host not in self._limiters:
            self._limiters[host] = _limiter_for(self.policy.per_host_rate)
        return self._limiters[host]

    def _delay(self, failure: FetchFailure, attempt: int) -> float:
        if failure.retry_after is not None:
            return failure.retry_after
        step = min(self.policy.max_backoff_seconds, self.policy.backoff_seconds * 2.0 ** (attempt - 1))
        # Full jitter on top of the exponential step, the sum still capped.
        return min(self.policy.max_backoff_seconds, step + random.uniform(0, step))

    async def _request(
        self, session: aiohttp.ClientSession, url: str, budget: _Budget
    ) -> tuple[str | None, bytes, str]:
        """One HTTP request, no redirects followed: (the redirect's target, or None; body; content type)."""
        shown = redact_url(url)
        limiter = self._limiter(bare_host(url))
        if limiter is not None:
            waited = time.monotonic()
            await limiter.acquire()
            budget.exclude(time.monotonic() - waited)
        timeout = min(self.policy.timeout_seconds, budget.remaining())
        if timeout <= 0:
            raise RetryableFailure(
                "timeout", f"{shown}: the sample's {budget.seconds:g}s (fetch.maxSecondsPerSample) are spent"
            )
        started = time.perf_counter()
        try:
            async with session.get(
                url, allow_redirects=False, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as response:
                status = response.status
                if status in REDIRECT_STATUSES and "Location" in response.headers:
                    return urljoin(url, response.headers["Location"]), b"", ""
                if status == 429 or status >= 500:
                    raise RetryableFailure(
                        f"http-{status}", shown, parse_retry_after(response.headers.get("Retry-After"))
                    )
                if status >= 400:
                    raise FetchFailure(f"http-{status}", shown)
                if self.policy.honor_robots_tags and (
                    tag := robots_opt_out(response.headers.getall("X-Robots-Tag", ()), self._agent)
                ):
                    raise FetchFailure("opt-out", f"{shown}: X-Robots-Tag {tag!r}")
                declared = response.content_length
                if declared is not None and declared > self.policy.max_bytes:
                    raise FetchFailure("too-large", f"{declared} bytes declared")
                if declared is not None:
                    data = await response.read()  # one buffer; aiohttp enforces the declared length
                else:
                    chunks: list[bytes] = []
                    size = 0
                    async for chunk in response.content.iter_any():
                        chunks.append(chunk)
                        size += len(chunk)
                        if size > self.policy.max_bytes:
                            raise FetchFailure("too-large", f"over {self.policy.max_bytes} bytes")
                    data = b"".join(chunks)
                return None, data, response.headers.get("Content-Type", "")
        except aiohttp.ClientPayloadError as exc:
            raise RetryableFailure("truncated", f"{shown}: {redact_text(str(exc))}") from None
        except TimeoutError:
            raise RetryableFailure("timeout", f"{shown}: no complete answer in {timeout:.3g}s") from None
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, AddressRefused):
                raise FetchFailure("blocked", f"{shown}: {exc.os_error}") from None
            raise RetryableFailure("connection-error", f"{shown}: {redact_text(str(exc))}") from None
        except aiohttp.InvalidURL:
            raise FetchFailure("blocked", f"{shown}: not a valid URL") from None
        except aiohttp.ClientError as exc:
            raise RetryableFailure(
                "connection-error", f"{shown}: {type(exc).__name__}: {redact_text(str(exc))}"
            ) from None
        finally:
            metrics.observe_fetch(url, time.perf_counter() - started)

    async def _get(self, session: aiohttp.ClientSession, url: str, budget: _Budget) -> tuple[bytes, str, str]:
        """Body, content type and the final URL, following redirects by hand: every hop passes the
        placeholder check and the host policy before it is requested."""
        hop = url
        for _ in range(self.policy.max_redirects + 1):
            if (marker := self.placeholders.url_marker(hop)) is not None:
                raise FetchFailure("unavailable", f"{redact_url(url)} -> {redact_url(hop)} ({marker!r})")
            self.hosts.check_url(hop)
            target, data, content_type = await self._request(session, self.credentials.apply(hop), budget)
            if target is None:
                return data, content_type, hop
            hop = strip_userinfo(target)  # a redirect never chooses credentials
        raise FetchFailure("too-many-redirects", f"{redact_url(url)}: over {self.policy.max_redirects}")

    def _check(self, data: bytes, content_type: str) -> ValidImage:
        image = validate_image(data, content_type, self.filters)
        if (match := self.placeholders.content_match(data, image)) is not None:
            raise FetchFailure("unavailable", match)
        return image

    async def _fetch_url(
        self, session: aiohttp.ClientSession, url: str, budget: _Budget
    ) -> tuple[bytes, ValidImage, str, int]:
        attempts = 0
        while True:
            attempts += 1
            try:
                data, content_type, final_url = await self._get(session, url, budget)
                break
            except RetryableFailure as failure:
                if attempts > self.policy.retries:
                    raise
                delay = self._delay(failure, attempts)
                if delay >= budget.remaining():
                    raise RetryableFailure(
                        failure.reason,
                        f"{failure.detail}; gave up after {attempts} attempt(s): waiting {delay:.3g}s more "
                        f"would pass fetch.maxSecondsPerSample ({budget.seconds:g}s)",
                    ) from None
                await asyncio.sleep(delay)
        image = await asyncio.to_thread(self._check, data, content_type)
        return data, image, final_url, attempts

    async def fetch_one(self, session: aiohttp.ClientSession, sample: PlannedSample) -> FetchResult:
        budget = _Budget(self.policy.max_seconds_per_sample)
        failures: list[FetchFailure] = []
        for url in sample.candidates:
            try:
                data, image, final_url, attempts = await self._fetch_url(session, url, budget)
            except FetchFailure as exc:
                failures.append(exc)
                continue
            # Identical bytes are kept here: which copy stands is decided catalog-wide (scrape.dedup).
            return FetchResult(
                sample,
                "ok",
                redact_url(final_url),
                data,
                image.width,
                image.height,
                image.sha256,
                attempts=attempts,
            )
        return self._failed(sample, failures)

    @staticmethod
    def _failed(sample: PlannedSample, failures: Sequence[FetchFailure]) -> FetchResult:
        """The first candidate's reason is the informative one (the original), unless another failed
        transiently: then a rerun may still fetch the sample, and its outcome says why it did not."""
        if not failures:
            return FetchResult(sample, "no-candidate-url")
        transient = [f for f in failures if f.transient]
        reason = (transient or failures)[0].reason
        detail = redact_text("; ".join(str(f) for f in failures))
        return FetchResult(sample, reason, detail=detail, transient=bool(transient))

    async def fetch_all(
        self, samples: Iterable[PlannedSample], on_result: Callable[[FetchResult], Awaitable[None] | None]
    ) -> None:
        timeout = aiohttp.ClientTimeout(total=self.policy.timeout_seconds)
        resolver = PolicyResolver(self.hosts)
        connector = aiohttp.TCPConnector(limit=self.policy.concurrency, ttl_dns_cache=300, resolver=resolver)
        headers = {"User-Agent": self.policy.user_agent}
        queue: asyncio.Queue[PlannedSample] = asyncio.Queue()
        for sample in samples:
            queue.put_nowait(sample)

        async def worker(session: aiohttp.ClientSession) -> None:
            while not queue.empty():
                result = await self.fetch_one(session, queue.get_nowait())
                outcome = on_result(result)
                if outcome is not None:
                    await outcome

        try:
            async with (
                aiohttp.ClientSession(
                    timeout=timeout, connector=connector, headers=headers, auto_decompress=False
                ) as session,
                asyncio.TaskGroup() as group,
            ):
                for _ in range(min(self.policy.concurrency, queue.qsize())):
                    group.create_task(worker(session))
        except ExceptionGroup as group:
            raise group.exceptions[0] from None  # one clear error (e.g. the callback's), not a group
        finally:
            await resolver.close()

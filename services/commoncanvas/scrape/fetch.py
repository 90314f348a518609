"""The fetcher: async HTTP with bounded concurrency, per-host rate limits, retries that honour
Retry-After, fallback through candidate URLs, and strict image validation of what comes back."""

from __future__ import annotations

import asyncio
import hashlib
import io
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

import aiohttp
from aiolimiter import AsyncLimiter
from PIL import Image
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt

from commoncanvas import metrics
from commoncanvas.scrape.plan import PlannedSample
from commoncanvas.specs.scrape import FetchPolicy, Filters

RETRY_AFTER_CAP_SECONDS = 120.0
# Filters.max_pixels, checked from the header before decoding, is the decompression-bomb guard;
# Pillow's own fixed limit would otherwise override the configured one.
Image.MAX_IMAGE_PIXELS = None
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
    """A candidate URL did not yield a usable image; `reason` is the outcome label."""

    def __init__(self, reason: str, detail: str = "", retry_after: float | None = None) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.retry_after = retry_after


class RetryableFailure(FetchFailure):
    """429, 5xx, timeouts, resets and truncated bodies: worth another attempt at the same URL."""


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
    url: str = ""
    data: bytes = b""
    width: int = 0
    height: int = 0
    sha256: str = ""
    detail: str = ""
    attempts: int = 0


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


class Fetcher:
    """One per unit (one event loop); `fetch_all` streams results to a callback as they complete."""

    def __init__(self, fetch: FetchPolicy, filters: Filters, split: str = "") -> None:
        self.policy = fetch
        self.filters = filters
        self.split = split
        self._limiters: dict[str, AsyncLimiter] = {}
        self._seen: set[str] = set()

    def _limiter(self, host: str) -> AsyncLimiter | None:
        if self.policy.per_host_rate <= 0:
            return None
        if host not in self._limiters:
            self._limiters[host] = AsyncLimiter(self.policy.per_host_rate, 1.0)
        return self._limiters[host]

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, FetchFailure) and exc.retry_after is not None:
            return exc.retry_after
        base = self.policy.backoff_seconds * (2 ** (state.attempt_number - 1))
        return base + random.uniform(0, base)  # full jitter on top of the exponential step

    async def _get(self, session: aiohttp.ClientSession, url: str) -> tuple[bytes, str, str]:
        """Body, content type and the final URL after redirects."""
        host = urlsplit(url).netloc
        limiter = self._limiter(host)
        if limiter is not None:
            await limiter.acquire()
        started = time.perf_counter()
        try:
            async with session.get(url) as response:
                status = response.status
                if status == 429 or status >= 500:
                    raise RetryableFailure(
                        f"http-{status}", url, parse_retry_after(response.headers.get("Retry-After"))
                    )
                if status >= 400:
                    raise FetchFailure(f"http-{status}", url)
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
                return data, response.headers.get("Content-Type", ""), str(response.url)
        except aiohttp.ClientPayloadError as exc:
            raise RetryableFailure("truncated", f"{url}: {exc}") from None
        except TimeoutError:
            raise RetryableFailure(
                "timeout", f"{url}: no complete answer in {self.policy.timeout_seconds}s"
            ) from None
        except aiohttp.TooManyRedirects:
            raise FetchFailure("too-many-redirects", url) from None
        except aiohttp.ClientError as exc:
            raise RetryableFailure("connection-error", f"{url}: {type(exc).__name__}: {exc}") from None
        finally:
            metrics.FETCH_SECONDS.labels(host=host).observe(time.perf_counter() - started)

    async def _fetch_url(
        self, session: aiohttp.ClientSession, url: str
    ) -> tuple[bytes, ValidImage, str, int]:
        attempts = 0
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.policy.retries + 1),
            wait=self._wait,
            retry=retry_if_exception_type(RetryableFailure),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                attempts += 1
                data, content_type, final_url = await self._get(session, url)
        image = await asyncio.to_thread(validate_image, data, content_type, self.filters)
        return data, image, final_url, attempts

    async def fetch_one(self, session: aiohttp.ClientSession, sample: PlannedSample) -> FetchResult:
        failures: list[FetchFailure] = []
        for url in sample.candidates:
            try:
                data, image, final_url, attempts = await self._fetch_url(session, url)
            except FetchFailure as exc:
                failures.append(exc)
                continue
            digest = image.sha256
            if digest in self._seen:
                return FetchResult(sample, "duplicate", final_url, sha256=digest, attempts=attempts)
            self._seen.add(digest)
            return FetchResult(
                sample, "ok", final_url, data, image.width, image.height, digest, attempts=attempts
            )
        # The first candidate's reason is the informative one (the original); all are in the detail.
        detail = "; ".join(str(f) for f in failures)
        return FetchResult(sample, failures[0].reason if failures else "no-candidate-url", detail=detail)

    async def fetch_all(
        self, samples: Iterable[PlannedSample], on_result: Callable[[FetchResult], Awaitable[None] | None]
    ) -> None:
        timeout = aiohttp.ClientTimeout(total=self.policy.timeout_seconds)
        connector = aiohttp.TCPConnector(limit=self.policy.concurrency, ttl_dns_cache=300)
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

        async with (
            aiohttp.ClientSession(
                timeout=timeout, connector=connector, headers=headers, auto_decompress=False
            ) as session,
            asyncio.TaskGroup() as group,
        ):
            for _ in range(min(self.policy.concurrency, queue.qsize())):
                group.create_task(worker(session))

"""The fetcher against a real HTTP server that misbehaves in every way the web does."""

from __future__ import annotations

import asyncio
import io
import struct
import time
import zlib
from collections import defaultdict

import pytest
from aiohttp import web
from PIL import Image

from commoncanvas.sample import synthetic_jpeg
from commoncanvas.sample.server import LocalHTTPServer
from commoncanvas.scrape.fetch import Fetcher, FetchResult
from commoncanvas.scrape.plan import PlannedSample
from commoncanvas.specs.scrape import FetchPolicy, Filters

pytestmark = pytest.mark.integration

GOOD = synthetic_jpeg(1, (400, 300))


def _bomb_png() -> bytes:
    """A small PNG whose header claims 50,000 x 50,000 pixels (2.5 Gpx once decoded)."""
    out = io.BytesIO()
    Image.new("1", (64, 64)).save(out, "PNG")
    data = bytearray(out.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", 50_000, 50_000)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    return bytes(data)


BOMB = _bomb_png()


class FaultRoutes:
    """Handlers whose behaviour depends on how often they were called, with call timestamps."""

    def __init__(self) -> None:
        self.calls: dict[str, list[float]] = defaultdict(list)

    def _seen(self, request: web.Request) -> int:
        self.calls[request.path].append(time.monotonic())
        return len(self.calls[request.path])

    async def image(self, request: web.Request) -> web.StreamResponse:
        self._seen(request)
        return web.Response(body=GOOD, content_type="image/jpeg")

    async def gone(self, request: web.Request) -> web.StreamResponse:
        self._seen(request)
        return web.Response(status=410)

    async def throttled_once(self, request: web.Request) -> web.StreamResponse:
        if self._seen(request) == 1:
            return web.Response(status=429, headers={"Retry-After": "1"})
        return web.Response(body=GOOD, content_type="image/jpeg")

    async def error_once(self, request: web.Request) -> web.StreamResponse:
        if self._seen(request) == 1:
            return web.Response(status=500)
        return web.Response(body=GOOD, content_type="image/jpeg")

    async def slow(self, request: web.Request) -> web.StreamResponse:
        self._seen(request)
        await asyncio.sleep(3)
        return web.Response(body=GOOD, content_type="image/jpeg")

    async def truncated(self, request: web.Request) -> web.StreamResponse:
        self._seen(request)
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        response.content_length = len(GOOD)
        await response.prepare(request)
        await response.write(GOOD[: len(GOOD) // 2])
        assert request.transport is not None
        request.transport.close()  # the peer hangs up mid-body
        return response

    async def html(self, request: web.Request) -> web.StreamResponse:
        self._seen(request)
        return web.Response(text="<html>a login page</html>", content_type="text/html")

    async def lying_jpeg(self, request: web.Request) -> web.StreamResponse:
        self._seen(request)
        return web.Response(body=b"PK\x03\x04 this is a zip file", content_type="image/jpeg")

    async def bomb(self, request: web.Request) -> web.StreamResponse:
        self._seen(request)
        return web.Response(body=BOMB, content_type="image/png")

    async def redirect(self, request: web.Request) -> web.StreamResponse:
        self._seen(request)
        raise web.HTTPFound("/image.jpg")

    async def huge(self, request: web.Request) -> web.StreamResponse:
        self._seen(request)
        return web.Response(body=GOOD + b"\0" * 200_000, content_type="image/jpeg")

    def routes(self) -> dict[str, object]:
        return {
            "/image.jpg": self.image,
            "/gone.jpg": self.gone,
            "/throttled.jpg": self.throttled_once,
            "/error.jpg": self.error_once,
            "/slow.jpg": self.slow,
            "/truncated.jpg": self.truncated,
            "/page.jpg": self.html,
            "/zip.jpg": self.lying_jpeg,
            "/bomb.png": self.bomb,
            "/redirect.jpg": self.redirect,
            "/huge.jpg": self.huge,
        }


@pytest.fixture
def faults() -> FaultRoutes:
    return FaultRoutes()


@pytest.fixture
def server(faults: FaultRoutes):  # type: ignore[no-untyped-def]
    with LocalHTTPServer(routes=faults.routes()) as running:  # type: ignore[arg-type]
        yield running


def sample(*urls: str, photo_id: int = 1) -> PlannedSample:
    return PlannedSample(
        photo_id,
        photo_id,
        "commercial",
        "cc-by",
        "Attribution License",
        "https://creativecommons.org/licenses/by/2.0/",
        "author",
        "1@N00",
        "title",
        (),
        "https://example.org/p/1",
        tuple(urls),
    )


def fetch(*samples: PlannedSample, **policy: object) -> list[FetchResult]:
    settings = {"retries": 2, "backoff_seconds": 0.05, "timeout_seconds": 1.0, **policy}
    fetcher = Fetcher(FetchPolicy(**settings), Filters(min_side=64))  # type: ignore[arg-type]
    results: list[FetchResult] = []
    asyncio.run(fetcher.fetch_all(samples, results.append))
    return results


def test_falls_back_to_the_next_candidate_on_404_and_410(server: LocalHTTPServer) -> None:
    (result,) = fetch(
        sample(
            f"{server.base_url}/missing.jpg", f"{server.base_url}/gone.jpg", f"{server.base_url}/image.jpg"
        )
    )
    assert result.outcome == "ok"
    assert result.url == f"{server.base_url}/image.jpg"
    assert result.data == GOOD and (result.width, result.height) == (400, 300)


def test_a_404_is_not_retried(server: LocalHTTPServer, faults: FaultRoutes) -> None:
    (result,) = fetch(sample(f"{server.base_url}/gone.jpg"))
    assert result.outcome == "http-410"
    assert len(faults.calls["/gone.jpg"]) == 1


def test_429_waits_for_retry_after_then_succeeds(server: LocalHTTPServer, faults: FaultRoutes) -> None:
    (result,) = fetch(sample(f"{server.base_url}/throttled.jpg"))
    assert result.outcome == "ok" and result.attempts == 2
    first, second = faults.calls["/throttled.jpg"]
    assert second - first >= 0.95, "the retry came before the server's Retry-After: 1"


def test_500_is_retried_then_succeeds(server: LocalHTTPServer, faults: FaultRoutes) -> None:
    (result,) = fetch(sample(f"{server.base_url}/error.jpg"))
    assert result.outcome == "ok" and result.attempts == 2


def test_a_response_slower_than_the_timeout_fails_after_the_retries(
    server: LocalHTTPServer, faults: FaultRoutes
) -> None:
    (result,) = fetch(sample(f"{server.base_url}/slow.jpg"), retries=1, timeout_seconds=0.3)
    assert result.outcome == "timeout"
    assert len(faults.calls["/slow.jpg"]) == 2


def test_a_truncated_body_is_retried_and_reported(server: LocalHTTPServer, faults: FaultRoutes) -> None:
    (result,) = fetch(sample(f"{server.base_url}/truncated.jpg"), retries=1)
    assert result.outcome == "truncated"
    assert len(faults.calls["/truncated.jpg"]) == 2
    assert result.data == b""


@pytest.mark.parametrize("path", ["/page.jpg", "/zip.jpg"])
def test_non_image_bytes_are_refused(server: LocalHTTPServer, path: str) -> None:
    (result,) = fetch(sample(server.base_url + path))
    assert result.outcome == "not-image"


def test_a_decompression_bomb_is_refused_before_decoding(server: LocalHTTPServer) -> None:
    (result,) = fetch(sample(f"{server.base_url}/bomb.png"))
    assert result.outcome == "decompression-bomb"


def test_redirects_are_followed_and_the_final_url_recorded(server: LocalHTTPServer) -> None:
    (result,) = fetch(sample(f"{server.base_url}/redirect.jpg"))
    assert result.outcome == "ok"
    assert result.url == f"{server.base_url}/image.jpg"


def test_bodies_over_the_size_limit_are_refused(server: LocalHTTPServer) -> None:
    (result,) = fetch(sample(f"{server.base_url}/huge.jpg"), max_bytes=len(GOOD) + 1024)
    assert result.outcome == "too-large"


def test_the_same_bytes_twice_in_a_unit_are_kept_once(server: LocalHTTPServer) -> None:
    results = fetch(
        sample(f"{server.base_url}/image.jpg", photo_id=1),
        sample(f"{server.base_url}/redirect.jpg", photo_id=2),
        concurrency=1,
    )
    assert sorted(r.outcome for r in results) == ["duplicate", "ok"]


def test_per_host_rate_limit_spaces_requests(server: LocalHTTPServer, faults: FaultRoutes) -> None:
    samples = [sample(f"{server.base_url}/gone.jpg", photo_id=i) for i in range(6)]
    fetch(*samples, per_host_rate=4, concurrency=6)
    stamps = sorted(faults.calls["/gone.jpg"])
    assert len(stamps) == 6
    # 4 requests/s: six requests cannot all land within the first second.
    assert stamps[-1] - stamps[0] >= 0.25

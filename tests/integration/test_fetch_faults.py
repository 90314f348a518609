"""The fetcher against a real HTTP server (on 127.0.0.1) that misbehaves in every way the web does:
faults, hostile hosts, SSRF redirects, opt-outs, placeholders and credentials in URLs."""

from __future__ import annotations

import asyncio
import io
import struct
import time
import zlib
from collections import defaultdict
from urllib.parse import quote

import pytest
from aiohttp import web
from PIL import Image, ImageDraw
from prometheus_client import REGISTRY, generate_latest

from commoncanvas.sample import synthetic_jpeg
from commoncanvas.sample.server import LocalHTTPServer, free_port
from commoncanvas.scrape.fetch import Fetcher, FetchResult, fingerprints
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


def _placeholder(fmt: str, size: tuple[int, int] = (500, 374)) -> bytes:
    """A stand-in for Flickr's "photo unavailable" image: light grey, a darker icon, lines of text."""
    image = Image.new("RGB", (500, 374), (226, 226, 226))
    draw = ImageDraw.Draw(image)
    draw.rectangle((200, 80, 300, 170), fill=(160, 160, 160))
    for top in (220, 250, 280):
        draw.rectangle((120, top, 380, top + 12), fill=(110, 110, 110))
    out = io.BytesIO()
    image.resize(size).save(out, fmt)
    return out.getvalue()


PLACEHOLDER = _placeholder("PNG")
PLACEHOLDER_REENCODED = _placeholder("JPEG", (1024, 766))  # another size, lossy: other bytes, same picture


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

    async def hop(self, request: web.Request) -> web.StreamResponse:
        """A redirect to wherever ?to= says."""
        self._seen(request)
        raise web.HTTPFound(request.query["to"])

    async def loop(self, request: web.Request) -> web.StreamResponse:
        self._seen(request)
        raise web.HTTPFound("/loop.jpg")

    async def placeholder(self, request: web.Request) -> web.StreamResponse:
        self._seen(request)
        return web.Response(body=PLACEHOLDER, content_type="image/png")

    async def placeholder_reencoded(self, request: web.Request) -> web.StreamResponse:
        self._seen(request)
        return web.Response(body=PLACEHOLDER_REENCODED, content_type="image/jpeg")

    async def robots(self, request: web.Request) -> web.StreamResponse:
        """The image, with the X-Robots-Tag header ?tag= says."""
        self._seen(request)
        return web.Response(
            body=GOOD, content_type="image/jpeg", headers={"X-Robots-Tag": request.query["tag"]}
        )

    async def down(self, request: web.Request) -> web.StreamResponse:
        self._seen(request)
        return web.Response(status=503)

    async def hostile(self, request: web.Request) -> web.StreamResponse:
        """Always 429, asking for an hour's wait: without a per-sample cap it holds a slot for good."""
        self._seen(request)
        return web.Response(status=429, headers={"Retry-After": "3600"})

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
            "/hop.jpg": self.hop,
            "/loop.jpg": self.loop,
            "/placeholder.png": self.placeholder,
            "/placeholder.jpg": self.placeholder_reencoded,
            "/robots.jpg": self.robots,
            "/down.jpg": self.down,
            "/hostile.jpg": self.hostile,
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


# The test server is on loopback: every test opts in to it explicitly, as the demo does.
LOOPBACK = {"allow_private_networks": True, "allowed_hosts": ["127.0.0.1"]}


def fetch(*samples: PlannedSample, **policy: object) -> list[FetchResult]:
    settings = {"retries": 2, "backoff_seconds": 0.05, "timeout_seconds": 1.0, **LOOPBACK, **policy}
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


def test_the_same_bytes_twice_are_both_fetched_for_the_catalog_wide_choice(server: LocalHTTPServer) -> None:
    results = fetch(
        sample(f"{server.base_url}/image.jpg", photo_id=1),
        sample(f"{server.base_url}/redirect.jpg", photo_id=2),
        concurrency=1,
    )
    assert [r.outcome for r in results] == ["ok", "ok"] and results[0].sha256 == results[1].sha256


def test_per_host_rate_limit_spaces_requests(server: LocalHTTPServer, faults: FaultRoutes) -> None:
    samples = [sample(f"{server.base_url}/gone.jpg", photo_id=i) for i in range(6)]
    fetch(*samples, per_host_rate=4, concurrency=6)
    stamps = sorted(faults.calls["/gone.jpg"])
    assert len(stamps) == 6
    # 4 requests/s: six requests cannot all land within the first second.
    assert stamps[-1] - stamps[0] >= 0.25


def test_a_fractional_per_host_rate_spaces_requests_instead_of_crashing(
    server: LocalHTTPServer, faults: FaultRoutes
) -> None:
    samples = [sample(f"{server.base_url}/gone.jpg", photo_id=i) for i in range(2)]
    results = fetch(*samples, per_host_rate=0.8, concurrency=2)
    assert [r.outcome for r in results] == ["http-410", "http-410"]
    first, second = sorted(faults.calls["/gone.jpg"])
    assert second - first >= 1.2, "0.8 requests/s: one request per 1.25 s"


def test_an_error_in_the_callback_surfaces_as_itself_not_as_an_exception_group(
    server: LocalHTTPServer,
) -> None:
    def on_result(result: FetchResult) -> None:
        raise OSError("disk full")

    fetcher = Fetcher(FetchPolicy(**LOOPBACK), Filters(min_side=64))  # type: ignore[arg-type]
    with pytest.raises(OSError, match="disk full"):
        asyncio.run(fetcher.fetch_all([sample(f"{server.base_url}/image.jpg")], on_result))


# Bounded waits: one sample never holds a slot longer than fetch.maxSecondsPerSample.


def test_a_hostile_retry_after_gives_up_at_once_when_it_exceeds_the_sample_budget(
    server: LocalHTTPServer, faults: FaultRoutes
) -> None:
    started = time.monotonic()
    (result,) = fetch(sample(f"{server.base_url}/hostile.jpg"), retries=10, max_seconds_per_sample=2)
    assert time.monotonic() - started < 1.5
    assert len(faults.calls["/hostile.jpg"]) == 1
    assert result.outcome == "http-429" and result.transient
    assert "fetch.maxSecondsPerSample" in result.detail


def test_retries_of_a_slow_host_stop_at_the_sample_budget(
    server: LocalHTTPServer, faults: FaultRoutes
) -> None:
    started = time.monotonic()
    (result,) = fetch(
        sample(f"{server.base_url}/slow.jpg"), retries=10, timeout_seconds=1.0, max_seconds_per_sample=1.5
    )
    assert time.monotonic() - started < 2.5
    assert result.outcome == "timeout" and result.transient
    assert len(faults.calls["/slow.jpg"]) == 2  # a 1 s attempt, then what was left of the 1.5 s


def test_backoff_growth_is_capped(server: LocalHTTPServer, faults: FaultRoutes) -> None:
    started = time.monotonic()
    (result,) = fetch(
        sample(f"{server.base_url}/down.jpg"), retries=3, backoff_seconds=60, max_backoff_seconds=0.1
    )
    assert time.monotonic() - started < 2
    assert result.outcome == "http-503" and len(faults.calls["/down.jpg"]) == 4


# Transient failures (a rerun may fetch the sample) against permanent exclusions.


@pytest.mark.parametrize(
    ("path", "outcome", "transient"),
    [
        ("/slow.jpg", "timeout", True),
        ("/truncated.jpg", "truncated", True),
        ("/down.jpg", "http-503", True),
        ("/hostile.jpg", "http-429", True),
        ("/gone.jpg", "http-410", False),
        ("/page.jpg", "not-image", False),
        ("/bomb.png", "decompression-bomb", False),
    ],
)
def test_every_failure_says_whether_it_is_transient(
    server: LocalHTTPServer, path: str, outcome: str, transient: bool
) -> None:
    (result,) = fetch(sample(server.base_url + path), retries=0, timeout_seconds=0.3)
    assert (result.outcome, result.transient) == (outcome, transient)


def test_a_refused_connection_is_transient() -> None:
    (result,) = fetch(sample(f"http://127.0.0.1:{free_port()}/image.jpg"), retries=0)
    assert (result.outcome, result.transient) == ("connection-error", True)


def test_a_transient_failure_of_any_candidate_makes_the_sample_transient(server: LocalHTTPServer) -> None:
    (result,) = fetch(sample(f"{server.base_url}/gone.jpg", f"{server.base_url}/down.jpg"), retries=0)
    assert (result.outcome, result.transient) == ("http-503", True)
    assert "http-410" in result.detail  # the permanent answer is kept in the detail


# SSRF: allowedHosts, allowPrivateNetworks, on the resolved address and on every redirect hop.


def test_a_private_address_is_refused_by_default_and_nothing_is_sent(server: LocalHTTPServer) -> None:
    (result,) = fetch(sample(f"{server.base_url}/image.jpg"), allow_private_networks=False)
    assert (result.outcome, result.transient) == ("blocked", False)
    assert "127.0.0.1 is a loopback address (fetch.allowPrivateNetworks is false)" in result.detail
    assert server.requests == []


def test_a_name_is_refused_by_the_address_it_resolves_to(server: LocalHTTPServer) -> None:
    (result,) = fetch(
        sample(f"http://localhost:{server.port}/image.jpg"),
        allowed_hosts=["localhost"],
        allow_private_networks=False,
    )
    assert result.outcome == "blocked"
    assert "localhost resolves to" in result.detail and "loopback" in result.detail
    assert server.requests == []


def test_hosts_outside_allowed_hosts_are_refused(server: LocalHTTPServer) -> None:
    (result,) = fetch(sample(f"{server.base_url}/image.jpg"), allowed_hosts=["*.staticflickr.com"])
    assert result.outcome == "blocked"
    assert "host '127.0.0.1' is not in fetch.allowedHosts" in result.detail
    assert server.requests == []


@pytest.mark.parametrize(
    ("target", "policy", "refusal"),
    [
        ("http://localhost:{port}/image.jpg", {}, "host 'localhost' is not in fetch.allowedHosts"),
        ("http://169.254.169.254/latest/meta-data/", {"allowed_hosts": ["*"]}, "cloud metadata address"),
        ("http://[fd00:ec2::254]/latest/meta-data/", {"allowed_hosts": ["*"]}, "cloud metadata address"),
        ("file:///etc/passwd", {"allowed_hosts": ["*"]}, "scheme 'file' is not http or https"),
        ("ftp://127.0.0.1/image.jpg", {}, "scheme 'ftp' is not http or https"),
    ],
)
def test_every_redirect_hop_passes_the_same_policy(
    server: LocalHTTPServer, faults: FaultRoutes, target: str, policy: dict[str, object], refusal: str
) -> None:
    to = target.format(port=server.port)
    (result,) = fetch(sample(f"{server.base_url}/hop.jpg?to={quote(to, safe='')}"), **policy)
    assert (result.outcome, result.transient) == ("blocked", False)
    assert refusal in result.detail
    assert server.requests == ["/hop.jpg"], "the refused hop must not be requested"


def test_redirects_are_bounded(server: LocalHTTPServer, faults: FaultRoutes) -> None:
    (result,) = fetch(sample(f"{server.base_url}/loop.jpg"), max_redirects=3)
    assert result.outcome == "too-many-redirects"
    assert len(faults.calls["/loop.jpg"]) == 4


# Flickr's "photo unavailable" placeholder: by the redirect target, and by content.


@pytest.mark.parametrize(
    "target",
    ["https://s.yimg.com/pw/images/en-us/photo_unavailable.png", "/images/photo_unavailable_m.gif"],
)
def test_a_redirect_to_the_photo_unavailable_image_is_unavailable(
    server: LocalHTTPServer, target: str
) -> None:
    removed = [sample(f"{server.base_url}/hop.jpg?to={quote(target, safe='')}", photo_id=i) for i in (1, 2)]
    results = fetch(*removed)
    assert [(r.outcome, r.transient) for r in results] == [("unavailable", False)] * 2
    assert "photo_unavailable" in results[0].detail
    assert server.requests == ["/hop.jpg", "/hop.jpg"], "the placeholder itself is never fetched"


def test_a_placeholder_served_in_place_is_recognised_by_its_bytes(server: LocalHTTPServer) -> None:
    sha256, _ = fingerprints(PLACEHOLDER)
    (result,) = fetch(sample(f"{server.base_url}/placeholder.png"), placeholder_fingerprints=[sha256])
    assert result.outcome == "unavailable"
    assert "is a known placeholder" in result.detail


def test_a_re_encoded_placeholder_is_recognised_perceptually_and_photos_are_not(
    server: LocalHTTPServer,
) -> None:
    _, dhash = fingerprints(PLACEHOLDER)
    placeholder, photo = fetch(
        sample(f"{server.base_url}/placeholder.jpg", photo_id=1),
        sample(f"{server.base_url}/image.jpg", photo_id=2),
        placeholder_fingerprints=[dhash],
        concurrency=1,
    )
    assert placeholder.outcome == "unavailable" and "dhash" in placeholder.detail
    assert photo.outcome == "ok"


# Opt-out: X-Robots-Tag, as img2dataset honours it.


@pytest.mark.parametrize(
    "tag", ["noai", "noimageai", "noindex", "noimageindex", "nofollow, NoAI", "commoncanvas: noimageai"]
)
def test_an_x_robots_tag_opt_out_is_honoured(server: LocalHTTPServer, tag: str) -> None:
    (result,) = fetch(sample(f"{server.base_url}/robots.jpg?tag={quote(tag)}"))
    assert (result.outcome, result.transient) == ("opt-out", False)
    assert tag in result.detail


@pytest.mark.parametrize("tag", ["nofollow", "otherbot: noai", "unavailable_after: 25 Jun 2030 15:00:00 PST"])
def test_x_robots_tags_that_do_not_opt_us_out_are_ignored(server: LocalHTTPServer, tag: str) -> None:
    (result,) = fetch(sample(f"{server.base_url}/robots.jpg?tag={quote(tag)}"))
    assert result.outcome == "ok"


def test_honor_robots_tags_false_turns_the_opt_out_off(server: LocalHTTPServer) -> None:
    (result,) = fetch(sample(f"{server.base_url}/robots.jpg?tag=noai"), honor_robots_tags=False)
    assert result.outcome == "ok"


# Secrets: credentials in a URL never reach a result, a detail or /metrics.


def test_credentials_in_urls_never_reach_results_details_or_metrics(server: LocalHTTPServer) -> None:
    def planted(path: str, port: int = server.port) -> str:
        return f"http://mirror-user:hunter2@127.0.0.1:{port}{path}?token=s3cr3t-token&size=b"

    results = fetch(
        sample(planted("/image.jpg"), photo_id=1),
        sample(planted("/redirect.jpg"), photo_id=2),  # a relative redirect keeps the credentials
        sample(planted("/gone.jpg"), photo_id=3),
        sample(planted("/image.jpg", port=free_port()), photo_id=4),
        sample(planted("/slow.jpg"), photo_id=5),
        retries=0,
        timeout_seconds=0.3,
        concurrency=1,
    )
    outcomes = [r.outcome for r in results]
    assert outcomes == ["ok", "ok", "http-410", "connection-error", "timeout"]
    metrics_text = generate_latest(REGISTRY).decode()
    for text in [metrics_text, *(f"{r.url} {r.detail}" for r in results)]:
        assert "hunter2" not in text and "mirror-user" not in text and "s3cr3t-token" not in text
    assert 'commoncanvas_fetch_seconds_count{host="127.0.0.1"}' in metrics_text
    assert results[0].url == f"http://***@127.0.0.1:{server.port}/image.jpg?token=***&size=b"

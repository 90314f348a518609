"""What the fetcher accepts as an image: content type, magic bytes, size guards before decoding, a full
decode; plus format sniffing and Retry-After parsing."""

from __future__ import annotations

import hashlib
import io
import struct
import time
import zlib
from email.utils import formatdate

import pytest
from PIL import Image

from commoncanvas.scrape.fetch import (
    RETRY_AFTER_CAP_SECONDS,
    FetchFailure,
    ValidImage,
    parse_retry_after,
    sniff_format,
    validate_image,
)
from commoncanvas.specs.scrape import Filters

ANY_SIZE = Filters(min_side=1)


def encode(fmt: str, size: tuple[int, int] = (320, 240), mode: str = "RGB") -> bytes:
    image = Image.new(mode, size, (200, 120, 40) if mode == "RGB" else 128)
    # Some texture, so a truncated file really lacks data rather than ending in a flat run.
    for x in range(0, size[0], 7):
        for y in range(0, size[1], 5):
            image.putpixel((x, y), (x % 256, y % 256, (x * y) % 256) if mode == "RGB" else (x + y) % 256)
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that states its size but carries no pixel data: what a decompression bomb's header looks
    like before anything is decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def failure(data: bytes, content_type: str = "image/jpeg", filters: Filters = ANY_SIZE) -> FetchFailure:
    with pytest.raises(FetchFailure) as caught:
        validate_image(data, content_type, filters)
    return caught.value


# --- accepted ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "mime"),
    [
        ("JPEG", "image/jpeg"),
        ("PNG", "image/png"),
        ("GIF", "image/gif"),
        ("BMP", "image/bmp"),
        ("TIFF", "image/tiff"),
        ("WEBP", "image/webp"),
    ],
)
@pytest.mark.parametrize("check", ["header", "decode"])
def test_valid_image_is_accepted_with_its_size_format_and_hash(fmt: str, mime: str, check: str) -> None:
    data = encode(fmt, (320, 240))
    found = validate_image(data, mime, Filters(min_side=1, check=check))  # type: ignore[arg-type]
    assert found == ValidImage(320, 240, fmt, hashlib.sha256(data).hexdigest())


@pytest.mark.parametrize(
    "content_type",
    ["image/jpeg; charset=binary", "IMAGE/JPEG", "application/octet-stream", "binary/octet-stream", ""],
)
def test_image_content_type_with_parameters_or_a_generic_or_missing_type_is_accepted(
    content_type: str,
) -> None:
    assert validate_image(encode("JPEG"), content_type, ANY_SIZE).format == "JPEG"


def test_format_comes_from_the_bytes_not_the_declared_type() -> None:
    assert validate_image(encode("PNG"), "image/jpeg", ANY_SIZE).format == "PNG"


# --- refused before decoding ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type", ["text/html", "text/html; charset=utf-8", "application/json", "video/mp4"]
)
def test_non_image_content_type_is_not_an_image_even_with_image_bytes(content_type: str) -> None:
    assert failure(encode("JPEG"), content_type).reason == "not-image"


@pytest.mark.parametrize(
    "data",
    [b"<!DOCTYPE html><html>photo unavailable</html>", b"", b"\x00" * 64, b"RIFF\x00\x00\x00\x00WAVEfmt "],
)
def test_bytes_that_are_no_known_image_format_are_not_an_image(data: bytes) -> None:
    assert failure(data, "image/jpeg").reason == "not-image"


def test_image_with_a_side_below_the_minimum_is_too_small() -> None:
    found = failure(encode("JPEG", (300, 200)), filters=Filters(min_side=256))
    assert found.reason == "too-small"
    assert "300x200" in found.detail


def test_image_whose_shorter_side_equals_the_minimum_is_kept() -> None:
    assert validate_image(encode("JPEG", (400, 256)), "image/jpeg", Filters(min_side=256)).height == 256


def test_image_with_more_pixels_than_allowed_is_refused_as_a_decompression_bomb() -> None:
    found = failure(encode("PNG", (300, 300)), "image/png", Filters(min_side=1, max_pixels=89_999))
    assert found.reason == "decompression-bomb"


def test_image_with_exactly_the_allowed_pixels_is_kept() -> None:
    assert validate_image(encode("PNG", (300, 300)), "image/png", Filters(min_side=1, max_pixels=90_000))


def test_huge_size_in_the_header_is_refused_before_any_pixel_is_decoded() -> None:
    started = time.perf_counter()
    found = failure(png_header_only(100_000, 100_000), "image/png", Filters(min_side=1, max_pixels=10**8))
    assert found.reason == "decompression-bomb"
    assert time.perf_counter() - started < 2


@pytest.mark.parametrize(
    ("side", "filters"),
    [
        (10_000, Filters(min_side=1)),  # 100 Mpx under the default limit of 178,956,970 px
        (10_000, Filters(min_side=1, max_pixels=200_000_000)),
        (15_000, Filters(min_side=1, max_pixels=500_000_000)),  # 225 Mpx: above Pillow's hard limit
    ],
    ids=["default-limit", "200Mpx-limit", "500Mpx-limit"],
)
def test_the_configured_pixel_limit_is_the_one_applied_not_pillows_own(side: int, filters: Filters) -> None:
    # The stated size is within the configured limit, so it must pass the size guard; what fails is the
    # missing pixel data ("corrupt"), not a decompression-bomb refusal by Pillow's built-in limit.
    found = failure(png_header_only(side, side), "image/png", filters)
    assert found.reason == "corrupt", found


# --- refused by the decode --------------------------------------------------------------------------


BOTH_CHECKS = pytest.mark.parametrize(
    "checks",
    [Filters(min_side=1, check="header"), Filters(min_side=1, check="decode")],
    ids=["header", "decode"],
)


@BOTH_CHECKS
@pytest.mark.parametrize("keep", [0.5, 0.9, 0.98, 0.999])
def test_truncated_jpeg_is_corrupt(keep: float, checks: Filters) -> None:
    data = encode("JPEG", (640, 480))
    assert failure(data[: int(len(data) * keep)], filters=checks).reason == "corrupt"


@BOTH_CHECKS
def test_truncated_png_is_corrupt(checks: Filters) -> None:
    data = encode("PNG", (640, 480))
    assert failure(data[: len(data) // 2], "image/png", checks).reason == "corrupt"


@BOTH_CHECKS
def test_garbage_after_valid_magic_bytes_is_corrupt(checks: Filters) -> None:
    assert failure(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, filters=checks).reason == "corrupt"


@BOTH_CHECKS
def test_png_stating_a_size_but_holding_no_pixels_is_corrupt(checks: Filters) -> None:
    assert failure(png_header_only(300, 300), "image/png", checks).reason == "corrupt"


def test_jpeg_with_an_exif_thumbnail_but_a_truncated_main_image_is_corrupt_in_header_mode() -> None:
    from PIL import Image

    thumb = encode("JPEG", (64, 48))
    exif = Image.Exif()
    main = io.BytesIO()
    Image.open(io.BytesIO(encode("JPEG", (640, 480)))).save(main, "JPEG", exif=exif.tobytes())
    data = main.getvalue()
    # Splice a complete thumbnail (its own start-of-scan and end marker) in front of the main scan.
    scan = data.rfind(b"\xff\xda")
    spliced = data[:2] + b"\xff\xfe" + (len(thumb) + 2).to_bytes(2, "big") + thumb + data[2 : scan + 200]
    assert failure(spliced, filters=Filters(min_side=1, check="header")).reason == "corrupt"


# --- sniffing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [("JPEG", "JPEG"), ("PNG", "PNG"), ("GIF", "GIF"), ("BMP", "BMP"), ("TIFF", "TIFF"), ("WEBP", "WEBP")],
)
def test_format_is_sniffed_from_the_leading_bytes(fmt: str, expected: str) -> None:
    assert sniff_format(encode(fmt, (16, 16))) == expected


@pytest.mark.parametrize("data", [b"", b"RIFF\x10\x00\x00\x00WAVE", b"%PDF-1.4", b"<html>"])
def test_unknown_leading_bytes_sniff_as_nothing(data: bytes) -> None:
    assert sniff_format(data) is None


# --- Retry-After ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), ("", None), ("0", 0.0), ("7", 7.0), (" 12 ", 12.0), ("soon", None), ("-5", None)],
)
def test_retry_after_in_seconds_or_unusable(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value) == expected


def test_retry_after_is_capped() -> None:
    assert parse_retry_after("86400") == RETRY_AFTER_CAP_SECONDS


def test_retry_after_as_an_http_date_gives_the_seconds_until_then() -> None:
    delay = parse_retry_after(formatdate(time.time() + 30, usegmt=True))
    assert delay is not None and 25 <= delay <= 31


def test_retry_after_date_in_the_past_means_no_wait() -> None:
    assert parse_retry_after(formatdate(time.time() - 3600, usegmt=True)) == 0.0


def test_retry_after_date_far_ahead_is_capped() -> None:
    assert parse_retry_after(formatdate(time.time() + 86400, usegmt=True)) == RETRY_AFTER_CAP_SECONDS

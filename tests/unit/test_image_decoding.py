"""Decoding stays bounded (commoncanvas.images): Pillow's pixel guard is on in every process that
decodes, set from `filters.maxPixels`; the caption and latents decodes are reduced (JPEG draft, box
reduce) but never below twice their target side, and decode small images exactly as before."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from commoncanvas import images
from commoncanvas.caption.worker import caption_pixels, center_square
from commoncanvas.images import REDUCING_GAP, ImageTooLarge, decode_reduced, set_pixel_limit
from commoncanvas.scrape.fetch import Fetcher, FetchFailure, validate_image
from commoncanvas.specs.scrape import FetchPolicy, Filters
from commoncanvas.train.latents import load_pixels
from commoncanvas.unitloop import ShardImages

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MAX_PIXELS = Filters().max_pixels
# Just over the default limit, under Pillow's hard stop at twice it.
OVER_THE_DEFAULT = int(DEFAULT_MAX_PIXELS**0.5) + 1
quiet_bomb_warning = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


@pytest.fixture(autouse=True)
def _restore_pillow_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests that move the process's guard put it back."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)


def textured(size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    """Gradients and coarse stripes: a misplaced crop or a flipped image changes the pixels."""
    width, height = size
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    stripes = (np.arange(width)[None, :] * 9 // width + np.arange(height)[:, None] * 7 // height) % 2 * 60.0
    rgb = np.stack([x + 0 * y, y + 0 * x, (x + y) / 2 + stripes], axis=-1).clip(0, 255).astype(np.uint8)
    return Image.fromarray(rgb, "RGB").convert(mode)


def encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


def rotated_jpeg(size: tuple[int, int]) -> bytes:
    """A JPEG stored sideways, with EXIF Orientation 6 (show it turned 90 degrees clockwise)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(textured(size), "JPEG", exif=exif.tobytes())


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that states its size but has no pixel data: a decode would fail, a refusal does not."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


# The decodes as they were before commoncanvas.images: a full decode, then the same crop and resize.


def old_caption_image(data: bytes, size: int) -> Image.Image:
    """A full decode, upright like training's (the captioner describes the image trained on)."""
    with Image.open(io.BytesIO(data)) as opened:
        square: Image.Image = center_square(ImageOps.exif_transpose(opened).convert("RGB"), size)
    return square


def old_load_pixels(data: bytes, resolution: int) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as opened:
        image = ImageOps.exif_transpose(opened).convert("RGB")
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def array_processor(images: Image.Image, return_tensors: str) -> dict[str, list[torch.Tensor]]:
    """Stands in for BLIP-2's image processor: the pixels as they are."""
    return {"pixel_values": [torch.from_numpy(np.asarray(images).copy())]}


def old_caption_pixels(data: bytes, size: int) -> torch.Tensor:
    return array_processor(old_caption_image(data, size), "pt")["pixel_values"][0]


# (encoded image, target side): every shorter side here is below 2 x REDUCING_GAP x the target.
SMALL = {
    "jpeg": (encode(textured((300, 200)), "JPEG", quality=90), 64),
    "jpeg-just-below-reducing": (encode(textured((400, 255)), "JPEG"), 64),
    "jpeg-grey": (encode(textured((200, 180), "L"), "JPEG"), 64),
    "jpeg-cmyk": (encode(textured((180, 200), "CMYK"), "JPEG"), 64),
    "jpeg-progressive": (encode(textured((260, 200)), "JPEG", progressive=True), 64),
    "jpeg-exif-rotated": (rotated_jpeg((240, 160)), 64),
    "jpeg-twice-the-caption-side": (encode(textured((1400, 1024)), "JPEG"), 512),
    "png": (encode(textured((255, 250)), "PNG"), 64),
    "png-palette": (encode(textured((220, 200), "P"), "PNG"), 64),
    "png-rgba": (encode(textured((200, 240), "RGBA"), "PNG"), 64),
    "webp": (encode(textured((230, 210)), "WEBP"), 64),
}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_small_images_decode_exactly_as_a_full_decode(name: str) -> None:
    data, target = SMALL[name]
    assert torch.equal(load_pixels(data, target), old_load_pixels(data, target))
    assert torch.equal(caption_pixels(data, array_processor, target), old_caption_pixels(data, target))
    with Image.open(io.BytesIO(data)) as full:
        assert decode_reduced(data, target, exif_transpose=False).tobytes() == full.convert("RGB").tobytes()


def test_exif_orientation_is_applied_unless_asked_not_to() -> None:
    data = rotated_jpeg((600, 400))  # decoded at 1/2: 200 >= 2 x REDUCING_GAP x 64
    assert decode_reduced(data, 64).size == (200, 300)  # upright after the reduced decode
    assert decode_reduced(data, 64, exif_transpose=False).size == (300, 200)
    upright = np.asarray(decode_reduced(data, 64), dtype=np.float32)
    with Image.open(io.BytesIO(data)) as full:
        expected = ImageOps.exif_transpose(full).convert("RGB").reduce(2)
    assert np.abs(upright - np.asarray(expected, dtype=np.float32)).mean() < 3


@pytest.mark.parametrize(
    ("size", "fmt", "target", "expected"),
    [
        ((512, 256), "JPEG", 64, (256, 128)),  # shorter side exactly 2 x REDUCING_GAP x 64: 1/2
        ((1000, 255), "JPEG", 64, (1000, 255)),  # one pixel short of that: not reduced
        ((2000, 1500), "JPEG", 64, (250, 188)),  # 1/8, the sides rounded up
        ((1500, 2000), "JPEG", 100, (375, 500)),  # 1/4: 1/8 would leave 188 < 200
        ((2400, 1600), "JPEG", 16, (50, 34)),  # 1/8 in libjpeg (300 x 200), then reduce(6)
        ((1000, 700), "PNG", 64, (200, 140)),  # no draft for PNG: reduce(5) after the load
        ((1000, 700), "WEBP", 100, (334, 234)),  # reduce(3), the sides rounded up
    ],
    ids=["jpeg-half", "jpeg-not-reduced", "jpeg-eighth", "jpeg-quarter", "jpeg-then-reduce", "png", "webp"],
)
def test_large_images_decode_reduced_but_never_below_the_target_side(
    size: tuple[int, int], fmt: str, target: int, expected: tuple[int, int]
) -> None:
    image = decode_reduced(encode(textured(size), fmt), target, exif_transpose=False)
    assert image.size == expected
    assert min(image.size) >= REDUCING_GAP * target
    assert image.mode == "RGB"


def test_large_jpeg_decodes_reduced_but_never_below_the_target_side() -> None:
    """The caption side (512 px) on an 8,000 x 6,000 JPEG: libjpeg decodes at 1/4 scale (1/16 of the
    pixels, 9 MB instead of 144 MB), the shorter side still >= 2 x 512."""
    data = encode(Image.new("RGB", (8000, 6000), (200, 120, 40)), "JPEG")
    reduced = decode_reduced(data, 512)
    assert reduced.size == (2000, 1500)
    assert len(reduced.tobytes()) * 16 == 8000 * 6000 * 3
    assert caption_pixels(data, array_processor, 512).shape == (512, 512, 3)
    assert load_pixels(data, 512).shape == (3, 512, 512)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("size", [(2100, 1500), (1500, 2100)], ids=["landscape", "portrait"])
def test_reduced_decode_keeps_the_crop_and_orientation_of_a_full_decode(
    size: tuple[int, int], fmt: str
) -> None:
    """The same center crop, the same way up: the reduced decode differs from the full one only by
    its resampling, a few levels out of 255."""
    data = encode(textured(size), fmt)
    assert max(decode_reduced(data, 64).size) < max(size)  # it was reduced
    assert (load_pixels(data, 64) - old_load_pixels(data, 64)).abs().mean().item() < 3 / 127.5
    caption = caption_pixels(data, array_processor, 64).float()
    assert (caption - old_caption_pixels(data, 64).float()).abs().mean().item() < 3


# --- the pixel guard ---------------------------------------------------------------------------------


@quiet_bomb_warning
def test_image_above_max_pixels_is_refused_not_decoded() -> None:
    set_pixel_limit(89_999)
    png = encode(textured((300, 300)), "PNG")  # 90,000 px: one over the limit
    with pytest.raises(ImageTooLarge, match="300x300 exceeds the 89999-pixel limit"):
        decode_reduced(png, 64)
    # No pixel data at all: refused from the header (a decode would fail differently).
    with pytest.raises(ImageTooLarge):
        decode_reduced(png_header_only(300, 300), 64)
    with pytest.raises(Image.DecompressionBombError):  # above twice the limit: Image.open refuses
        decode_reduced(png_header_only(1000, 1000), 64)
    set_pixel_limit(90_000)
    assert decode_reduced(png, 100).size == (300, 300)


@quiet_bomb_warning
def test_caption_and_latents_record_an_image_above_the_limit_as_unusable() -> None:
    set_pixel_limit(DEFAULT_MAX_PIXELS)
    rows = [{"image": png_header_only(OVER_THE_DEFAULT, OVER_THE_DEFAULT), "id": 1}]
    for to_pixels in (
        lambda data: load_pixels(data, 64),
        lambda data: caption_pixels(data, array_processor, 64),
    ):
        item = ShardImages(rows, to_pixels)[0]
        assert item["pixels"] is None
        assert item["error"].startswith("corrupt-image: ImageTooLarge:")
        assert f"{DEFAULT_MAX_PIXELS}-pixel limit" in item["error"]


def test_the_decode_refuses_above_the_default_even_with_pillows_guard_switched_off() -> None:
    Image.MAX_IMAGE_PIXELS = None
    assert images.pixel_limit() == DEFAULT_MAX_PIXELS
    with pytest.raises(ImageTooLarge):
        decode_reduced(png_header_only(OVER_THE_DEFAULT, OVER_THE_DEFAULT), 64)


def test_the_fetcher_sets_pillows_guard_from_its_filters() -> None:
    allowed = Filters(min_side=1, max_pixels=500_000_000)
    Fetcher(FetchPolicy(), allowed)
    assert Image.MAX_IMAGE_PIXELS == images.pixel_limit() == 500_000_000
    # 400 Mpx: over twice the default, inside this job's limit: only its missing pixel data fails it.
    with pytest.raises(FetchFailure) as caught:
        validate_image(png_header_only(20_000, 20_000), "image/png", allowed)
    assert caught.value.reason == "corrupt"
    small = Filters(min_side=1, max_pixels=10_000)
    Fetcher(FetchPolicy(), small)
    assert Image.MAX_IMAGE_PIXELS == 10_000
    # Over twice the guard Image.open itself refuses: still the decompression-bomb outcome.
    with pytest.raises(FetchFailure) as caught:
        validate_image(png_header_only(300, 300), "image/png", small)
    assert caught.value.reason == "decompression-bomb"


# A fresh interpreter: Pillow's guard after importing `modules`, and after a decode in each decoder.
_PROBE = r"""
import importlib, io, json, sys
from PIL import Image
found = {"pillow": Image.MAX_IMAGE_PIXELS}
for module in sys.argv[1:]:
    importlib.import_module(module)
found["imported"] = Image.MAX_IMAGE_PIXELS
png = io.BytesIO()
Image.new("RGB", (8, 8)).save(png, "PNG")
if "commoncanvas.train.latents" in sys.argv:
    from commoncanvas.train.latents import load_pixels
    load_pixels(png.getvalue(), 4)
if "commoncanvas.caption.worker" in sys.argv:
    from commoncanvas.caption.worker import caption_pixels
    caption_pixels(png.getvalue(), lambda images, return_tensors: {"pixel_values": [images]}, 4)
found["decoded"] = Image.MAX_IMAGE_PIXELS
print(json.dumps(found))
"""


def guard_in_a_fresh_process(*modules: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, *modules],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={"PYTHONPATH": f"{ROOT / 'services'}:{ROOT / 'operator'}", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found: dict[str, Any] = json.loads(result.stdout.splitlines()[-1])
    return found


def test_pillow_pixel_guard_is_on_after_importing_the_fetcher() -> None:
    found = guard_in_a_fresh_process("commoncanvas.scrape.fetch")
    assert found["pillow"] != DEFAULT_MAX_PIXELS  # Pillow's own default, until the import
    assert found["imported"] == DEFAULT_MAX_PIXELS


def test_pillow_pixel_guard_is_on_where_caption_and_latents_decode() -> None:
    """As in a spawned DataLoader worker: the decode functions' process has the guard on by the time
    they decode."""
    found = guard_in_a_fresh_process("commoncanvas.caption.worker", "commoncanvas.train.latents")
    assert found["decoded"] == DEFAULT_MAX_PIXELS

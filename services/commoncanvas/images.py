"""Image decoding policy for every process that decodes: the scrape worker, the caption worker, the
latents phase and training's on-the-fly path (their DataLoader workers included, since they import the
decode function's module, and with it this one).

- Pillow's own pixel guard stays on. Importing this module sets `Image.MAX_IMAGE_PIXELS` to the
  ScrapeJob's default `filters.maxPixels`; the fetcher sets it from its job's filters
  (`set_pixel_limit`). `decode_reduced` refuses anything above the limit with `ImageTooLarge`.
- `decode_reduced` decodes no more pixels than a target size needs: a JPEG is decoded by libjpeg at
  1/2, 1/4 or 1/8 scale (`Image.draft`), other formats are box-reduced (`Image.reduce`) after the
  load, always keeping the shorter side at least `REDUCING_GAP` times the target (as Pillow's own
  `thumbnail` does), so the final resample still has real detail to work from.
"""

from __future__ import annotations

import io

from PIL import Image, ImageOps

from commoncanvas.specs.scrape import Filters

# One source of truth: the ScrapeJob's default `filters.maxPixels`, for processes whose spec has none.
DEFAULT_MAX_PIXELS: int = Filters().max_pixels
# A reduced decode keeps its shorter side >= REDUCING_GAP x the target's: images whose shorter side is
# under 2 x REDUCING_GAP x the target (2,048 px for a 512 px target) decode exactly as a full decode.
REDUCING_GAP = 2


class ImageTooLarge(Image.DecompressionBombError):
    """More pixels than the process's limit (`filters.maxPixels`): refused before any pixel is decoded."""


def set_pixel_limit(max_pixels: int) -> None:
    """Pillow's guard for this process, from the policy's `filters.maxPixels`."""
    # Pillow warns above MAX_IMAGE_PIXELS and refuses above twice it: the limit itself, so Pillow never
    # refuses (nor warns about) an image the policy allows; callers refuse (limit, 2 x limit] themselves.
    Image.MAX_IMAGE_PIXELS = max_pixels


def pixel_limit() -> int:
    """The process's pixel limit (the default where someone switched Pillow's guard off)."""
    return Image.MAX_IMAGE_PIXELS or DEFAULT_MAX_PIXELS


def check_pixels(size: tuple[int, int]) -> None:
    width, height = size
    if width * height > pixel_limit():
        raise ImageTooLarge(f"{width}x{height} exceeds the {pixel_limit()}-pixel limit (filters.maxPixels)")


def decode_reduced(data: bytes, min_side: int, *, exif_transpose: bool = True) -> Image.Image:
    """Encoded image -> RGB, reduced as far as a `min_side` px target allows: the shorter side stays at
    least REDUCING_GAP x `min_side` (or is the original's, where that is smaller), never below it.

    `exif_transpose` turns the image upright by its EXIF Orientation, after the reduced decode. Raises
    `ImageTooLarge` above the pixel limit, and Pillow's errors for a broken file."""
    if min_side < 1:
        raise ValueError(f"min_side must be >= 1, not {min_side}")
    target = REDUCING_GAP * min_side
    with Image.open(io.BytesIO(data)) as opened:
        check_pixels(opened.size)
        # Before the load: JPEG (and MPO) only, a no-op for other formats. libjpeg picks the largest of
        # 1/8, 1/4, 1/2 that keeps both sides >= target; the shorter side is the binding one.
        opened.draft("RGB", (target, target))
        image = ImageOps.exif_transpose(opened) if exif_transpose else opened
        image = image.convert("RGB")  # loads; always a new image, valid after the file is closed
    factor = min(image.size) // target
    if factor >= 2:  # what the draft could not do (not a JPEG, or larger than 8 x the target)
        image = image.reduce(factor)  # sides round up: the shorter stays >= target
    return image


set_pixel_limit(DEFAULT_MAX_PIXELS)

"""The bundled CC sample for `make demo` and the tests.

Real photographs come from files that PyPI packages already ship (scikit-image, matplotlib), each
with its true license and author as those packages document them.  Synthetic rows -- labelled
`SYNTHETIC` in their title and author -- exercise what real data must never let through or break:
non-commercial and NoDerivs licenses, All Rights Reserved, unknown licenses, dead URLs, a fallback to
the `_b` size, corrupt bytes, a too-small image, videos and malformed rows.
"""

from __future__ import annotations

import bz2
import io
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote_plus

import numpy as np
from PIL import Image

from commoncanvas.licenses import BY_CODE
from commoncanvas.metadata import FIELDS_2014

SYNTHETIC_AUTHOR = "SYNTHETIC commoncanvas sample"
ORIGINAL_PATH = "/farm{farm}/{server}/{id}_{secret_original}_o.{ext}"
SIZED_PATH = "/farm{farm}/{server}/{id}_{secret}_b.jpg"


@dataclass(frozen=True)
class RealPhoto:
    package: str
    resource: str
    title: str
    author: str
    license_code: str
    source_url: str


REAL_PHOTOS = (
    RealPhoto(
        "skimage",
        "data/astronaut.png",
        "Astronaut Eileen Collins",
        "NASA",
        "us-government-work",
        "https://flic.kr/p/r9qvLn",
    ),
    RealPhoto(
        "skimage",
        "data/camera.png",
        "Man with a camera",
        "Lav Varshney",
        "cc0",
        "https://scikit-image.org/docs/stable/api/skimage.data.html#skimage.data.camera",
    ),
    RealPhoto(
        "skimage",
        "data/chelsea.png",
        "Chelsea the cat",
        "Stefan van der Walt",
        "cc0",
        "https://scikit-image.org/docs/stable/api/skimage.data.html#skimage.data.chelsea",
    ),
    RealPhoto(
        "skimage",
        "data/coffee.png",
        "Coffee cup (courtesy of Pikolo Espresso Bar)",
        "Rachel Michetti",
        "cc0",
        "https://scikit-image.org/docs/stable/api/skimage.data.html#skimage.data.coffee",
    ),
    RealPhoto(
        "skimage",
        "data/coins.png",
        "Greek coins from Pompeii",
        "Brooklyn Museum",
        "no-known-copyright",
        "https://www.brooklynmuseum.org/opencollection/archives/image/51611",
    ),
    RealPhoto(
        "skimage",
        "data/hubble_deep_field.jpg",
        "Hubble eXtreme Deep Field",
        "NASA",
        "us-government-work",
        "http://hubblesite.org/newscenter/archive/releases/2012/37/image/a/",
    ),
    RealPhoto(
        "skimage",
        "data/retina.jpg",
        "Fundus photograph of a normal left eye",
        "Mikael Häggström",
        "cc0",
        "https://commons.wikimedia.org/wiki/File:Fundus_photograph_of_normal_left_eye.jpg",
    ),
    RealPhoto(
        "skimage",
        "data/rocket.jpg",
        "Launch of DSCOVR on Falcon 9",
        "SpaceX",
        "cc0",
        "https://www.flickr.com/photos/spacexphotos/16511594820/",
    ),
    RealPhoto(
        "skimage",
        "data/brick.png",
        "Brick wall texture (CC0Textures Bricks25)",
        "CC0Textures",
        "cc0",
        "https://cc0textures.com/view.php?tex=Bricks25",
    ),
    RealPhoto(
        "skimage",
        "data/gravel.png",
        "Gravel texture (CC0Textures Gravel04)",
        "CC0Textures",
        "cc0",
        "https://cc0textures.com/view.php?tex=Gravel04",
    ),
    RealPhoto(
        "matplotlib",
        "mpl-data/sample_data/grace_hopper.jpg",
        "Commodore Grace M. Hopper, USN",
        "James S. Davis, U.S. Navy",
        "us-government-work",
        "https://commons.wikimedia.org/wiki/File:Commodore_Grace_M._Hopper,_USN_(covered).jpg",
    ),
)


@dataclass
class SampleRow:
    """One metadata row of the sample and what the pipeline must do with it."""

    photo_id: int
    title: str
    author: str
    license_code: str | None  # None: the row states no license / an unknown one
    expect: str  # "commercial", "noncommercial", or the exclusion reason
    ext: str = "jpg"
    is_video: bool = False
    original: bytes | None = None  # served at the original URL; None = 404
    sized: bytes | None = None  # served at the `_b` URL; None = 404
    license_name_override: str | None = None
    raw_line: str | None = None  # a deliberately malformed line, written as is


@dataclass
class Sample:
    root: Path
    metadata: Path
    rows: list[SampleRow] = field(default_factory=list)

    def expected(self, outcome: str) -> list[SampleRow]:
        return [r for r in self.rows if r.expect == outcome]


def _real_bytes(photo: RealPhoto) -> bytes:
    import importlib

    module = importlib.import_module(photo.package)
    return (Path(module.__file__).parent / photo.resource).read_bytes()  # type: ignore[arg-type]


def synthetic_jpeg(seed: int, size: tuple[int, int] = (640, 480)) -> bytes:
    """A labelled synthetic picture: smooth colour gradients plus noise, deterministic per seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, 3)
    channels = [127 + 100 * np.sin(x / rng.uniform(20, 80) + y / rng.uniform(20, 80) + p) for p in phase]
    pixels = np.stack(channels, axis=-1) + rng.normal(0, 12, (h, w, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def sample_rows() -> list[SampleRow]:
    rows: list[SampleRow] = []
    next_id = 9_000_000_001
    for photo in REAL_PHOTOS:
        data = _real_bytes(photo)
        ext = "png" if photo.resource.endswith(".png") else "jpg"
        rows.append(
            SampleRow(
                next_id, photo.title, photo.author, photo.license_code, "commercial", ext, original=data
            )
        )
        next_id += 1
    synthetic = [
        ("cc-by-nc", "noncommercial", {}),
        ("cc-by-nc-sa", "noncommercial", {}),
        ("cc-by-nc", "noncommercial", {}),
        ("cc-by-nc-sa", "noncommercial", {}),
        ("cc-by", "commercial", {"original_missing": True}),  # falls back to the `_b` size
        ("cc-by-sa", "commercial", {}),
        ("cc-by-nd", "license-not-allowed:cc-by-nd", {}),
        ("cc-by-nc-nd", "license-not-allowed:cc-by-nc-nd", {}),
        ("all-rights-reserved", "license-not-allowed:all-rights-reserved", {}),
        (None, "license-unknown", {}),
        ("cc-by", "fetch:http-404", {"dead": True}),
        ("cc-by-nc", "fetch:corrupt", {"corrupt": True}),
        ("cc-by", "fetch:too-small", {"small": True}),
        ("cc-by", "video", {"video": True}),
    ]
    for number, (code, expect, kind) in enumerate(synthetic):
        image = synthetic_jpeg(number)
        if kind.get("corrupt"):
            image = image[: len(image) // 3]
        if kind.get("small"):
            image = synthetic_jpeg(number, (120, 90))
        row = SampleRow(
            next_id,
            f"SYNTHETIC sample image {number} ({expect})",
            SYNTHETIC_AUTHOR,
            code,
            expect,
            is_video=bool(kind.get("video")),
            original=None if kind.get("dead") or kind.get("original_missing") else image,
            sized=image if kind.get("original_missing") else None,
        )
        if code is None:
            row.license_name_override = "Some Custom License"
        rows.append(row)
        next_id += 1
    rows.append(
        SampleRow(
            next_id,
            "SYNTHETIC malformed row",
            SYNTHETIC_AUTHOR,
            "cc-by",
            "malformed:bad-id",
            raw_line="bad-id",
        )
    )
    rows.append(
        SampleRow(
            next_id + 1,
            "SYNTHETIC truncated row",
            SYNTHETIC_AUTHOR,
            "cc-by",
            "malformed:column-count",
            raw_line="short",
        )
    )
    return rows


def metadata_line(row: SampleRow, base_url: str) -> str:
    """The row in YFCC100M's 2014 23-column layout (URL-encoded text, like the real release)."""
    lic = BY_CODE.get(row.license_code or "")
    license_name = row.license_name_override or (lic.name if lic else "")
    license_url = lic.url if lic else ""
    farm, server, secret, secret_original = (
        "9",
        "8000",
        f"s{row.photo_id % 9973:04x}",
        f"o{row.photo_id % 7919:04x}",
    )
    values = {
        "photo_id": str(row.photo_id),
        "user_nsid": f"{row.photo_id % 100000}@N00",
        "user_nickname": quote_plus(row.author),
        "date_taken": "2013-06-01 12:00:00.0",
        "date_uploaded": "1370088000",
        "capture_device": quote_plus("SYNTHETIC camera"),
        "title": quote_plus(row.title),
        "description": quote_plus("Part of the CommonCanvas bundled sample"),
        "user_tags": "commoncanvas,sample",
        "machine_tags": "",
        "longitude": "",
        "latitude": "",
        "accuracy": "",
        "page_url": f"{base_url}/photos/{row.photo_id}/",
        "download_url": f"{base_url}/download/{row.photo_id}.{row.ext}",
        "license_name": quote_plus(license_name),
        "license_url": license_url,
        "server": server,
        "farm": farm,
        "secret": secret,
        "secret_original": secret_original,
        "extension": row.ext,
        "marker": "1" if row.is_video else "0",
    }
    if row.raw_line == "bad-id":
        values["photo_id"] = f"{row.photo_id}x"
    line = "\t".join(values[name] for name in FIELDS_2014)
    if row.raw_line == "short":
        line = "\t".join(line.split("\t")[:12])
    return line


def served_files(row: SampleRow) -> dict[str, bytes]:
    """URL path -> body for what the sample's HTTP server serves for this row."""
    farm, server = "9", "8000"
    secret, secret_original = f"s{row.photo_id % 9973:04x}", f"o{row.photo_id % 7919:04x}"
    names = {
        "farm": farm,
        "server": server,
        "id": row.photo_id,
        "secret": secret,
        "secret_original": secret_original,
        "ext": row.ext,
    }
    files = {}
    if row.original is not None:
        files[ORIGINAL_PATH.format(**names)] = row.original
    if row.sized is not None:
        files[SIZED_PATH.format(**names)] = row.sized
    return files


def build_sample(root: Path, base_url: str) -> Sample:
    """Write the served files under `root/www` and the bz2 metadata; return the rows and expectations."""
    root.mkdir(parents=True, exist_ok=True)
    rows = sample_rows()
    for row in rows:
        for path, body in served_files(row).items():
            target = root / "www" / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(body)
    metadata = root / "yfcc100m_sample.tsv.bz2"
    metadata.write_bytes(bz2.compress("".join(metadata_line(r, base_url) + "\n" for r in rows).encode()))
    return Sample(root, metadata, rows)


def url_templates(base_url: str) -> dict[str, str]:
    """ScrapeJob fetch templates pointing at the sample server instead of Flickr's farms."""
    return {"originalUrlTemplate": base_url + ORIGINAL_PATH, "sizedUrlTemplate": base_url + SIZED_PATH}

"""ScrapeJob fetch throughput against img2dataset, on the same images served by the same local server.

    python -m bench.scrape_fetch [--images 2000] [--latency 0.05] [--concurrency 128] [--rounds 5]

Builds N unique JPEGs of photo-like sizes (200 KB to 2 MB: a few dozen generated base pictures, cached
under `.cache/bench/`, each served copy made unique by its own JPEG comment segment so that sha256
de-duplication keeps every one), serves them with `LocalHTTPServer` (about `--latency` seconds per
request), then in the same run times

- ours: a ScrapeJob over YFCC100M 23-column metadata for those photos (cc-by), run end to end by
  `commoncanvas.runner.run_scrape` (planning, the unit process pool, MDS shards with license columns,
  markers, the index merge), `--units-per-process` units per process;
- the peer: `img2dataset.download` on the same URLs with the same processes, the same requests in
  flight per process (`thread_count`), one shard per unit, `resize_mode="no"`,
  `disable_all_reencoding=True`, webdataset output, the same retries and timeout, no wandb.

`--concurrency` is the total number of requests in flight (split evenly over the processes).  Each
measurement runs in a fresh interpreter, so both pay their imports and worker start every round.
Prints one table (images/s, MB/s, successes and failures, CPU seconds of the tool's whole process tree,
throughput inside the units alone, ratio ours/img2dataset) and one JSON line.  Options also come
from the environment: BENCH_IMAGES, BENCH_LATENCY, BENCH_CONCURRENCY, BENCH_ROUNDS.

What each side does per image, neither decoding pixels: ours (the default `filters.check: header`)
sniffs the magic bytes, reads the header's size for the size and decompression-bomb filters, checks a
JPEG's end-of-image marker after its last scan, runs Pillow's `verify()` (structure, no pixel decode)
and hashes the bytes (sha256, for de-duplication); img2dataset with `disable_all_reencoding=True` keeps
the bytes as they came, hashes them (sha256) and parses their EXIF (exifread).  With `filters.check:
decode` ours would also decode every image (JPEG at 1/8 scale); this benchmark keeps the default.

`--rounds` (default 5) repeats both tools, alternating which goes first; the table gives median
[min-max] over rounds, and each ratio's spread from the per-round ratios.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bench.report import MIN_ROUNDS, Table, alternate, ratio_spread, ratios, rounded, spread, stats

# img2dataset and its imports (albumentations' version check, wandb) must never reach the network,
# and urllib must not send loopback requests to a proxy.  Set before any import and before any spawn.
OFFLINE_ENV = {
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "WANDB_MODE": "disabled",
    "WANDB_SILENT": "true",
    "WANDB_DISABLED": "true",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}
LOOPBACK = "127.0.0.1,localhost"

MIN_BYTES, MAX_BYTES = 200_000, 2_000_000
BASE_IMAGES = 48
BASE_VERSION = 1  # bump when the generator changes: the cache key includes it
PHOTO_SIZES = (
    (1600, 1200),
    (2048, 1365),
    (2048, 1536),
    (2400, 1600),
    (2592, 1944),
    (3000, 2000),
    (3264, 2448),
)
PHOTO_ID_BASE = 7_000_000_000
REPO = Path(__file__).resolve().parents[1]


def cache_dir() -> Path:
    return Path(os.environ.get("CC_CACHE_DIR", REPO / ".cache")).resolve() / "bench"


# ---------------------------------------------------------------- the images


def _encode(pixels: np.ndarray, quality: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=quality)
    return out.getvalue()


def base_image(seed: int) -> bytes:
    """A photo-like JPEG: a smooth random colour field, some structure and sensor-like noise; its
    quality is searched so the file lands between MIN_BYTES and MAX_BYTES."""
    rng = np.random.default_rng(seed)
    w, h = PHOTO_SIZES[int(rng.integers(len(PHOTO_SIZES)))]
    if rng.random() < 0.3:
        w, h = h, w  # portrait
    grid = rng.integers(0, 256, (int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(grid).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    y, x = np.ogrid[0:h, 0:w]
    waves = 25 * np.sin(x / rng.uniform(5, 60) + y / rng.uniform(5, 60)).astype(np.float32)
    noise = rng.standard_normal((h, w, 3), dtype=np.float32) * np.float32(rng.uniform(3, 10))
    pixels = np.clip(field + waves[..., None] + noise, 0, 255).astype(np.uint8)
    target = math.exp(rng.uniform(math.log(MIN_BYTES * 1.1), math.log(MAX_BYTES * 0.9)))
    low, high = 30, 97
    best = _encode(pixels, 85)
    for _ in range(6):  # bisection on quality towards the target size
        quality = (low + high) // 2
        data = _encode(pixels, quality)
        if abs(len(data) - target) < abs(len(best) - target):
            best = data
        low, high = (quality + 1, high) if len(data) < target else (low, quality - 1)
        if low > high:
            break
    return best


def base_images(count: int, seed: int) -> list[bytes]:
    """The base pictures, from the cache if present (keyed by generator version, count and seed)."""
    folder = cache_dir() / f"scrape_fetch-base-v{BASE_VERSION}-n{count}-s{seed}"
    files = [folder / f"{i:03d}.jpg" for i in range(count)]
    if (folder / ".complete").exists():
        return [f.read_bytes() for f in files]
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with ProcessPoolExecutor(os.cpu_count() or 1, mp_context=multiprocessing.get_context("spawn")) as pool:
        images = list(pool.map(base_image, [seed * 1000 + i for i in range(count)]))
    for path, data in zip(files, images, strict=True):
        path.write_bytes(data)
    (folder / ".complete").touch()
    print(f"generated {count} base images in {time.perf_counter() - started:.1f}s -> {folder}")
    return images


def with_comment(jpeg: bytes, text: str) -> bytes:
    """The same JPEG with a COM segment after its APPn headers: still valid, but different bytes."""
    assert jpeg[:2] == b"\xff\xd8", "not a JPEG"
    at = 2
    while jpeg[at] == 0xFF and 0xE0 <= jpeg[at + 1] <= 0xEF:  # skip APP0..APP15 (JFIF, EXIF, ...)
        at += 2 + struct.unpack(">H", jpeg[at + 2 : at + 4])[0]
    payload = text.encode()
    return jpeg[:at] + b"\xff\xfe" + struct.pack(">H", len(payload) + 2) + payload + jpeg[at:]


@dataclass
class Corpus:
    files: dict[str, bytes]  # URL path -> body
    paths: list[str]  # in photo order
    rows: list[Any]  # commoncanvas.sample.SampleRow

    @property
    def total_bytes(self) -> int:
        return sum(len(b) for b in self.files.values())


def build_corpus(images: int, seed: int) -> Corpus:
    from commoncanvas.sample import SampleRow, served_files

    bases = base_images(BASE_IMAGES, seed)
    files: dict[str, bytes] = {}
    paths: list[str] = []
    rows: list[Any] = []
    for i in range(images):
        photo_id = PHOTO_ID_BASE + i
        body = with_comment(bases[i % len(bases)], f"commoncanvas bench photo {photo_id}")
        row = SampleRow(
            photo_id, f"Bench photo {i}", "CommonCanvas bench", "cc-by", "commercial", original=body
        )
        ((path, _),) = served_files(row).items()
        files[path] = body
        paths.append(path)
        rows.append(row)
    return Corpus(files, paths, rows)


# ---------------------------------------------------------------- the two contenders


@dataclass
class Outcome:
    tool: str
    planned: int
    ok: int
    failed: int
    bytes: int
    seconds: float  # end to end: planning/sharding, worker processes (imports included), merge
    cpu_seconds: float  # CPU used meanwhile by the tool's process and all its descendants
    unit_seconds: float  # time inside the units (ours) / shards (img2dataset), summed, / processes
    detail: dict[str, int]

    @property
    def images_per_s(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds else 0.0

    @property
    def unit_images_per_s(self) -> float:
        return self.ok / self.unit_seconds if self.unit_seconds else 0.0

    @property
    def cpu_ms_per_image(self) -> float:
        return 1000 * self.cpu_seconds / self.ok if self.ok else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "seconds": round(self.seconds, 3),
            "cpu_seconds": round(self.cpu_seconds, 3),
            "unit_seconds": round(self.unit_seconds, 3),
            "cpu_ms_per_image": round(self.cpu_ms_per_image, 2),
            "images_per_s": round(self.images_per_s, 1),
            "mb_per_s": round(self.mb_per_s, 1),
            "unit_images_per_s": round(self.unit_images_per_s, 1),
        }


@dataclass(frozen=True)
class Setup:
    images: int
    latency: float
    concurrency: int  # total requests in flight
    processes: int
    units_per_process: int
    retries: int
    timeout: int

    @property
    def per_process(self) -> int:
        return max(1, self.concurrency // self.processes)

    @property
    def unit_size(self) -> int:
        return math.ceil(self.images / (self.processes * self.units_per_process))

    def argv(self) -> list[str]:
        return [f"--{name.replace('_', '-')}={value}" for name, value in asdict(self).items()]


class Measured:
    """Wall time and the CPU seconds of this process and all its descendants (from /proc, sampled
    every 0.1 s, so a process that lives less than that may be missed; 0 where there is no /proc)."""

    TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def __enter__(self) -> Measured:
        self._peak: dict[tuple[int, str], float] = {}
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._loop, daemon=True, name="cpu-sampler")
        self._sampler_cpu = 0.0
        self._own = time.process_time()
        self._started = time.perf_counter()
        self._sampler.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._started
        self._stop.set()
        self._sampler.join()
        own = time.process_time() - self._own - self._sampler_cpu
        self.cpu_seconds = own + sum(self._peak.values())

    def _loop(self) -> None:
        while not self._stop.wait(0.1):
            self._sample()
        self._sample()
        self._sampler_cpu = time.thread_time()

    def _sample(self) -> None:
        me = os.getpid()
        children: dict[int, list[int]] = {}
        usage: dict[int, tuple[float, str]] = {}
        try:
            entries = [e for e in os.listdir("/proc") if e.isdigit()]
        except OSError:
            return
        for entry in entries:
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    text = handle.read()
            except OSError:
                continue  # gone meanwhile
            fields = text[text.rindex(")") + 2 :].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
            usage[int(entry)] = ((int(fields[11]) + int(fields[12])) / self.TICKS, fields[19])
        todo = list(children.get(me, []))
        while todo:
            pid = todo.pop()
            todo.extend(children.get(pid, []))
            if pid in usage:
                cpu, start = usage[pid]
                key = (pid, start)
                self._peak[key] = max(self._peak.get(key, 0.0), cpu)


def write_inputs(corpus: Corpus, base_url: str, work: Path) -> None:
    """The same photos for both: YFCC100M metadata rows for ours, a plain URL list for img2dataset."""
    from commoncanvas.sample import metadata_line

    (work / "yfcc100m_bench.tsv").write_text("".join(metadata_line(r, base_url) + "\n" for r in corpus.rows))
    (work / "urls.txt").write_text("".join(base_url + path + "\n" for path in corpus.paths))


def run_ours(setup: Setup, base_url: str, work: Path) -> Outcome:
    from commoncanvas.runner import run_scrape
    from commoncanvas.sample import url_templates
    from commoncanvas.specs import ScrapeJob
    from commoncanvas.storage import open_storage
    from commoncanvas.units import read_markers

    output = work / "catalog"
    job = ScrapeJob.model_validate(
        {
            "apiVersion": "commoncanvas.dev/v1alpha1",
            "kind": "ScrapeJob",
            "metadata": {"name": "bench-fetch"},
            "spec": {
                "source": {"uri": str(work / "yfcc100m_bench.tsv")},
                "output": {"uri": str(output)},
                "fetch": {
                    **url_templates(base_url),
                    "concurrency": setup.per_process,
                    "retries": setup.retries,
                    "timeoutSeconds": setup.timeout,
                    "allowPrivateNetworks": True,  # the image server is on loopback
                    "allowedHosts": ["127.0.0.1"],
                },
                "unitSize": setup.unit_size,
                "parallelism": setup.processes,
            },
        }
    )
    with Measured() as measured:
        summary = run_scrape(job, show_progress=False)
    markers = read_markers(open_storage(str(output)))
    ok = sum(summary["samples"].values())
    failed = {k: v for k, v in summary["excluded"].items() if k.startswith("fetch:")}
    written = sum(int(m["bytes"]) for m in markers.values())
    unit_seconds = sum(float(m["seconds"]) for m in markers.values())
    assert ok == sum(int(m["written"]) for m in markers.values()), "merged index and markers disagree"
    return Outcome(
        "ours",
        setup.images,
        ok,
        sum(failed.values()),
        written,
        measured.seconds,
        measured.cpu_seconds,
        unit_seconds / setup.processes,
        failed,
    )


def run_img2dataset(setup: Setup, base_url: str, work: Path) -> Outcome:
    from img2dataset import download

    output = work / "img2dataset"
    with Measured() as measured:
        download(
            url_list=str(work / "urls.txt"),
            output_folder=str(output),
            input_format="txt",
            output_format="webdataset",
            processes_count=setup.processes,
            thread_count=setup.per_process,
            number_sample_per_shard=setup.unit_size,
            resize_mode="no",
            disable_all_reencoding=True,
            retries=setup.retries,
            timeout=setup.timeout,
            enable_wandb=False,
        )
    ok = failed = written = 0
    unit_seconds = 0.0
    errors: dict[str, int] = {}
    for stats_file in sorted(output.glob("*_stats.json")):
        stats = json.loads(stats_file.read_text())
        ok += int(stats["successes"])
        failed += int(stats["failed_to_download"]) + int(stats["failed_to_resize"])
        unit_seconds += float(stats["duration"])
        for status, count in stats.get("status_dict", {}).items():
            if status != "success":
                errors[status[:80]] = errors.get(status[:80], 0) + int(count)
    for shard in sorted(output.glob("*.tar")):
        with tarfile.open(shard) as tar:
            written += sum(member.size for member in tar if member.name.endswith(".jpg"))
    return Outcome(
        "img2dataset",
        setup.images,
        ok,
        failed,
        written,
        measured.seconds,
        measured.cpu_seconds,
        unit_seconds / setup.processes,
        errors,
    )


RUNNERS = {"ours": run_ours, "img2dataset": run_img2dataset}


def measure(tool: str, setup: Setup, base_url: str, work: Path) -> Outcome:
    """One tool, once, in a fresh interpreter: each pays its own imports and worker start, every round."""
    result = work / f"{tool}.json"
    command = [
        sys.executable,
        "-m",
        "bench.scrape_fetch",
        "--child",
        tool,
        "--work",
        str(work),
        "--base-url",
        base_url,
        *setup.argv(),
    ]
    log = work / f"{tool}.log"
    with log.open("w") as out:
        code = subprocess.call(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    if code != 0 or not result.exists():
        raise RuntimeError(f"{tool} run failed (exit {code}); its output:\n{log.read_text()[-4000:]}")
    return Outcome(**json.loads(result.read_text()))


# ---------------------------------------------------------------- the report


def report(setup: Setup, corpus: Corpus, results: dict[str, list[Outcome]]) -> dict[str, Any]:
    tools = [t for t in ("ours", "img2dataset") if results.get(t)]
    both = len(tools) == 2

    def values(tool: str, attribute: str) -> list[float]:
        return [float(getattr(o, attribute)) for o in results[tool]]

    def median(tool: str, attribute: str) -> float:
        return float(statistics.median(values(tool, attribute)))

    rounds = max(len(results[t]) for t in tools)
    table = Table(
        f"ScrapeJob fetch vs img2dataset: {setup.images} images ({corpus.total_bytes / 1e6:.0f} MB), "
        f"{setup.latency * 1000:.0f} ms latency, {setup.processes} processes x {setup.per_process} in "
        f"flight; median [min-max] of {rounds} rounds",
        ["end to end", *tools, *(["ours / img2dataset"] if both else [])],
        caption=(
            "end to end: planning/sharding + worker processes (imports included) + writing + merge; "
            "inside units: the units' (shards') own time, summed over units, / processes; a ratio's "
            "spread is that of its per-round ratios"
        ),
    )
    rows = (
        ("images/s", "images_per_s", ".1f", True),
        ("MB/s", "mb_per_s", ".1f", True),
        ("seconds", "seconds", ".2f", False),
        ("succeeded", "ok", ".0f", False),
        ("failed", "failed", ".0f", False),
        ("CPU seconds (all processes)", "cpu_seconds", ".1f", False),
        ("CPU ms per image", "cpu_ms_per_image", ".2f", True),
        ("images/s inside units", "unit_images_per_s", ".1f", True),
    )
    for label, attribute, spec, ratio in rows:
        cells = [spread(values(t, attribute), spec) for t in tools]
        if both:
            ours, peer = values("ours", attribute), values("img2dataset", attribute)
            cells.append(ratio_spread(ours, peer) if ratio else "")
        table.add_row(label, *cells)
    table.print()
    for tool in tools:
        for outcome in results[tool]:
            if outcome.ok != outcome.planned:
                failures = json.dumps(outcome.detail)
                print(f"{tool}: {outcome.ok}/{outcome.planned} succeeded; failures: {failures}")
    line: dict[str, Any] = {
        "benchmark": "scrape_fetch",
        **asdict(setup),
        "per_process": setup.per_process,
        "unit_size": setup.unit_size,
        "megabytes": round(corpus.total_bytes / 1e6, 1),
        "rounds": rounds,
    }
    figures = (
        "ok",
        "failed",
        "seconds",
        "images_per_s",
        "mb_per_s",
        "cpu_seconds",
        "cpu_ms_per_image",
        "unit_images_per_s",
    )
    for tool in tools:
        line[tool] = {key: round(median(tool, key), 3) for key in figures}
        line[tool]["ok"], line[tool]["failed"] = int(line[tool]["ok"]), int(line[tool]["failed"])
        line[tool]["spread"] = {key: rounded(stats(values(tool, key))) for key in figures[2:]}
        line[tool]["rounds"] = [o.to_json() for o in results[tool]]
    if both:
        for key in ("images_per_s", "mb_per_s", "cpu_ms_per_image", "unit_images_per_s"):
            line[f"ratio_{key}"] = round(median("ours", key) / median("img2dataset", key), 3)
            per_round = ratios(values("ours", key), values("img2dataset", key))
            line[f"ratio_{key}_per_round"] = rounded(stats(per_round))
    print(json.dumps(line))
    return line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="python -m bench.scrape_fetch", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--images", type=int, default=int(env("BENCH_IMAGES", "2000")))
    parser.add_argument(
        "--latency",
        type=float,
        default=float(env("BENCH_LATENCY", "0.05")),
        help="seconds the server waits before each answer",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=int(env("BENCH_CONCURRENCY", "128")),
        help="total requests in flight, split evenly over the processes",
    )
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--units-per-process", type=int, default=2)
    parser.add_argument("--retries", type=int, default=1)
    parser.add_argument("--timeout", type=int, default=30)
    parser.add_argument(
        "--rounds",
        type=int,
        default=int(env("BENCH_ROUNDS", str(MIN_ROUNDS))),
        help="repeat both tools, alternating which goes first; median [min-max] is reported",
    )
    parser.add_argument("--only", choices=sorted(RUNNERS), help="run one tool only")
    parser.add_argument("--seed", type=int, default=0)
    # Internal: one measurement in a fresh interpreter (see `measure`).
    parser.add_argument("--child", choices=sorted(RUNNERS), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--base-url", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    for key in ("NO_PROXY", "no_proxy"):
        os.environ[key] = ",".join(filter(None, (os.environ.get(key), LOOPBACK)))
    setup = Setup(
        args.images,
        args.latency,
        args.concurrency,
        args.processes,
        args.units_per_process,
        args.retries,
        args.timeout,
    )
    if args.child:
        outcome = RUNNERS[args.child](setup, args.base_url, args.work)
        (args.work / f"{args.child}.json").write_text(json.dumps(asdict(outcome)))
        return asdict(outcome)

    from commoncanvas.sample.server import LocalHTTPServer

    corpus = build_corpus(args.images, args.seed)
    tools = [args.only] if args.only else ["ours", "img2dataset"]

    def one(tool: str, base_url: str) -> Outcome:
        work = Path(tempfile.mkdtemp(prefix=f"commoncanvas-bench-{tool}-"))
        try:
            write_inputs(corpus, base_url, work)
            return measure(tool, setup, base_url, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def said(round_: int, tool: str, outcome: Outcome) -> None:
        print(
            f"round {round_ + 1} {tool}: {outcome.ok}/{outcome.planned} in {outcome.seconds:.1f}s "
            f"({outcome.images_per_s:.1f} images/s, {outcome.mb_per_s:.1f} MB/s)",
            flush=True,
        )

    with LocalHTTPServer(files=corpus.files, latency=args.latency) as server:
        contenders = {tool: (lambda tool=tool: one(tool, server.base_url)) for tool in tools}
        results = alternate(contenders, args.rounds, said)
    return report(setup, corpus, results)


if __name__ == "__main__":
    main()

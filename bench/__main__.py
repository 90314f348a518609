"""`python -m bench [NAME ...] [--option ...]`: run the registered benchmarks (all, or the named ones).

Each benchmark is a module `bench/NAME.py` (or package `bench/NAME/`) with
`main(argv: list[str] | None) -> dict`; options after the names are passed to every benchmark run (each
module also reads its defaults from the environment, e.g. `BENCH_IMAGES=500 make bench`).  A new
benchmark is one more name in `BENCHMARKS`.  The CPU benchmarks run ours and a peer in alternating
rounds and print median [min-max] through `bench.report`.  `gpu` runs by default only where CUDA is
present; elsewhere name it (`python -m bench gpu --smoke`).
"""

from __future__ import annotations

import importlib
import sys

CPU_BENCHMARKS = [
    "scrape_fetch",
    "caption_batch",
    "train_speedups",
    "operator_scale",
    "operator_steady",
    "paper_scale",
]
BENCHMARKS = [*CPU_BENCHMARKS, "gpu"]


def default_benchmarks() -> list[str]:
    """The CPU ones, and `gpu` when this machine has a CUDA device (its full run needs one)."""
    try:
        import torch

        has_gpu = bool(torch.cuda.is_available())
    except ImportError:
        has_gpu = False
    return BENCHMARKS if has_gpu else CPU_BENCHMARKS


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    names = []
    while args and not args[0].startswith("-"):
        names.append(args.pop(0))
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; known: {BENCHMARKS}", file=sys.stderr)
        return 2
    for name in names or default_benchmarks():
        importlib.import_module(f"bench.{name}").main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

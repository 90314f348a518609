"""`python -m bench [NAME ...] [--option ...]`: run the registered benchmarks (all, or the named ones).

Each benchmark is a module `bench/NAME.py` with `main(argv: list[str] | None) -> dict`; options after
the names are passed to every benchmark run (each module also reads its defaults from the environment,
e.g. `BENCH_IMAGES=500 make bench`).  A new benchmark is one more name in `BENCHMARKS`.
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = ["scrape_fetch", "caption_batch", "train_speedups", "operator_scale"]


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    names = []
    while args and not args[0].startswith("-"):
        names.append(args.pop(0))
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; known: {BENCHMARKS}", file=sys.stderr)
        return 2
    for name in names or BENCHMARKS:
        importlib.import_module(f"bench.{name}").main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

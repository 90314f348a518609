"""What every benchmark shares: alternating rounds, median and spread, and one plain-text table.

Standard library only, so `bench.gpu` can use it on a machine that has nothing but torch.

    results = alternate({"ours": run_ours, "peer": run_peer}, rounds=5)  # ours, peer, peer, ours, ...
    table = Table("title", ["", "ours", "peer", "ours / peer"])
    table.add_row("images/s", spread(ours_values), spread(peer_values), ratio_spread(ours, peer))
    table.print()

A spread is written `median [min-max]`; a ratio's spread comes from the per-round ratios (round i of
one side against round i of the other), so load that drifts between rounds shows up in it.
"""

from __future__ import annotations

import re
import statistics
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

MIN_ROUNDS = 5  # the fewest rounds a comparison's default runs; a single round hides +-30% drift


def alternate(
    contenders: Mapping[str, Callable[[], T]],
    rounds: int,
    after_each: Callable[[int, str, T], None] | None = None,
) -> dict[str, list[T]]:
    """Run every contender once per round; odd rounds in reverse order, since a shared machine's load
    drifts and whoever runs first (caches, turbo) would otherwise always be the same side."""
    names = list(contenders)
    results: dict[str, list[T]] = {name: [] for name in names}
    for round_ in range(rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            outcome = contenders[name]()
            results[name].append(outcome)
            if after_each is not None:
                after_each(round_, name, outcome)
    return results


def stats(values: Iterable[float | None]) -> dict[str, Any]:
    """Median, min, max and quartiles of the values that were measured (None: not measured)."""
    data = sorted(float(v) for v in values if v is not None)
    if not data:
        return {"rounds": 0, "median": None, "min": None, "max": None, "q1": None, "q3": None}
    q1, _, q3 = statistics.quantiles(data, n=4, method="inclusive") if len(data) > 1 else (data[0],) * 3
    return {
        "rounds": len(data),
        "median": statistics.median(data),
        "min": data[0],
        "max": data[-1],
        "q1": q1,
        "q3": q3,
    }


def rounded(summary: dict[str, Any], digits: int = 3) -> dict[str, Any]:
    return {k: (round(v, digits) if isinstance(v, float) else v) for k, v in summary.items()}


def ratios(ours: Sequence[float | None], peer: Sequence[float | None]) -> list[float | None]:
    """Round-by-round ours / peer."""
    return [a / b if a is not None and b else None for a, b in zip(ours, peer, strict=False)]


def spread(values: Iterable[float | None], spec: str = ".1f", suffix: str = "") -> str:
    """`median [min-max]`, or the one value when there is one."""
    s = stats(values)
    if s["median"] is None:
        return "-"
    if s["rounds"] == 1:
        return f"{s['median']:{spec}}{suffix}"
    return f"{s['median']:{spec}}{suffix} [{s['min']:{spec}}-{s['max']:{spec}}]"


def ratio_spread(ours: Sequence[float | None], peer: Sequence[float | None]) -> str:
    return spread(ratios(ours, peer), ".2f", "x")


_WORDS = re.compile(r"[A-Za-wyz]")  # letters other than a ratio's trailing x


class Table:
    """A boxed plain-text table: columns of figures right-aligned, columns with words left-aligned."""

    def __init__(self, title: str, columns: Sequence[str], caption: str = "") -> None:
        self.title, self.columns, self.caption = title, list(columns), caption
        self.rows: list[list[str]] = []

    def add_row(self, *cells: object) -> None:
        row = ["" if c is None else str(c) for c in cells]
        self.rows.append(row + [""] * (len(self.columns) - len(row)))

    def render(self) -> str:
        count = len(self.columns)
        widths = [max(len(r[i]) for r in [self.columns, *self.rows]) for i in range(count)]
        left = [i == 0 or any(_WORDS.search(r[i]) for r in self.rows) for i in range(count)]

        def line(cells: Sequence[str]) -> str:
            padded = [c.ljust(w) if lj else c.rjust(w) for c, w, lj in zip(cells, widths, left, strict=True)]
            return "| " + " | ".join(padded) + " |"

        rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
        out = [self.title, rule, line(self.columns), rule, *map(line, self.rows), rule]
        if self.caption:
            out.append(self.caption)
        return "\n".join(out)

    def print(self) -> None:
        print(self.render(), file=sys.stdout, flush=True)

"""bench.report: alternating rounds, median and spread, and the one table every benchmark prints."""

from __future__ import annotations

from bench.report import Table, alternate, ratio_spread, spread, stats


def test_rounds_alternate_which_side_goes_first() -> None:
    order: list[str] = []
    results = alternate(
        {"ours": lambda: order.append("ours") or 1, "peer": lambda: order.append("peer") or 2}, 4
    )
    assert order == ["ours", "peer", "peer", "ours", "ours", "peer", "peer", "ours"]
    assert results == {"ours": [1, 1, 1, 1], "peer": [2, 2, 2, 2]}


def test_stats_give_median_extremes_and_quartiles_and_ignore_unmeasured() -> None:
    s = stats([5.0, 1.0, None, 3.0, 4.0, 2.0])
    assert (s["rounds"], s["median"], s["min"], s["max"]) == (5, 3.0, 1.0, 5.0)
    assert (s["q1"], s["q3"]) == (2.0, 4.0)
    assert stats([None])["median"] is None


def test_spread_is_median_then_min_max() -> None:
    assert spread([3.0, 1.0, 2.0]) == "2.0 [1.0-3.0]"
    assert spread([2.0]) == "2.0"
    assert spread([]) == "-"


def test_ratio_spread_pairs_round_i_with_round_i() -> None:
    assert ratio_spread([2.0, 6.0, 4.0], [1.0, 2.0, 2.0]) == "2.00x [2.00-3.00]"


def test_table_right_aligns_figures_and_left_aligns_words() -> None:
    table = Table("title", ["", "images/s", "note"])
    table.add_row("ours", "12.5", "batch 32")
    table.add_row("peer", "3.1", "pipeline")
    lines = table.render().splitlines()
    assert lines[0] == "title"
    assert "| ours |     12.5 | batch 32 |" in lines
    assert "| peer |      3.1 | pipeline |" in lines

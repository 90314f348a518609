"""`python -m commoncanvas_operator`: the kopf command line it runs."""

from __future__ import annotations

from commoncanvas_operator.__main__ import kopf_argv


def test_standalone_runs_as_given() -> None:
    argv = kopf_argv(["--namespace=ns", "--standalone"])
    assert argv == ["run", "--module", "commoncanvas_operator.handlers", "--namespace=ns", "--standalone"]


def test_peering_replicas_draw_distinct_priorities_unless_one_is_given() -> None:
    drawn = {next(a for a in kopf_argv(["--peering=cc"]) if a.startswith("--priority=")) for _ in range(20)}
    assert len(drawn) > 1, "replicas sharing their arguments must not share a priority"
    assert not any(
        a.startswith("--priority=") and a != "--priority=7"
        for a in kopf_argv(["--peering", "cc", "--priority=7"])
    )

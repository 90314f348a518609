"""The training loop's pure decisions: LR warmup, gradient accumulation, when to stop, the EMA schedule."""

from __future__ import annotations

import pytest
import torch
from diffusers.training_utils import EMAModel

from commoncanvas.specs.common import SpecError
from commoncanvas.specs.train import EmaSpec
from commoncanvas.train.loop import gradient_accumulation_steps, stop_reason, warmup_factor
from commoncanvas.train.model import ema_updates_at


def test_learning_rate_ramps_linearly_over_the_warmup_then_stays_constant() -> None:
    factors = [warmup_factor(step, warmup_steps=4) for step in range(7)]
    assert factors == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]


def test_the_first_step_already_learns_and_no_warmup_means_full_rate() -> None:
    assert warmup_factor(0, warmup_steps=10_000) > 0
    assert warmup_factor(0, warmup_steps=0) == 1.0


def test_lambda_lr_gives_each_optimizer_step_the_warmup_rate() -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_factor(step, 2))
    used = []
    for _ in range(3):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert used == pytest.approx([5e-5, 1e-4, 1e-4])


def test_accumulation_fills_the_global_batch_from_micro_batches_on_every_process() -> None:
    assert gradient_accumulation_steps(2048, 16, 64) == 2
    assert gradient_accumulation_steps(4, 2, 2) == 1
    assert gradient_accumulation_steps(8, 2, 1) == 4


def test_a_global_batch_the_processes_cannot_fill_exactly_is_refused_naming_the_fields() -> None:
    with pytest.raises(SpecError, match=r"globalBatchSize 100 .*microBatchSize 16 x 3 processes"):
        gradient_accumulation_steps(100, 16, 3)


def test_the_loop_stops_at_max_steps_first_then_for_time_then_for_sigterm() -> None:
    assert stop_reason(10, 10, out_of_time=True, sigterm=True) == "max-steps"
    assert stop_reason(5, 10, out_of_time=True, sigterm=True) == "max-duration"
    assert stop_reason(5, 10, out_of_time=False, sigterm=True) == "terminated"
    assert stop_reason(5, 10, out_of_time=False, sigterm=False) == ""


def test_ema_updates_from_its_start_step_every_k_steps() -> None:
    spec = EmaSpec(start_step=5, every=10)
    assert [s for s in range(1, 40) if ema_updates_at(s, spec)] == [5, 15, 25, 35]


def test_ema_with_defaults_updates_after_every_step() -> None:
    assert [s for s in range(1, 5) if ema_updates_at(s, EmaSpec())] == [1, 2, 3, 4]


def test_a_disabled_ema_never_updates() -> None:
    assert not any(ema_updates_at(s, EmaSpec(enabled=False)) for s in range(1, 100))


def test_the_ema_starts_as_a_copy_of_the_weights_then_moves_slowly_towards_them() -> None:
    weight = torch.nn.Parameter(torch.zeros(3))
    ema = EMAModel([weight], decay=0.9, foreach=True)
    with torch.no_grad():
        weight.fill_(1.0)
    ema.step([weight])  # the first update at the start step copies
    assert torch.equal(ema.shadow_params[0], torch.ones(3))
    with torch.no_grad():
        weight.fill_(2.0)
    ema.step([weight])  # then decay ramps as (1 + n) / (10 + n): 2/11 of the way after one more update
    assert ema.shadow_params[0] == pytest.approx(torch.full((3,), 1.0 + 9 / 11))

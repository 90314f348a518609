"""Stable steps and consistent latents: gradient clipping, the non-finite step check, the schedule's bounds,
and on-the-fly encoding in fp32 under autocast (the LATENTS phase's latents exactly)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from commoncanvas.specs.train import Schedule, TrainRunSpec
from commoncanvas.train import latents as latents_phase
from commoncanvas.train.loop import check_step, clip_gradients, diverged_message, encode, prediction_loss
from commoncanvas.train.model import ModelParts, build_model
from commoncanvas.train.world import World

ONE_PROCESS = World(rank=0, size=1, local_rank=0, local_size=1, device=torch.device("cpu"), restarts=0)


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> ModelParts:
    """The tiny SD2 (models.write_tiny_sd2, via the model cache) at 64 px."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COMMONCANVAS_MODEL_CACHE", str(tmp_path_factory.mktemp("models")))
        spec = TrainRunSpec.model_validate(
            {
                "dataset": {"uris": ["unused"]},
                "output": {"uri": "unused"},
                "checkpoint": {"uri": "unused"},
                "resolution": 64,
                "model": {"architecture": "tiny"},
            }
        )
        return build_model(spec, torch.device("cpu"))


def total_norm(unet: torch.nn.Module) -> float:
    return float(torch.nn.utils.get_total_norm([p.grad for p in unet.parameters() if p.grad is not None]))


def one_backward(parts: ModelParts, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    text = torch.randn(2, 77, parts.text_encoder.config.hidden_size, generator=generator)
    noise = torch.randn(2, 4, 8, 8, generator=generator)
    parts.unet.zero_grad(set_to_none=True)
    prediction_loss(parts.unet, parts, latents, text, noise, torch.tensor([10, 700])).backward()


# --- the schedule's fields -------------------------------------------------------------------------


def test_by_default_gradients_are_not_clipped_and_twenty_skips_in_a_row_fail_the_run() -> None:
    schedule = Schedule()
    assert schedule.gradient_clip_norm is None
    assert schedule.max_consecutive_skipped_steps == 20


def test_the_schedule_takes_a_clip_norm_and_a_skip_limit_by_their_camel_case_names() -> None:
    schedule = Schedule.model_validate({"gradientClipNorm": 1.0, "maxConsecutiveSkippedSteps": 5})
    assert (schedule.gradient_clip_norm, schedule.max_consecutive_skipped_steps) == (1.0, 5)
    assert Schedule.model_validate({"gradientClipNorm": None}).gradient_clip_norm is None


@pytest.mark.parametrize(
    "bad",
    [
        {"gradientClipNorm": 0},
        {"gradientClipNorm": -1.0},
        {"gradientClipNorm": "big"},
        {"maxConsecutiveSkippedSteps": 0},
        {"maxConsecutiveSkippedSteps": -3},
        {"maxConsecutiveSkippedSteps": 1_000_000},
    ],
)
def test_the_schedule_refuses_a_clip_norm_or_skip_limit_out_of_bounds(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match=next(iter(bad))):
        Schedule.model_validate(bad)


# --- clipping ----------------------------------------------------------------------------------------


def test_clipping_bounds_the_tiny_unets_gradient_norm_to_the_value_and_reports_the_norm_before(
    parts: ModelParts,
) -> None:
    unet = parts.unet
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    one_backward(parts)
    before = total_norm(unet)
    assert before > 0.1

    reported = clip_gradients(unet, optimizer, scaler, max_norm=before / 10)

    assert float(reported) == pytest.approx(before, rel=1e-5)
    assert total_norm(unet) == pytest.approx(before / 10, rel=1e-4)
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in unet.parameters())


def test_without_a_clip_norm_the_gradients_are_left_as_they_are(parts: ModelParts) -> None:
    unet = parts.unet
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    one_backward(parts, seed=1)
    grads = [p.grad.clone() for p in unet.parameters() if p.grad is not None]

    reported = clip_gradients(unet, optimizer, torch.amp.GradScaler("cpu", enabled=False), max_norm=None)

    assert float(reported) == pytest.approx(total_norm(unet))
    after = [p.grad for p in unet.parameters() if p.grad is not None]
    assert all(torch.equal(a, b) for a, b in zip(grads, after, strict=True))


def test_a_clip_larger_than_the_norm_changes_nothing(parts: ModelParts) -> None:
    unet = parts.unet
    one_backward(parts, seed=2)
    before = total_norm(unet)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    clip_gradients(unet, optimizer, torch.amp.GradScaler("cpu", enabled=False), max_norm=before * 100)
    assert total_norm(unet) == pytest.approx(before, rel=1e-6)


# --- the non-finite check ----------------------------------------------------------------------------


def test_a_finite_step_is_taken_and_its_numbers_and_stop_flags_pass_through() -> None:
    check = check_step(ONE_PROCESS, torch.tensor(0.25), torch.tensor(3.0), out_of_time=True, sigterm=False)
    assert (check.loss, check.grad_norm, check.skip, check.out_of_time, check.sigterm) == (
        0.25,
        3.0,
        False,
        True,
        False,
    )


@pytest.mark.parametrize(
    ("loss", "norm"),
    [(math.nan, 1.0), (math.inf, 1.0), (0.1, math.nan), (0.1, math.inf), (-math.inf, math.nan)],
)
def test_a_non_finite_loss_or_gradient_norm_skips_the_step(loss: float, norm: float) -> None:
    check = check_step(ONE_PROCESS, torch.tensor(loss), torch.tensor(norm), out_of_time=False, sigterm=False)
    assert check.skip


def test_a_nan_loss_makes_nan_gradients_that_the_check_catches_before_any_update(parts: ModelParts) -> None:
    unet = parts.unet
    weights = [p.detach().clone() for p in unet.parameters()]
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    latents[0, 0, 0, 0] = math.nan  # one bad latent: the loss and every gradient become NaN
    text = torch.randn(2, 77, parts.text_encoder.config.hidden_size, generator=generator)
    unet.zero_grad(set_to_none=True)
    loss = prediction_loss(unet, parts, latents, text, torch.randn_like(latents), torch.tensor([10, 700]))
    loss.backward()

    norm = clip_gradients(unet, optimizer, torch.amp.GradScaler("cpu", enabled=False), max_norm=1.0)
    check = check_step(ONE_PROCESS, loss, norm, out_of_time=False, sigterm=False)

    assert check.skip  # so the loop does not call optimizer.step(): the weights are as before
    assert all(torch.equal(w, p) for w, p in zip(weights, unet.parameters(), strict=True))


def test_the_divergence_message_names_the_step_and_the_field() -> None:
    message = diverged_message(41, 20)
    assert message.startswith("step 41: ")
    assert "schedule.maxConsecutiveSkippedSteps = 20" in message


# --- on-the-fly encoding = the LATENTS phase's ----------------------------------------------------


def test_on_the_fly_encoding_under_bf16_autocast_gives_the_latents_phases_fp32_latents(
    parts: ModelParts,
) -> None:
    generator = torch.Generator().manual_seed(4)
    pixels = torch.rand(2, 3, 64, 64, generator=generator) * 2 - 1
    captions = ["a cat on a sofa", "a colourful gradient"]
    tokens = parts.tokenizer(
        captions, padding="max_length", max_length=parts.tokenizer.model_max_length, return_tensors="pt"
    )
    batch = {"pixels": pixels, "input_ids": tokens.input_ids}
    # The LATENTS phase: fp32, no autocast.
    phase_latents, phase_text = latents_phase.encode_batch(
        parts.vae, parts.text_encoder, parts.tokenizer, pixels, captions
    )

    with torch.autocast("cpu", dtype=torch.bfloat16):
        trained_latents, trained_text = encode(parts, batch, torch.device("cpu"))
        old_way = latents_phase.encode_images(parts.vae, pixels)  # what the loop used to do

    assert trained_latents.dtype == trained_text.dtype == torch.float32
    torch.testing.assert_close(trained_latents, phase_latents)
    torch.testing.assert_close(trained_text, phase_text)
    # Under bf16 the encoder itself is off by far more than fp32 rounding: the test means something.
    drift = float((old_way.float() - phase_latents).norm() / phase_latents.norm())
    assert drift > 1e-3


def test_precomputed_latents_pass_through_encode_as_fp32(tmp_path: Path) -> None:
    batch = {
        "latents": torch.ones(1, 4, 8, 8, dtype=torch.float16),
        "text_hidden": torch.zeros(1, 77, 32, dtype=torch.float16),
    }
    parts: Any = None  # not needed: the encoders are skipped
    latents, text = encode(parts, batch, torch.device("cpu"))
    assert latents.dtype == text.dtype == torch.float32
    assert torch.equal(latents, torch.ones(1, 4, 8, 8))

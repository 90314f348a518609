"""The low-precision norm switch: same parameters, norms in the autocast dtype, plain outside autocast."""

from __future__ import annotations

import torch

from commoncanvas.train.model import LowPrecisionGroupNorm, LowPrecisionLayerNorm, use_low_precision_norms


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(4, 8), torch.nn.Flatten(), torch.nn.LayerNorm(8 * 6 * 6)
    )


def test_swapping_the_norms_keeps_every_parameter_name_and_value() -> None:
    model = small_model()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    assert use_low_precision_norms(model) == 2
    assert isinstance(model[1], LowPrecisionGroupNorm) and isinstance(model[3], LowPrecisionLayerNorm)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_outside_autocast_the_swapped_norms_compute_exactly_what_the_originals_do() -> None:
    plain, swapped = small_model(), small_model()
    use_low_precision_norms(swapped)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(plain(x), swapped(x))


def test_under_autocast_the_swapped_norms_compute_in_its_dtype_and_stay_close() -> None:
    # On GPUs autocast runs norms in fp32 whatever their input; the switch keeps them in bf16.
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 6)
    plain_group, plain_layer = torch.nn.GroupNorm(4, 8), torch.nn.LayerNorm(6)
    low_group, low_layer = torch.nn.GroupNorm(4, 8), torch.nn.LayerNorm(6)
    use_low_precision_norms(torch.nn.Sequential(low_group, low_layer))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = [(plain_group(x), low_group(x)), (plain_layer(x), low_layer(x))]
    for reference, low in outputs:
        assert reference.dtype == torch.float32
        assert low.dtype == torch.bfloat16
        assert torch.allclose(reference, low.float(), atol=0.05, rtol=0.02)

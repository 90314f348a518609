"""`python -m bench gpu --smoke`: the GPU script's every code path, at toy sizes on this CPU, so that it
cannot rot between the rare GPU runs.  Run as a user would, in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
SMOKE_LIMIT_S = 180  # the bound for the whole smoke run on a CPU


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench-gpu") / "gpu.json"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "bench", "gpu", "--smoke", "--device", "cpu", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=SMOKE_LIMIT_S + 60,
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result: dict[str, Any] = json.loads(out.read_text())
    result["_stdout"], result["_elapsed"] = done.stdout, elapsed
    return result


def test_smoke_fits_in_three_minutes_and_skips_nothing(smoke: dict[str, Any]) -> None:
    assert smoke["_elapsed"] < SMOKE_LIMIT_S
    assert smoke["smoke"] is True
    assert smoke["skipped"] == []


def test_captioning_sweeps_every_batch_and_measures_the_best_one_with_jpeg_decode(
    smoke: dict[str, Any],
) -> None:
    caption = smoke["captioning"]
    assert set(caption["sweep"]) == {"2", "4"}
    for window in caption["sweep"].values():
        assert window["images_per_s"] > 0
        assert len(window["images_per_s_steps"]) == smoke["timed_steps"]
        assert window["output_length"] >= caption["new_tokens"]  # min = max new tokens held
    assert caption["best_batch"] in (2, 4)
    assert caption["with_jpeg_decode"]["images_per_s"] > 0
    assert caption["with_jpeg_decode"]["batch"] == caption["best_batch"]


def test_latents_phase_is_measured(smoke: dict[str, Any]) -> None:
    assert smoke["latents"]["images_per_s"] > 0
    assert smoke["latents"]["resolution"] == 32


def test_training_measures_every_speedup_rung_at_both_resolutions(smoke: dict[str, Any]) -> None:
    from bench.gpu.measure import RUNGS

    resolutions = smoke["training"]["resolutions"]
    assert set(resolutions) == {"32", "48"}
    for entry in resolutions.values():
        assert list(entry["rungs"]) == [name for name, _ in RUNGS]
        assert all(window["images_per_s"] > 0 for window in entry["rungs"].values())
        assert entry["unet_train_flops_per_image"] > 0  # what MFU is computed from on a GPU
        assert set(entry["gain_over_previous"]) == {name for name, _ in RUNGS[1:]}


def test_a_cpu_has_no_peak_so_mfu_and_a100_equivalents_stay_empty(smoke: dict[str, Any]) -> None:
    assert smoke["bf16_peak_tflops"] is None
    rung = smoke["training"]["resolutions"]["32"]["rungs"]["baseline"]
    assert rung["mfu"] is None and rung["per_a100"] is None


def test_one_table_names_every_section(smoke: dict[str, Any]) -> None:
    table = smoke["_stdout"]
    for label in ("captioning", "latents", "training 32px", "training 48px", "+compile"):
        assert label in table


def test_peak_table_tells_h100_pcie_from_sxm_and_scales_to_a100s() -> None:
    from bench.gpu import peak_for
    from bench.gpu.measure import a100_equivalent

    assert peak_for("NVIDIA H200") == 989.0
    assert peak_for("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_for("NVIDIA H100 PCIe") == 756.0
    assert peak_for("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_for("Tesla T4") is None
    assert a100_equivalent(989.0, 989.0) == 312.0


def test_the_bench_imports_nothing_a_bare_gpu_machine_lacks() -> None:
    allowed = {"torch", "transformers", "diffusers", "numpy", "PIL", "bench"}
    code = (
        "import sys, bench.gpu, bench.gpu.measure, bench.gpu.models, bench.report\n"
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    stdlib = set(sys.stdlib_module_names) | {"_distutils_hack"}
    foreign = {m for m in loaded if m not in stdlib and not m.startswith("_")} - allowed
    # transformers and torch pull their own dependencies; what matters is none of the project's.
    assert not {"commoncanvas", "pydantic", "streaming", "rich"} & foreign

"""The model parts of a TrainRun (UNet, VAE, text encoder + tokenizer, noise scheduler) and the paper's
speed-ups, each a switch over the same modules: the training loop never branches on them.

Architectures: `tiny` is models.write_tiny_sd2's (64 px, for CPU tests); `sd2-base` is Stable Diffusion 2
base (512 px, epsilon prediction); `sd2` is Stable Diffusion 2 (768 px, v-prediction).  The UNet trains
from scratch (random weights from its config, as CommonCanvas did) unless `model.unet` names weights.
The frozen VAE and text encoder are the ones the LATENTS phase encodes with (`parts.load_encoders`:
`model.vae` / `model.textEncoder`, else SD2's release, else the tiny pipeline), so training on
precomputed latents and encoding on the fly see the same encoders.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from diffusers.training_utils import EMAModel
from torch import nn

from commoncanvas.specs.common import SpecError
from commoncanvas.specs.train import EmaSpec, Optimizations, TrainRunSpec
from commoncanvas.train.parts import load_encoders, load_part
from commoncanvas.train.world import World

log = logging.getLogger(__name__)

# Stable Diffusion 2's UNet, as its diffusers config gives it; the sample size follows the resolution.
SD2_UNET: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "attention_head_dim": (5, 10, 20, 20),
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
    "norm_num_groups": 32,
}
NOISE_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "steps_offset": 1,
}
PREDICTION = {"tiny": "epsilon", "sd2-base": "epsilon", "sd2": "v_prediction"}


@dataclass
class ModelParts:
    # Any: diffusers' and transformers' model classes are only partly typed.
    unet: Any  # diffusers.UNet2DConditionModel, trained
    vae: Any  # diffusers.AutoencoderKL, frozen
    text_encoder: Any  # transformers.CLIPTextModel, frozen
    tokenizer: Any  # transformers.CLIPTokenizer
    noise_scheduler: Any  # diffusers.DDPMScheduler

    @property
    def vae_scale_factor(self) -> int:
        return int(2 ** (len(self.vae.config.block_out_channels) - 1))


def build_model(spec: TrainRunSpec, device: torch.device) -> ModelParts:
    """The parts for `spec.model`; the UNet's random weights are seeded, the same on every rank."""
    arch = spec.model.architecture
    encoders = load_encoders(spec, device)  # eval mode, no gradients, fp32
    if spec.model.unet:
        revision = spec.model.revision or "main"
        unet = load_part(UNet2DConditionModel, spec.model.unet, arch, "unet", revision=revision)
    elif arch == "tiny":
        unet = load_part(UNet2DConditionModel, None, arch, "unet")
    else:
        torch.manual_seed(spec.schedule.seed)
        unet = UNet2DConditionModel(**SD2_UNET, sample_size=spec.resolution // 8)
    scheduler = DDPMScheduler(**NOISE_SCHEDULE, prediction_type=PREDICTION[arch])
    parts = ModelParts(unet, encoders.vae, encoders.text_encoder, encoders.tokenizer, scheduler)
    _check_fits(parts, spec.resolution)
    # The exported pipeline then generates at the training resolution by default.
    parts.unet.register_to_config(sample_size=spec.resolution // parts.vae_scale_factor)
    return parts


def _check_fits(parts: ModelParts, resolution: int) -> None:
    unet, vae, text = parts.unet.config, parts.vae.config, parts.text_encoder.config
    if unet.cross_attention_dim != text.hidden_size:
        raise SpecError(
            f"the UNet attends to {unet.cross_attention_dim}-wide text states but the text encoder gives "
            f"{text.hidden_size}: model.unet and model.textEncoder must belong together"
        )
    if unet.in_channels != vae.latent_channels:
        raise SpecError(
            f"the UNet takes {unet.in_channels} channels but the VAE's latents have {vae.latent_channels}"
        )
    if resolution % parts.vae_scale_factor:
        raise SpecError(f"resolution {resolution} is not a multiple of the VAE's {parts.vae_scale_factor}")


# --- speed-ups ---------------------------------------------------------------------------------------


def _autocast_dtype_of(tensor: torch.Tensor) -> torch.dtype | None:
    device = tensor.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def _cast(param: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if param is None else param.to(dtype)


class LowPrecisionGroupNorm(nn.GroupNorm):
    """GroupNorm in the autocast dtype.  CUDA autocast runs every norm in fp32, which for a UNet means
    casting each normalised activation to fp32 and back, ~60 times a forward: memory traffic, not math.
    These statistics sit well within bf16's range, so MosaicML's SD2 recipe keeps the norms in bf16.
    Outside autocast this is an ordinary GroupNorm.  (CPU autocast leaves norms in their input's dtype,
    so on CPUs the switch changes only norms whose input arrives in fp32.)"""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        dtype = _autocast_dtype_of(input)
        if dtype is None:
            return super().forward(input)
        with torch.autocast(input.device.type, enabled=False):
            return F.group_norm(
                input.to(dtype), self.num_groups, _cast(self.weight, dtype), _cast(self.bias, dtype), self.eps
            )


class LowPrecisionLayerNorm(nn.LayerNorm):
    """LayerNorm in the autocast dtype, for the same reason as LowPrecisionGroupNorm."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        dtype = _autocast_dtype_of(input)
        if dtype is None:
            return super().forward(input)
        with torch.autocast(input.device.type, enabled=False):
            return F.layer_norm(
                input.to(dtype),
                self.normalized_shape,
                _cast(self.weight, dtype),
                _cast(self.bias, dtype),
                self.eps,
            )


def use_low_precision_norms(module: nn.Module) -> int:
    """Swap the class of every GroupNorm/LayerNorm in place: same parameters and names, so checkpoints and
    the exported pipeline do not change.  Returns how many were swapped."""
    swapped = 0
    for child in module.modules():
        if type(child) is nn.GroupNorm:
            child.__class__ = LowPrecisionGroupNorm
            swapped += 1
        elif type(child) is nn.LayerNorm:
            child.__class__ = LowPrecisionLayerNorm
            swapped += 1
    return swapped


def configure_speedups(parts: ModelParts, opts: Optimizations, sharded: bool = False) -> None:
    """The switches that change modules in place (torch.compile and FSDP wrap them: see the loop);
    `sharded`: the UNet is about to be sharded by FSDP."""
    processor = AttnProcessor2_0() if opts.sdpa else AttnProcessor()
    parts.unet.set_attn_processor(processor)
    parts.vae.set_attn_processor(processor)
    parts.text_encoder.set_attn_implementation("sdpa" if opts.sdpa else "eager")
    if opts.low_precision_norms:
        for module in (parts.unet, parts.vae, parts.text_encoder):
            use_low_precision_norms(module)
    if opts.channels_last:
        if sharded:
            log.warning("optimizations.channelsLast is off for the UNet: FSDP shards contiguous weights only")
        else:
            parts.unet.to(memory_format=torch.channels_last)
        parts.vae.to(memory_format=torch.channels_last)
    if opts.gradient_checkpointing:
        parts.unet.enable_gradient_checkpointing()


def compiled(module: nn.Module, enabled: bool, backend: str = "inductor") -> Callable[..., Any]:
    """torch.compile of the UNet as wrapped for training (compiling the DDP wrapper lets TorchDynamo
    split the graph at DDP's bucket boundaries, so gradient all-reduces still overlap the backward)."""
    return torch.compile(module, backend=backend) if enabled else module


def autocast_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """None = full fp32.  `auto` is bf16 on GPUs (no loss scaling needed) and fp32 on CPUs."""
    if mixed_precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "no": None}[mixed_precision]


def wrap_for_training(unet: nn.Module, fsdp: str, world: World) -> nn.Module:
    """DDP (`fsdp: off`), or FSDP2 sharding each UNet block: `full` over all ranks, `shard-grad-op` the
    same but a block's gathered weights kept from its forward to its backward (mosaicml/diffusion's
    SHARD_GRAD_OP: one all-gather per block a step instead of two), `hybrid` within a node and
    replicated across nodes.  One process: the UNet itself."""
    if not world.distributed:
        if fsdp != "off":
            log.info("one process: optimizations.fsdp=%s has nothing to shard over", fsdp)
        return unet
    if fsdp == "off":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [world.device.index] if world.device.type == "cuda" else None
        return DistributedDataParallel(unet, device_ids=device_ids, gradient_as_bucket_view=True)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if fsdp == "hybrid":
        mesh = init_device_mesh(
            world.device.type, (world.nodes, world.local_size), mesh_dim_names=("replicate", "shard")
        )
    else:
        mesh = init_device_mesh(world.device.type, (world.size,))
    reshard_after_forward = fsdp != "shard-grad-op"
    model: Any = unet
    blocks: list[nn.Module] = [*model.down_blocks, model.mid_block, *model.up_blocks]
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(unet, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return unet


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
    if enabled:
        yield
        return
    no_sync = getattr(model, "no_sync", None)  # DDP
    if no_sync is not None:
        with no_sync():
            yield
        return
    set_sync = getattr(model, "set_requires_gradient_sync", None)  # FSDP2
    if set_sync is None:
        yield
        return
    set_sync(False)
    try:
        yield
    finally:
        set_sync(True)


# --- EMA ---------------------------------------------------------------------------------------------


def make_ema(unet: nn.Module, spec: EmaSpec, sharded: bool) -> EMAModel | None:
    """diffusers' EMAModel over the UNet's (possibly sharded) parameters.  Its first update copies the
    weights; its decay then ramps as (1 + n) / (10 + n) over the n-th update, capped at `ema.decay`."""
    if not spec.enabled:
        return None
    # foreach copies have no sharding rule for FSDP2's DTensors; the per-tensor path has.
    return EMAModel(unet.parameters(), decay=spec.decay, foreach=not sharded)


def ema_updates_at(step: int, spec: EmaSpec) -> bool:
    """Whether the EMA takes in the weights after optimizer step `step` (1 = the first step)."""
    return spec.enabled and step >= max(1, spec.start_step) and (step - spec.start_step) % spec.every == 0


@contextlib.contextmanager
def ema_weights_swapped_in(unet: nn.Module, ema: EMAModel | None) -> Iterator[None]:
    """Within the block the UNet holds the EMA weights (export, checkpoint); its own come back after."""
    if ema is None:
        yield
        return
    ema.store(unet.parameters())
    ema.copy_to(unet.parameters())
    try:
        yield
    finally:
        ema.restore(unet.parameters())


def inference_scheduler(parts: ModelParts) -> Any:
    """DDIM over the training noise schedule, as SD2's release samples (the last step does not
    pretend the final alpha is 1)."""
    return DDIMScheduler.from_config(parts.noise_scheduler.config, set_alpha_to_one=False)


def inference_pipeline(parts: ModelParts, unet: nn.Module) -> Any:
    """A StableDiffusionPipeline over the training modules (DDIM, like SD2's release); nothing copied."""
    # Any: diffusers' pipeline classes are only partly typed.
    pipe: Any = StableDiffusionPipeline(
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,
        unet=unet,
        scheduler=inference_scheduler(parts),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe

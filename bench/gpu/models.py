"""The architectures the bench measures, built from their configs with random (seeded) weights: throughput
does not depend on the weights, and no hub is reachable from a GPU machine.  Imports torch, transformers
and diffusers only (never commoncanvas): the GPU machine has nothing else.

FULL is the real size of each: BLIP-2 OPT-2.7B (EVA ViT-g/14 at 224 px, a 12-layer Q-Former with 32
queries, OPT-2.7B), Stable Diffusion 2 base's UNet, its VAE and its OpenCLIP ViT-H text encoder (the
penultimate of 24 layers, as SD2 uses it, so 23).  SMOKE keeps every code path at toy sizes for a CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Sizes:
    name: str  # "full" or "smoke"
    blip2: dict[str, Any]
    unet: dict[str, Any]
    vae: dict[str, Any]
    text: dict[str, Any]
    caption_input_px: int  # decoded image side before the processor's resize to the ViT's input
    caption_batches: tuple[int, ...]
    caption_tokens: int
    train_batches: dict[int, int]  # resolution -> batch
    latents_resolution: int
    latents_batch: int
    text_tokens: int = 77
    warmup: int = 2
    steps: int = 5
    compile_backend: str = "inductor"


SD2_UNET: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "attention_head_dim": (5, 10, 20, 20),
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
    "norm_num_groups": 32,
}
SD_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
}
OPENCLIP_H_TEXT: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 1024,
}
BLIP2_OPT_2_7B: dict[str, Any] = {
    "vision_config": {
        "hidden_size": 1408,
        "intermediate_size": 6144,
        "num_hidden_layers": 39,
        "num_attention_heads": 16,
        "image_size": 224,
        "patch_size": 14,
    },
    "qformer_config": {
        "vocab_size": 30522,
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "encoder_hidden_size": 1408,
        "cross_attention_frequency": 2,
    },
    "text_config": {
        "model_type": "opt",
        "vocab_size": 50272,
        "hidden_size": 2560,
        "word_embed_proj_dim": 2560,
        "ffn_dim": 10240,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "max_position_embeddings": 2048,
        "bos_token_id": 2,
        "eos_token_id": 50118,
        "pad_token_id": 1,
    },
    "num_query_tokens": 32,
    "image_token_index": 50265,
}

FULL = Sizes(
    name="full",
    blip2=BLIP2_OPT_2_7B,
    unet=SD2_UNET,
    vae=SD_VAE,
    text=OPENCLIP_H_TEXT,
    caption_input_px=512,
    caption_batches=(16, 32, 64, 128, 256),
    caption_tokens=30,
    train_batches={256: 64, 512: 16},
    latents_resolution=512,
    latents_batch=32,
)
SMOKE = Sizes(
    name="smoke",
    blip2={
        "vision_config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        "qformer_config": {
            "vocab_size": 64,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "encoder_hidden_size": 32,
            "cross_attention_frequency": 1,
        },
        "text_config": {
            "model_type": "opt",
            "vocab_size": 128,
            "hidden_size": 32,
            "word_embed_proj_dim": 32,
            "ffn_dim": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 128,
            "bos_token_id": 2,
            "eos_token_id": 3,
            "pad_token_id": 1,
        },
        "num_query_tokens": 4,
        "image_token_index": 127,
    },
    unet={
        **SD2_UNET,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "attention_head_dim": (2, 4),
        "cross_attention_dim": 32,
    },
    vae={**SD_VAE, "block_out_channels": (8, 16, 16, 16), "layers_per_block": 1, "norm_num_groups": 8},
    text={
        **OPENCLIP_H_TEXT,
        "vocab_size": 1000,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "projection_dim": 32,
    },
    caption_input_px=64,
    caption_batches=(2, 4),
    caption_tokens=4,
    train_batches={32: 2, 48: 2},
    latents_resolution=32,
    latents_batch=2,
    text_tokens=8,
    warmup=1,
    steps=2,
    compile_backend="eager",  # dynamo's tracing without inductor's minutes of C++ builds on a CPU
)

# What OPT's processor would give every image; BLIP's image mean and std (OpenAI CLIP's).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@contextlib.contextmanager
def building(device: torch.device, dtype: torch.dtype, seed: int = 0) -> Iterator[None]:
    """Create parameters straight on the device in their dtype: no host copy of a 4B-parameter model."""
    previous = torch.get_default_dtype()
    torch.manual_seed(seed)
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(previous)


def set_attention(model: Any, implementation: str) -> str:
    """transformers' attention backend ("sdpa" or "eager"), on 4.57 and 5.x alike; returns what is set."""
    with contextlib.suppress(AttributeError, ValueError, ImportError):
        model.set_attn_implementation(implementation)
    return str(getattr(model.config, "_attn_implementation", None) or implementation)


def blip2(sizes: Sizes, device: torch.device, dtype: torch.dtype) -> Any:
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    spec = dict(sizes.blip2)
    image_token = spec.pop("image_token_index")
    config = Blip2Config(**spec)
    # 4.57 reads image_token_index, 5.x image_token_id; where one aliases the other both land the same.
    for name in ("image_token_index", "image_token_id"):
        with contextlib.suppress(AttributeError):
            setattr(config, name, image_token)
    with building(device, dtype):
        model = Blip2ForConditionalGeneration(config)
    # from_pretrained keeps these in fp32 whatever dtype is asked for; so do we.
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, param in model.named_parameters():
        if any(part in keep for part in name.split(".")):
            param.data = param.data.float()
    set_attention(model, "sdpa")
    return model.eval().requires_grad_(False)


def unet(sizes: Sizes, resolution: int, device: torch.device) -> Any:
    from diffusers import UNet2DConditionModel

    with building(device, torch.float32):  # trained: fp32 master weights under bf16 autocast
        return UNet2DConditionModel(**sizes.unet, sample_size=resolution // 8)


def vae(sizes: Sizes, device: torch.device, dtype: torch.dtype) -> Any:
    from diffusers import AutoencoderKL

    with building(device, dtype):
        return AutoencoderKL(**sizes.vae).eval().requires_grad_(False)


def text_encoder(sizes: Sizes, device: torch.device, dtype: torch.dtype) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    with building(device, dtype):
        model = CLIPTextModel(CLIPTextConfig(**sizes.text))
    return model.eval().requires_grad_(False)


def set_unet_attention(module: Any, sdpa: bool) -> None:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    module.set_attn_processor(AttnProcessor2_0() if sdpa else AttnProcessor())


class _LowPrecisionGroupNorm(nn.GroupNorm):
    # CUDA autocast runs norms in fp32: a cast of every activation there and back, memory traffic only.
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _autocast_dtype(x)
        if dtype is None:
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            w = None if self.weight is None else self.weight.to(dtype)
            b = None if self.bias is None else self.bias.to(dtype)
            return F.group_norm(x.to(dtype), self.num_groups, w, b, self.eps)


class _LowPrecisionLayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _autocast_dtype(x)
        if dtype is None:
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            w = None if self.weight is None else self.weight.to(dtype)
            b = None if self.bias is None else self.bias.to(dtype)
            return F.layer_norm(x.to(dtype), self.normalized_shape, w, b, self.eps)


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


def low_precision_norms(module: nn.Module) -> int:
    """Norms in the autocast dtype (MosaicML's SD2 recipe); same parameters, so swapped in place."""
    swapped = 0
    for child in module.modules():
        if type(child) is nn.GroupNorm:
            child.__class__ = _LowPrecisionGroupNorm
            swapped += 1
        elif type(child) is nn.LayerNorm:
            child.__class__ = _LowPrecisionLayerNorm
            swapped += 1
    return swapped


def noise_schedule(device: torch.device) -> torch.Tensor:
    """SD2's training schedule (scaled linear betas 0.00085-0.012 over 1000 steps): alphas_cumprod."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).to(device=device, dtype=torch.float32)

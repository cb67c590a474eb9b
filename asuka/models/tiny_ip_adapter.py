"""Tiny IP-Adapter and IP-Adapter-Plus weights with random values, in the published file layout (no downloads).

:func:`save_tiny_ip_adapter` writes a folder laid out like ``h94/IP-Adapter``::

    <folder>/models/ip-adapter_sd15.safetensors        IP-Adapter      (linear image projection, 4 tokens)
    <folder>/models/ip-adapter-plus_sd15.safetensors   IP-Adapter-Plus (Perceiver resampler, patch tokens)
    <folder>/models/image_encoder/                     a tiny CLIPVisionModelWithProjection (save_pretrained)

The weight files use the original repository's key names (``image_proj.*`` and ``ip_adapter.<id>.to_k_ip`` /
``to_v_ip`` with ids 1, 3, 5, ... over the UNet's cross-attention layers in ``attn_processors`` order), so they
load through diffusers' real ``pipe.load_ip_adapter(folder, subfolder="models", weight_name=...)`` and its key
converters, which check every shape strictly. :func:`load_tiny_ip_adapter` does that call.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from asuka.models.seeding import seeded

SUBFOLDER = "models"
IMAGE_ENCODER_FOLDER = "image_encoder"
WEIGHT_NAMES = {
    "ip-adapter": "ip-adapter_sd15.safetensors",
    "ip-adapter-plus": "ip-adapter-plus_sd15.safetensors",
}
IMAGE_SIZE = 32  # the tiny image encoder's input size (the pipeline's CLIPImageProcessor resizes to it)
_VISION_WIDTH = 32
_PROJECTION_DIM = 16
_PLUS_HIDDEN = 64  # diffusers derives the resampler's heads as to_q rows // 64
_PLUS_DEPTH = 4  # diffusers builds the resampler with its default depth of 4
_PLUS_QUERIES = 4


def tiny_image_encoder(seed: int = 0) -> CLIPVisionModelWithProjection:
    """CLIP vision tower at width 32 (2 layers, 32x32 images, 8x8 patches: 17 tokens), projection 16."""
    config = CLIPVisionConfig(hidden_size=_VISION_WIDTH, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=8,
                              projection_dim=_PROJECTION_DIM)
    with seeded(seed):
        return CLIPVisionModelWithProjection(config).eval()


def _linear(gen: torch.Generator, out_features: int, in_features: int) -> torch.Tensor:
    return torch.randn(out_features, in_features, generator=gen) / in_features**0.5


def _layer_norm(gen: torch.Generator, prefix: str, dim: int) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": 1 + 0.1 * torch.randn(dim, generator=gen),
            f"{prefix}.bias": 0.1 * torch.randn(dim, generator=gen)}


def _ip_adapter_layers(gen: torch.Generator, unet) -> dict[str, torch.Tensor]:
    """``<id>.to_k_ip.weight`` / ``<id>.to_v_ip.weight`` for every cross-attention layer (ids 1, 3, 5, ...)."""
    cross_dim = unet.config.cross_attention_dim
    out, key_id = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        hidden = unet.get_submodule(name.removesuffix(".processor")).to_k.out_features
        out[f"{key_id}.to_k_ip.weight"] = _linear(gen, hidden, cross_dim)
        out[f"{key_id}.to_v_ip.weight"] = _linear(gen, hidden, cross_dim)
        key_id += 2
    return out


def _image_proj_plain(gen: torch.Generator, cross_dim: int) -> dict[str, torch.Tensor]:
    """IP-Adapter's ``ImageProjModel``: linear to 4 tokens, then LayerNorm."""
    return {"proj.weight": _linear(gen, 4 * cross_dim, _PROJECTION_DIM),
            "proj.bias": 0.1 * torch.randn(4 * cross_dim, generator=gen),
            **_layer_norm(gen, "norm", cross_dim)}


def _image_proj_plus(gen: torch.Generator, cross_dim: int) -> dict[str, torch.Tensor]:
    """IP-Adapter-Plus's ``Resampler`` (Perceiver attention + feed-forward blocks), original key names."""
    h = _PLUS_HIDDEN
    out = {"latents": torch.randn(1, _PLUS_QUERIES, h, generator=gen) / h**0.5,
           "proj_in.weight": _linear(gen, h, _VISION_WIDTH), "proj_in.bias": 0.1 * torch.randn(h, generator=gen),
           "proj_out.weight": _linear(gen, cross_dim, h), "proj_out.bias": 0.1 * torch.randn(cross_dim, generator=gen),
           **_layer_norm(gen, "norm_out", cross_dim)}
    for i in range(_PLUS_DEPTH):
        out.update(_layer_norm(gen, f"layers.{i}.0.norm1", h))
        out.update(_layer_norm(gen, f"layers.{i}.0.norm2", h))
        out[f"layers.{i}.0.to_q.weight"] = _linear(gen, h, h)
        out[f"layers.{i}.0.to_kv.weight"] = _linear(gen, 2 * h, h)
        out[f"layers.{i}.0.to_out.weight"] = _linear(gen, h, h)
        out.update(_layer_norm(gen, f"layers.{i}.1.0", h))
        out[f"layers.{i}.1.1.weight"] = _linear(gen, 4 * h, h)
        out[f"layers.{i}.1.3.weight"] = _linear(gen, h, 4 * h)
    return out


def save_tiny_ip_adapter(folder: str | Path, unet, seed: int = 0) -> Path:
    """Write tiny IP-Adapter and IP-Adapter-Plus weights fitting ``unet`` (plus their image encoder) to ``folder``."""
    folder = Path(folder)
    models = folder / SUBFOLDER
    models.mkdir(parents=True, exist_ok=True)
    tiny_image_encoder(seed).save_pretrained(models / IMAGE_ENCODER_FOLDER, safe_serialization=True)
    cross_dim = unet.config.cross_attention_dim
    for offset, (variant, image_proj) in enumerate((("ip-adapter", _image_proj_plain),
                                                     ("ip-adapter-plus", _image_proj_plus))):
        gen = torch.Generator().manual_seed(seed * 2 + offset)
        tensors = {f"image_proj.{k}": v for k, v in image_proj(gen, cross_dim).items()}
        tensors.update({f"ip_adapter.{k}": v for k, v in _ip_adapter_layers(gen, unet).items()})
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(models / WEIGHT_NAMES[variant]))
    return folder


def load_tiny_ip_adapter(pipe, folder: str | Path, variant: str = "ip-adapter") -> None:
    """``pipe.load_ip_adapter`` on a folder from :func:`save_tiny_ip_adapter`; variant "ip-adapter" or "ip-adapter-plus"."""
    if variant not in WEIGHT_NAMES:
        raise ValueError(f"variant must be one of {sorted(WEIGHT_NAMES)}, got {variant!r}")
    pipe.load_ip_adapter(str(folder), subfolder=SUBFOLDER, weight_name=WEIGHT_NAMES[variant])

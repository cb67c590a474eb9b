"""Tiny, seeded, *real* adapters for the tiny Stable Diffusion UNet of :mod:`asuka.models.tiny` (tests, demos):
a ``ControlNetModel``, a ``T2IAdapter`` and a LoRA file, all with random weights, written with the real
``save_pretrained`` / ``save_lora_weights`` and read back with diffusers' own loaders (``from_pretrained``,
``load_lora_weights``). No downloads.

ControlNet's output convolutions and a LoRA's up-projections are zero-initialised in real training, which would make
a random adapter a no-op; here they get small random values so that the adapters visibly change the UNet's output.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import ControlNetModel, T2IAdapter, UNet2DConditionModel

from asuka.models.seeding import seeded

CONDITIONING_CHANNELS = (8, 16, 32, 32)  # 3 downsamplings: the VAE's factor 8
_ZERO_INIT_STD = 0.05
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def _default_unet() -> UNet2DConditionModel:
    from asuka.models.tiny import tiny_unet

    return tiny_unet(in_channels=4)


def tiny_controlnet(unet: UNet2DConditionModel | None = None, seed: int = 0) -> ControlNetModel:
    """A ``ControlNetModel`` for ``unet`` (default: the tiny 4-channel SD UNet): its encoder copied from ``unet`` as
    ``ControlNetModel.from_unet`` does, the zero convolutions randomised."""
    unet = unet or _default_unet()
    with seeded(seed):
        net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CONDITIONING_CHANNELS)
        zero_convs = [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]
        for conv in zero_convs:
            torch.nn.init.normal_(conv.weight, std=_ZERO_INIT_STD)
            torch.nn.init.normal_(conv.bias, std=_ZERO_INIT_STD)
    return net.eval()


def tiny_t2i_adapter(unet: UNet2DConditionModel | None = None, seed: int = 0) -> T2IAdapter:
    """A full ``T2IAdapter`` whose feature widths are ``unet``'s block widths (one residual per down block)."""
    unet = unet or _default_unet()
    with seeded(seed):
        return T2IAdapter(in_channels=3, channels=list(unet.config.block_out_channels), num_res_blocks=1,
                          downscale_factor=8, adapter_type="full_adapter").eval()


def save_tiny_controlnet(path: str | Path, unet: UNet2DConditionModel | None = None, seed: int = 0) -> Path:
    """Write :func:`tiny_controlnet` with ``save_pretrained`` (load it with ``ControlNetModel.from_pretrained``)."""
    tiny_controlnet(unet, seed).save_pretrained(path, safe_serialization=True)
    return Path(path)


def save_tiny_t2i_adapter(path: str | Path, unet: UNet2DConditionModel | None = None, seed: int = 0) -> Path:
    """Write :func:`tiny_t2i_adapter` with ``save_pretrained`` (load it with ``T2IAdapter.from_pretrained``)."""
    tiny_t2i_adapter(unet, seed).save_pretrained(path, safe_serialization=True)
    return Path(path)


def save_tiny_lora(path: str | Path, unet: UNet2DConditionModel | None = None, rank: int = 4, seed: int = 0) -> Path:
    """Write a random rank-``rank`` LoRA on the attention projections of ``unet``'s architecture (``unet`` itself is
    not modified) as ``<path>/pytorch_lora_weights.safetensors`` through ``save_lora_weights``; a Stable Diffusion
    pipeline loads it with ``pipe.load_lora_weights(path)``. Needs ``peft``."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    config = (unet or _default_unet()).config
    with seeded(seed):
        host = UNet2DConditionModel.from_config(config)
        host.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(LORA_TARGETS),
                                    init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(path, unet_lora_layers=get_peft_model_state_dict(host),
                                              weight_name=LORA_WEIGHT_NAME, safe_serialization=True)
    return Path(path)

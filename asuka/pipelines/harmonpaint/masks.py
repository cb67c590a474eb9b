"""HarmonPaint's token masks (paper §III-B, "resize the given binary mask to match the dimensions of the
self-attention map ... flatten M into M_f"): the latent-resolution mask resized to every U-Net token grid.

The paper does not say how the mask is resized; three modes are offered (default ``area``):

* ``area``: the fraction of each token's footprint that is hole, thresholded at 0.5 (keeps ``M_f`` binary,
  which MAKVS needs);
* ``nearest``: ``F.interpolate(mode="nearest")``, as diffusers resizes the pixel mask to the latent;
* ``maxpool``: a token is hole when any part of its footprint is ("any-covered").

Stable Diffusion downsamples with stride-2 convolutions (padding 1), so every level is ``ceil(previous / 2)``;
masks are keyed by the token count ``N = H * W`` of their level (distinct across levels) and flattened row-major,
like diffusers' ``Transformer2DModel`` (``(B, C, H, W) -> (B, H*W, C)``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MASK_RESIZE_MODES = ("area", "nearest", "maxpool")
UNET_LEVELS = 4  # SD's U-Net token grids: latent, latent/2, latent/4 and the mid block's latent/8


def level_sizes(height: int, width: int, levels: int = UNET_LEVELS) -> list[tuple[int, int]]:
    """The token grid ``(H, W)`` of each U-Net level for a latent of ``height x width`` (``ceil(/2)`` per level)."""
    sizes = [(height, width)]
    for _ in range(levels - 1):
        h, w = sizes[-1]
        sizes.append(((h + 1) // 2, (w + 1) // 2))
    return sizes


def resize_token_mask(latent_mask: torch.Tensor, size: tuple[int, int], mode: str = "area") -> torch.Tensor:
    """``latent_mask`` (B, 1, h, w) with 1 = hole -> binary mask (B, H*W) at token grid ``size``, row-major."""
    if mode not in MASK_RESIZE_MODES:
        raise ValueError(f"mask_resize must be one of {MASK_RESIZE_MODES}, got {mode!r}")
    m = (latent_mask >= 0.5).to(torch.float32)
    if mode == "area":
        m = (F.adaptive_avg_pool2d(m, size) >= 0.5).to(torch.float32)
    elif mode == "maxpool":
        m = F.adaptive_max_pool2d(m, size)
    else:
        m = F.interpolate(m, size=size, mode="nearest")
    return m.flatten(1)


def token_mask_pyramid(latent_mask: torch.Tensor, mode: str = "area",
                       levels: int = UNET_LEVELS) -> dict[int, torch.Tensor]:
    """``{N: M_f (B, N)}`` for every U-Net level of ``latent_mask`` (B, 1, h, w), 1 = hole, binary float32."""
    h, w = latent_mask.shape[-2:]
    return {hh * ww: resize_token_mask(latent_mask, (hh, ww), mode) for hh, ww in level_sizes(h, w, levels)}


def soft_mask(mask: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 7: ``(1 - tau) * M_f + tau / N`` (label smoothing) for a binary ``mask`` (..., N)."""
    return (1.0 - tau) * mask + tau / mask.shape[-1]

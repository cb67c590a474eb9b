"""HarmonPaint's token masks (paper §IV-A: "resize the given binary mask to match the dimensions of the
self-attention map ... flatten M into M_f") and the soft mask of Eq. 7.

The paper does not say how the mask is resized; three modes are offered (default ``area``):

* ``area``: the fraction of each token's footprint that is hole, thresholded at 0.5 (keeps ``M_f`` binary,
  which MAKVS needs);
* ``nearest``: ``F.interpolate(mode="nearest")``, as diffusers resizes the pixel mask to the latent;
* ``maxpool``: a token is hole when any part of its footprint is ("any-covered").

The grids are the U-Net's (``ceil(/2)`` per level, see :meth:`asuka.attention.AttentionLayer.grid`); tokens are
flattened row-major by :class:`asuka.attention.TokenMasks`, like diffusers' ``Transformer2DModel``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from asuka.pipelines.harmonpaint.options import MASK_RESIZE_MODES


def resize_mask_to_grid(latent_mask: torch.Tensor, size: tuple[int, int], mode: str = "area") -> torch.Tensor:
    """``latent_mask`` (B, 1, h, w), 1 = hole -> binary float mask (B, 1, H, W) on the token grid ``size``."""
    if mode not in MASK_RESIZE_MODES:
        raise ValueError(f"mask_resize must be one of {MASK_RESIZE_MODES}, got {mode!r}")
    m = (latent_mask >= 0.5).to(torch.float32)
    if mode == "area":
        return (F.adaptive_avg_pool2d(m, size) >= 0.5).to(torch.float32)
    if mode == "maxpool":
        return F.adaptive_max_pool2d(m, size)
    return F.interpolate(m, size=size, mode="nearest")


def soft_mask(mask: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 7: ``(1 - tau) * M_f + tau / N`` (label smoothing) for a binary ``mask`` (..., N)."""
    return (1.0 - tau) * mask + tau / mask.shape[-1]

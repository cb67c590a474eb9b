"""Tensor helpers shared by the pipelines, metrics, data and trainers (torch only: no file I/O, no PIL).

Conventions: images are float ``(B, 3, H, W)`` in ``[-1, 1]``; masks are float ``(B, 1, H, W)`` in ``{0, 1}``,
1 = hole, a pixel being a hole when ``value >= MASK_THRESHOLD``. Loading files and arrays into these conventions
is :mod:`asuka.pipelines._common`'s job.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from asuka.errors import InputError

MASK_THRESHOLD = 0.5
"""A mask pixel is a hole when its value on the [0, 1] scale is >= this (>= 128 for uint8)."""

DEFAULT_MULTIPLE = 8


# ------------------------------------------------------------------------------------------------- sizes
Pad = tuple[int, int, int, int]  # F.pad order: (left, right, top, bottom)


def pad_to_multiple(x: torch.Tensor, multiple: int = DEFAULT_MULTIPLE,
                    mode: str = "reflect") -> tuple[torch.Tensor, Pad]:
    """Pad ``x`` (B,C,H,W) on the bottom/right so H and W are multiples of ``multiple``.

    ``mode="reflect"`` for images (falls back to ``replicate`` where the image is too small to reflect),
    ``mode="constant"`` (zeros) for masks. Returns the padded tensor and the pad for :func:`crop_padding`.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1; got {multiple}")
    h, w = x.shape[-2:]
    pad = (0, (-w) % multiple, 0, (-h) % multiple)
    if pad == (0, 0, 0, 0):
        return x, pad
    if mode == "reflect" and (pad[1] >= w or pad[3] >= h):
        mode = "replicate"
    return F.pad(x, pad, mode=mode), pad


def crop_padding(x: torch.Tensor, pad: Pad) -> torch.Tensor:
    """Undo :func:`pad_to_multiple`."""
    left, right, top, bottom = pad
    h, w = x.shape[-2:]
    return x[..., top:h - bottom, left:w - right]


def resize_image(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize images (B,3,H,W) in [-1,1] to ``size`` = (H, W): bicubic, antialiased, clamped to [-1, 1]."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)


def resize_mask(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize masks (B,1,H,W) to ``size``: a pixel is a hole when any hole pixel falls in it (area > 0),
    so thin strokes survive downscaling; upscaling is nearest-neighbour."""
    if tuple(m.shape[-2:]) == tuple(size):
        return m
    return F.interpolate(m, size=size, mode="area").gt(0).to(m.dtype)


def paste_back(output: torch.Tensor, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Known pixels from ``image``, hole pixels (mask >= 0.5) from ``output``; exact (a select, no blending)."""
    if output.shape != image.shape:
        raise InputError(f"output: shape {tuple(output.shape)} differs from the image's {tuple(image.shape)}")
    return torch.where(mask.to(image.device) >= MASK_THRESHOLD, output.to(image), image)


# ------------------------------------------------------------------------------------------------ uint8
def to_numpy_uint8(x: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1], (B,3,H,W) -> uint8 (B,H,W,3), or (3,H,W) -> (H,W,3); exact inverse of 8-bit loading."""
    if x.ndim not in (3, 4) or x.shape[-3] != 3:
        raise InputError(f"to_numpy_uint8: expected (3,H,W) or (B,3,H,W) images; got shape {tuple(x.shape)}")
    return to_uint8(x).movedim(-3, -1).cpu().numpy()


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8 tensor in [0, 255], same shape and device (clamped, rounded to nearest)."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


__all__ = ["MASK_THRESHOLD", "DEFAULT_MULTIPLE", "Pad", "pad_to_multiple", "crop_padding", "resize_image",
           "resize_mask", "paste_back", "to_uint8", "to_numpy_uint8"]

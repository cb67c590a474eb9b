"""Stitched reference | target inputs (paper Sec. 3.1; official ``corr_guided.py``): the reference on the left, the
target on the right, the hole mask zero on the whole reference half; the output is the target half."""

from __future__ import annotations

import torch

from asuka.errors import InputError


def check_pair(reference: torch.Tensor, image: torch.Tensor) -> None:
    """A reference must have the target's size, and the halves must be square (CorrFill's grids are square)."""
    if reference.shape[-2:] != image.shape[-2:]:
        raise InputError(f"size {tuple(reference.shape[-2:])} differs from the image's "
                         f"{tuple(image.shape[-2:])}; pass a reference of the image's size (CorrFill stitches them "
                         "side by side)")
    if reference.shape[0] != image.shape[0]:
        raise InputError(f"{reference.shape[0]} reference image(s) for {image.shape[0]} image(s); pass one reference per "
                         "image", "inputs.reference")
    height, width = image.shape[-2:]
    if height != width:
        raise InputError(f"CorrFill needs square images (it matches square token grids), got {height}x{width} "
                         "(height x width as the model sees it, after any padding to multiples of 64); crop or resize "
                         "to a square (the paper uses 512x512)", "image")


def stitch(reference: torch.Tensor, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(reference | image, 0 | mask)``: ``(B,3,H,2W)`` and ``(B,1,H,2W)`` from ``(B,3,H,W)``, ``(B,1,H,W)``."""
    check_pair(reference, image)
    return torch.cat([reference, image], -1), torch.cat([torch.zeros_like(mask), mask], -1)


def target_half(stitched: torch.Tensor) -> torch.Tensor:
    """The right (target) half of a stitched image or latent."""
    return stitched[..., stitched.shape[-1] // 2:]

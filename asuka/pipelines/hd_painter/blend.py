"""Poisson blending of an inpainted image into the original (paper §3.2, after the super-resolution; official
``src/utils/__init__.py::poisson_blend``: ``cv2.seamlessClone`` with ``NORMAL_CLONE``, mask dilated by a 48x48 box,
32-px reflect padding whose border is taken from the inpainted image)."""

from __future__ import annotations

import cv2
import numpy as np

POISSON_DILATION = 48
POISSON_PAD = 32


def poisson_blend(original: np.ndarray, inpainted: np.ndarray, mask: np.ndarray, *, dilation: int = POISSON_DILATION,
                  pad: int = POISSON_PAD) -> np.ndarray:
    """Blend ``inpainted`` into ``original`` over the mask (all uint8, ``(H, W, 3)`` images and an ``(H, W)`` mask,
    non-zero = hole) by solving Poisson's equation with ``cv2.seamlessClone`` (NORMAL_CLONE).

    Both images are reflect-padded by ``pad`` px and the padded border of the original is replaced by the inpainted
    image's; the zero-padded mask is dilated with a ``dilation`` x ``dilation`` box. OpenCV solves over the bounding
    box of the dilated mask with the original as boundary, so pixels outside that box are exactly the original's.
    An empty mask returns a copy of the original (OpenCV rejects an empty region).
    """
    if original.shape != inpainted.shape or original.shape[:2] != mask.shape[:2]:
        raise ValueError(f"poisson_blend: shapes differ: original {original.shape}, inpainted {inpainted.shape}, "
                         f"mask {mask.shape}")
    if not mask.any():
        return original.copy()
    widths = ((pad, pad), (pad, pad), (0, 0))
    fake = np.pad(inpainted, widths, mode="reflect")
    orig = np.pad(original, widths, mode="reflect")
    border = np.ones(orig.shape[:2], dtype=bool)
    border[pad:-pad, pad:-pad] = False
    orig[border] = fake[border]
    holes = np.pad((mask > 0).astype(np.uint8) * 255, widths[:2], mode="constant")
    holes = cv2.dilate(holes, np.ones((dilation, dilation), np.uint8), iterations=1)
    x, y, w, h = cv2.boundingRect(holes)
    center = (x + w // 2, y + h // 2)
    out = cv2.seamlessClone(np.ascontiguousarray(fake), np.ascontiguousarray(orig), holes, center, cv2.NORMAL_CLONE)
    return out[pad:-pad, pad:-pad]

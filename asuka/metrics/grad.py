"""Boundary gradient error "Grad" (ASUKA ``eval/cal_grad.py``, official repository).

For each RGB channel on the [0, 255] scale: the 3×3 Sobel gradients (``cv2.CV_64F``) of the prediction
minus those of the ground truth, their magnitude ``sqrt(dx² + dy²)``, averaged over the pixels that
``cv2.Canny(mask, 100, 200)`` marks as edges of the hole mask (uint8, 255 = hole). The image's score is
the mean over the three channels; lower is better (a seam at the hole border raises it).
ASUKA scores 0 for an image whose mask has no edge (``empty_edge="zero"``, used by ``--protocol asuka``); by
default such an image scores NaN (``empty_edge="nan"``) so that aggregates (nan-mean) do not count it as perfect. The mask is the binary mask of the evaluation protocol
(threshold 0.5, as for compositing); MISATO masks are binary, so this equals ASUKA's raw-mask Canny.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

CANNY_THRESHOLDS = (100, 200)


def mask_edges(mask: np.ndarray) -> np.ndarray:
    """Boolean (H,W) Canny edges of a binary hole mask given as (H,W) {0,1} or bool."""
    return cv2.Canny((np.asarray(mask) > 0.5).astype(np.uint8) * 255, *CANNY_THRESHOLDS) > 0


EMPTY_EDGE = {"nan": float("nan"), "zero": 0.0}


def boundary_gradient_np(pred: np.ndarray, target: np.ndarray, mask: np.ndarray, empty_edge: str = "nan") -> float:
    """Grad for one image: ``pred``/``target`` (H,W,3) float on the [0,255] scale, ``mask`` (H,W), 1 = hole;
    ``empty_edge`` is the score of a mask without an edge (``"nan"``: undefined; ``"zero"``: ASUKA's)."""
    edges = mask_edges(mask)
    if not edges.any():
        return EMPTY_EDGE[empty_edge]
    diffs = []
    for c in range(pred.shape[-1]):
        p = np.ascontiguousarray(pred[..., c], dtype=np.float64)
        t = np.ascontiguousarray(target[..., c], dtype=np.float64)
        dx = cv2.Sobel(p, cv2.CV_64F, 1, 0, ksize=3) - cv2.Sobel(t, cv2.CV_64F, 1, 0, ksize=3)
        dy = cv2.Sobel(p, cv2.CV_64F, 0, 1, ksize=3) - cv2.Sobel(t, cv2.CV_64F, 0, 1, ksize=3)
        diffs.append(np.sqrt(dx ** 2 + dy ** 2)[edges].mean())
    return float(np.mean(diffs))


def boundary_gradient(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *,
                      empty_edge: str = "nan") -> torch.Tensor:
    """Per-image Grad (B,) float64 for images (B,3,H,W) in [-1,1] and masks (B,1,H,W) with 1 = hole
    (``empty_edge``: see :func:`boundary_gradient_np`)."""
    if empty_edge not in EMPTY_EDGE:
        raise ValueError(f"empty_edge must be one of {sorted(EMPTY_EDGE)}, got {empty_edge!r}.")
    if pred.ndim != 4 or pred.shape != target.shape or pred.shape[1] != 3:
        raise ValueError(f"pred and target must both be (B,3,H,W), got {tuple(pred.shape)} and {tuple(target.shape)}.")
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[-2:] != pred.shape[-2:] or mask.shape[0] != pred.shape[0]:
        raise ValueError(f"mask must be (B,1,H,W) matching pred {tuple(pred.shape)}, got {tuple(mask.shape)}.")
    to255 = lambda x: ((x.detach().double().cpu() + 1.0) * 127.5).permute(0, 2, 3, 1).numpy()  # noqa: E731
    p, t, m = to255(pred), to255(target), mask.detach().cpu().numpy()[:, 0]
    return torch.tensor([boundary_gradient_np(p[i], t[i], m[i], empty_edge) for i in range(p.shape[0])],
                        dtype=torch.float64)

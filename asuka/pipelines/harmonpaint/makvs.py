"""MAKVS, the Mask-Adjusted Key-Value Strategy (paper §III-C, Eqs. 10-13), as a pure function of ``q, k, v``.

The unmasked region is the style reference: ``K~`` (Eq. 10) equals ``K`` at unmasked tokens and the mean key
``K_bar`` of the unmasked tokens at masked ones (``V~`` likewise). ``concat`` mode (Eqs. 11-12, the paper's
method) attends over ``2N`` keys ``[K; lam * K~]`` with values ``[V; V~]``; ``lam`` scales only the appended keys.
``naive`` mode (Eq. 13, the Fig. 3 ablation) replaces the keys instead: ``softmax(q K~^T) V~`` (Eq. 13 has no
``lam``; the value it is used with is not stated, ``V~`` is taken here).

Statistics are per sample (the two CFG halves are separate samples) and per layer, computed at every call; a
per-head mean equals the mean before the head split, since the mean is linear. A sample whose mask is empty (no
hole: nothing to harmonise) or full (no unmasked token: the mean is undefined) must bypass MAKVS: see
:func:`makvs_applicable`, evaluated once per call by the caller. ``lam = 0`` is treated as "MAKVS off" by the
caller too: the paper calls it inactive, but under the literal Eq. 11 the appended keys would still draw mass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAKVS_MODES = ("concat", "naive")


def makvs_applicable(mask: torch.Tensor) -> torch.Tensor:
    """Per sample (bool, (B,)): does the binary ``mask`` (B, N) have at least one hole and one known token?"""
    hole = mask > 0.5
    return hole.any(-1) & ~hole.all(-1)


def mask_adjusted(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 10: ``x`` (B, heads, N, d) with every hole token replaced by the sample's mean over known tokens."""
    hole = (mask > 0.5)[:, None, :, None]
    known = (~hole).to(x.dtype)
    mean = (x * known).sum(-2, keepdim=True) / known.sum(-2, keepdim=True)
    return torch.where(hole, mean, x)


def makvs_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, lam: float = 1.4,
                    mode: str = "concat", scale: float | None = None) -> torch.Tensor:
    """MAKVS attention for ``q, k, v`` (B, heads, N, d) and a binary ``mask`` (B, N), 1 = hole, with at least
    one hole and one known token per sample. Returns (B, heads, N, d)."""
    k_t, v_t = mask_adjusted(k, mask), mask_adjusted(v, mask)
    if mode == "concat":
        return F.scaled_dot_product_attention(q, torch.cat([k, lam * k_t], dim=-2), torch.cat([v, v_t], dim=-2),
                                              scale=scale)
    if mode == "naive":
        return F.scaled_dot_product_attention(q, k_t, v_t, scale=scale)
    raise ValueError(f"makvs_mode must be one of {MAKVS_MODES}, got {mode!r}")

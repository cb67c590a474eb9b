"""SAMS, the Self-Attention Masking Strategy (paper §III-B, Eqs. 4-7), as a pure function of ``q, k, v``.

The post-softmax self-attention map ``A`` is reweighted elementwise, **without renormalisation**:
``f' = (W ⊙ A) V``. For the paper's variant (``obj_bg``, suppress object<->background interaction)
``W = m m^T + (1 - m)(1 - m)^T`` with the soft mask ``m = (1 - tau) M_f + tau / N`` of Eq. 7. The Fig. 7
ablations are ``bg_bg`` (``W = 1 1^T - (1 - m)(1 - m)^T``) and ``obj_obj`` (``W = 1 1^T - m m^T``); the soft
mask replaces ``M_f`` in every variant, as Eq. 7 does for Eqs. 4-5.

``W`` is a signed sum of two symmetric rank-1 terms ``s_r w_r w_r^T``, so

    (W ⊙ A) V = sum_r s_r w_r ⊙ (A (w_r ⊙ V))

is one ``scaled_dot_product_attention`` call with the values ``[w_1 ⊙ V, w_2 ⊙ V]`` concatenated along the
channel axis (value dim 2d), then a weighted sum of the two halves: exact, and the N x N map is never formed.
Note that a ``log W`` attention bias would be renormalised by the softmax and is a different operator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from asuka.pipelines.harmonpaint.masks import soft_mask

SAMS_VARIANTS = ("obj_bg", "bg_bg", "obj_obj")


def sams_terms(mask: torch.Tensor, tau: float, variant: str = "obj_bg") -> tuple[tuple[float, torch.Tensor], ...]:
    """``W = sum_r s_r w_r w_r^T`` as ``((s_1, w_1), (s_2, w_2))`` with ``w_r`` shaped like ``mask`` (..., N)."""
    m = soft_mask(mask, tau)
    if variant == "obj_bg":
        return (1.0, m), (1.0, 1.0 - m)
    ones = torch.ones_like(m)
    if variant == "bg_bg":
        return (1.0, ones), (-1.0, 1.0 - m)
    if variant == "obj_obj":
        return (1.0, ones), (-1.0, m)
    raise ValueError(f"sams_variant must be one of {SAMS_VARIANTS}, got {variant!r}")


def sams_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, tau: float = 0.1,
                   variant: str = "obj_bg", scale: float | None = None) -> torch.Tensor:
    """``(W ⊙ softmax(q k^T * scale)) v`` for ``q, k, v`` (B, heads, N, d) and a binary ``mask`` (B or 1, N),
    1 = hole; ``scale`` defaults to ``1/sqrt(d)``. Returns (B, heads, N, d) in ``v``'s dtype."""
    d = v.shape[-1]
    (s1, w1), (s2, w2) = sams_terms(mask.to(v.dtype), tau, variant)
    w1, w2 = w1[:, None, :, None], w2[:, None, :, None]  # (B or 1, 1, N, 1): the same weights for every head
    out = F.scaled_dot_product_attention(q, k, torch.cat([w1 * v, w2 * v], dim=-1), scale=scale)
    return s1 * w1 * out[..., :d] + s2 * w2 * out[..., d:]

"""SAMS, the Self-Attention Masking Strategy (paper §IV-A, Eqs. 4-7), as a low-rank post-softmax weight.

The post-softmax self-attention map ``A`` is reweighted elementwise, **without renormalisation**:
``f' = (W ⊙ A) V``. For the paper's variant (``obj_bg``, suppress object<->background interaction)
``W = m m^T + (1 - m)(1 - m)^T`` with the soft mask ``m = (1 - tau) M_f + tau / N`` of Eq. 7. The Fig. 7
ablations are ``bg_bg`` (``W = 1 1^T - (1 - m)(1 - m)^T``) and ``obj_obj`` (``W = 1 1^T - m m^T``); the soft
mask replaces ``M_f`` in every variant, as Eq. 7 does for Eqs. 4-5.

``W`` has rank 2, ``W = rows @ cols^T``, so ``(W ⊙ A) V`` is evaluated exactly as one SDPA call by
:func:`asuka.attention.weighted_sdpa` and the N x N map is never formed. (A ``log W`` attention bias would be
renormalised by the softmax: a different operator.)
"""

from __future__ import annotations

import torch

from asuka.pipelines.harmonpaint.masks import soft_mask
from asuka.pipelines.harmonpaint.options import SAMS_VARIANTS


def sams_factors(mask: torch.Tensor, tau: float = 0.1, variant: str = "obj_bg") -> tuple[torch.Tensor, torch.Tensor]:
    """``W = rows @ cols^T`` for a binary ``mask`` (..., N), 1 = hole: ``rows``, ``cols`` of shape (..., N, 2)."""
    m = soft_mask(mask, tau)
    if variant == "obj_bg":
        factors = torch.stack([m, 1.0 - m], dim=-1)
        return factors, factors
    ones = torch.ones_like(m)
    if variant == "bg_bg":
        return torch.stack([ones, m - 1.0], dim=-1), torch.stack([ones, 1.0 - m], dim=-1)
    if variant == "obj_obj":
        return torch.stack([ones, -m], dim=-1), torch.stack([ones, m], dim=-1)
    raise ValueError(f"sams_variant must be one of {SAMS_VARIANTS}, got {variant!r}")

"""The attention steer loss (paper §IV-A, Eqs. 8-9; from Predicated Diffusion's "existence" predicate) and its
latent step schedule.

For each steered prompt token ``i`` and each stored resolution, with ``A`` the conditional branch's
cross-attention probabilities averaged over the layers of that resolution and over heads (softmax over the 77
token slots) and ``M_f`` the **binary** hole mask:

    A^_i = A_i ⊙ M_f                                   (Eq. 8)
    L_s = - sum_i log(1 - prod_j (1 - A^_{i,j}))        (Eq. 9, j over the N patches)

computed in float32 and in log space (``log1p`` / ``expm1``, clamped with ``eps`` so that a token without any
attention inside the hole gives a finite loss). The losses of the resolutions are summed. A sample whose hole is
empty at a resolution contributes nothing there.

The paper states neither the update rule, the step size, the iteration count nor the token set. Defaults follow
the Attend-and-Excite / Predicated-Diffusion code that the loss comes from: one step ``z <- z - a_i grad L_s`` per
structure-phase timestep with ``a_i = step_size * sqrt(linspace(1.0, 0.5, num_steps)[i])``, ``step_size = 20``;
all real prompt tokens (``<sot>``, ``<eot>`` and padding excluded). ``normalize="ae"`` is that code's variant
(not in the paper): re-softmax ``100 * A`` over the prompt tokens and divide the log-product by ``N``.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from asuka.attention.functional import score_dtype
from asuka.pipelines.harmonpaint.options import STEER_NORMALIZE

AE_SOFTMAX_SCALE = 100.0  # Attend-and-Excite's re-softmax temperature


def steer_step_sizes(step_size: float, num_steps: int) -> list[float]:
    """``a_i = step_size * sqrt(linspace(1.0, 0.5, num_steps)[i])`` for every step index ``i`` of the sampler."""
    return [step_size * float(np.sqrt(r)) for r in np.linspace(1.0, 0.5, num_steps)]


def prompt_token_mask(lengths: Sequence[int], num_tokens: int,
                      indices: Sequence[int] | None = None) -> torch.Tensor:
    """(B, num_tokens) float 0/1: the steered token slots of each sample.

    ``lengths[b]`` is sample ``b``'s number of real prompt tokens (slots ``1..lengths[b]``, after ``<sot>``);
    ``indices`` (the same for every sample) overrides them, e.g. the nouns only.
    """
    weights = torch.zeros(len(lengths), num_tokens)
    if indices is not None:
        bad = [i for i in indices if not 0 <= i < num_tokens]
        if bad:
            raise ValueError(f"steer_token_indices must lie in [0, {num_tokens - 1}], got {bad}")
        weights[:, list(indices)] = 1.0
        return weights
    for b, n in enumerate(lengths):
        weights[b, 1:1 + min(n, num_tokens - 2)] = 1.0
    return weights


def steer_loss(maps: Mapping[int, torch.Tensor], masks: Mapping[int, torch.Tensor], token_weights: torch.Tensor,
               *, normalize: str = "none", prompt_tokens: torch.Tensor | None = None,
               eps: float = 1e-6) -> torch.Tensor:
    """Eq. 9 per sample, (B,) in float32 (float64 for float64 maps), summed over the resolutions of ``maps``.

    ``maps[key]``: (B, N, L) cross-attention probabilities at one resolution; ``masks[key]``: (B or 1, N) binary,
    1 = hole (any key, e.g. the token grid);
    ``token_weights``: (B, L), 1 for the steered tokens. ``normalize="ae"`` needs ``prompt_tokens`` (B, L), the
    slots the re-softmax runs over.
    """
    if normalize not in STEER_NORMALIZE:
        raise ValueError(f"steer_normalize must be one of {STEER_NORMALIZE}, got {normalize!r}")
    total = 0.0
    for key, probs in maps.items():
        probs = probs.to(score_dtype(probs.dtype))  # float32 (float64 stays float64)
        weights = token_weights.to(probs.dtype)
        if normalize == "ae":
            keep = prompt_tokens.to(torch.bool)
            keep = (keep | ~keep.any(-1, keepdim=True))[:, None, :]  # no prompt token: nothing is steered anyway
            probs = torch.softmax((AE_SOFTMAX_SCALE * probs).masked_fill(~keep, float("-inf")), dim=-1)
            probs = probs.masked_fill(~keep, 0.0)
        mask = masks[key].to(probs.dtype)
        masked = probs * mask[:, :, None]                                      # Eq. 8, (B, N, L)
        log_prod = torch.log1p(-masked.clamp(max=1.0 - eps)).sum(dim=1)       # log prod_j (1 - A^_ij), (B, L)
        if normalize == "ae":
            log_prod = log_prod / probs.shape[1]
        per_token = -torch.log((-torch.expm1(log_prod)).clamp(min=eps))      # Eq. 9 terms, (B, L)
        has_hole = (mask > 0.5).any(dim=-1).to(probs.dtype)                            # an empty level is skipped
        total = total + has_hole * (weights * per_token).sum(dim=-1)
    return total

"""RASG's math (paper §3.4, Eqs. 7-9, 13; official ``src/methods/rasg.py``, ``src/utils/scores.py``,
``src/smplfusion/scheduler.py``): pure, batched functions.

The RASG step replaces DDIM's random noise with the standardised gradient of a BCE objective on the cross-attention
scores at latent/4::

    g = -grad_{x_t} L_BCE(x_t),   g_hat = g / std(g)          (per sample, unbiased std, mean kept)
    x_{t-1} = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma_t^2) eps + sigma_t g_hat

``L_BCE = sum_{k in ind} mean_i BCEWithLogits(A_bar[i, k] - 1, M[i])`` with ``A_bar`` the **pre-softmax**
cross-attention logits of the conditional half, averaged over the latent/4 layers and their heads (official
``scores.bce``: the -1 logit shift and the pixel mean are the code's; the paper writes sigma(A_bar) and a sum).
The sign is a descent on the BCE (the official code; the paper's Eq. 13 reads as an ascent).

``sigma_t`` has two modes: ``"paper"`` is DDIM's ``eta * sqrt((1-ab_prev)/(1-ab_t)) * sqrt(1 - ab_t/ab_prev)``
(cumulative products), ``"official"`` evaluates the same formula with the per-step ``a_t = 1 - beta_t`` (what
``Schedule.sigma`` in the official code does; 10-25x smaller). The final step always has sigma = 0.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F

from asuka.pipelines._sampling import ddim_sigma, predicted_x0

SigmaMode = Literal["official", "paper"]
SIGMA_MODES = ("official", "paper")
LOGIT_SHIFT = 1.0


def sigma(alphas: torch.Tensor, alphas_cumprod: torch.Tensor, t: int, t_prev: int, eta: float,
          mode: SigmaMode = "official") -> float:
    """RASG's ``sigma_t`` for the step ``t -> t_prev`` (``t_prev < 0``: the final step, sigma = 0).

    ``alphas`` are the per-step ``1 - beta_t``, ``alphas_cumprod`` their cumulative product (a scheduler's
    ``alphas`` / ``alphas_cumprod``). Computed in float64, returned as a Python float.
    """
    if mode not in SIGMA_MODES:
        raise ValueError(f"sigma_mode={mode!r}; use 'official' or 'paper'")
    if t_prev < 0 or eta == 0:
        return 0.0
    a = (alphas if mode == "official" else alphas_cumprod).double()
    return float(ddim_sigma(a[t], a[t_prev], eta))


def standardise(g: torch.Tensor) -> torch.Tensor:
    """``g / std(g)`` per sample (unbiased std over all elements, mean kept); std clamped at 1e-12."""
    std = g.flatten(1).std(dim=1).clamp_min(1e-12)
    return g / std.view(-1, *([1] * (g.ndim - 1)))


def mean_cross_attention(head_means: Sequence[torch.Tensor]) -> torch.Tensor:
    """``A_bar`` (B, N, L): the mean over layers of per-layer head-mean pre-softmax logits, each (B, N, L).

    Equal to the official mean over the concatenation of layers x heads, since every latent/4 layer of an SD UNet
    has the same number of heads."""
    maps = torch.stack(list(head_means))
    return maps.mean(dim=0) if maps.dtype == torch.float64 else maps.float().mean(dim=0)


def bce_loss(mean_logits: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor,
             shift: float = LOGIT_SHIFT) -> torch.Tensor:
    """RASG's objective per sample (B,): ``sum_k weights[b,k] * mean_i BCEWithLogits(A_bar[b,i,k] - shift, M[b,i])``.

    ``mean_logits`` (B, N, L) from :func:`mean_cross_attention`, ``mask`` (B, N) in {0, 1} at the same token grid,
    ``weights`` (B, L) the token set (:func:`asuka.pipelines.hd_painter.preprocess.token_weights`).
    """
    target = mask.to(mean_logits.dtype)[:, :, None].expand_as(mean_logits)
    bce = F.binary_cross_entropy_with_logits(mean_logits - shift, target, reduction="none")   # (B, N, L)
    return (bce.mean(dim=1) * weights.to(bce.dtype)).sum(dim=1)


def ddim_step(sample: torch.Tensor, eps: torch.Tensor, alpha_prod_t: torch.Tensor, alpha_prod_t_prev: torch.Tensor,
              sigma_t: float = 0.0, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step with a chosen noise: ``(x_{t-1}, x0)``.

    ``x_{t-1} = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma noise``, written in the operation order
    of diffusers' ``DDIMScheduler.step`` so that ``sigma_t = 0`` reproduces it bit for bit, and ``noise`` taking the
    place of its ``variance_noise`` (RASG passes the standardised gradient). ``alpha_prod_*`` are 0-d tensors.
    """
    x0 = predicted_x0(sample, eps, alpha_prod_t)
    direction = (1 - alpha_prod_t_prev - sigma_t ** 2) ** 0.5 * eps
    prev = alpha_prod_t_prev ** 0.5 * x0 + direction
    if sigma_t > 0:
        if noise is None:
            raise ValueError("ddim_step: sigma_t > 0 needs a noise tensor (RASG's standardised gradient)")
        prev = prev + sigma_t * noise
    return prev, x0

"""PAIntA's math (paper §3.3, Eq. 5; official ``src/smplfusion/patches/attentionpatch/painta.py`` and
``transformerpatch/painta.py``): pure, batched functions; the attention control that uses them is in
:mod:`asuka.pipelines.hd_painter.controls`.

For one transformer block at a token grid ``h x w`` (``N = h*w``) and one sample:

- the prompt relevance of each pixel ``c_raw[j] = sum_{k in ind} mean_heads softmax(Q_c K_c^T / sqrt(d))[j, k]``
  (:func:`prompt_relevance`; ``Q_c = attn2.to_q(norm2(X + Y))`` with ``Y`` the vanilla self-attention output,
  ``K_c = attn2.to_k(E_cond)``, softmax over all 77 tokens);
- optional 3x3 Gaussian smoothing with the official kernel ``[0.21194, 0.57612, 0.21194]`` (outer product) and zero
  padding (:func:`smooth_3x3`; official only, not in the paper);
- ``c = clip((c_sm - median(c_sm)) / max(c_sm), 0, 1)`` with ``torch.median`` (lower median for even N)
  (:func:`normalise`);
- the self-attention logits of masked queries to known keys are multiplied by ``c_j`` (:func:`scale_logits`):
  pre-softmax, so ``c_j = 0`` sets the logit to 0, not to -inf (as in the paper and the official code).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Attend-and-Excite's GaussianSmoothing(kernel_size=3, sigma=0.5) as used by the official code: its 1-D kernel is
# exp(-((x - mu) / (2 sigma))^2), normalised (effective std ~0.651, not 0.5).
_SIGMA = 0.5


def gaussian_kernel_1d(size: int = 3, sigma: float = _SIGMA) -> torch.Tensor:
    """The official smoothing kernel ``exp(-((x - mu) / (2 sigma))^2)`` normalised to sum 1 (float64)."""
    x = torch.arange(size, dtype=torch.float64)
    mu = (size - 1) / 2
    k = torch.exp(-(((x - mu) / (2 * sigma)) ** 2))
    return k / k.sum()


def smooth_3x3(c: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """3x3 Gaussian smoothing of per-pixel values ``c`` (B, N) laid out on ``grid`` = (h, w), zero padding
    ("same"), so border pixels are attenuated (the official code's behaviour)."""
    k1 = gaussian_kernel_1d().to(device=c.device, dtype=c.dtype)
    kernel = (k1[:, None] * k1[None, :])[None, None]
    out = F.conv2d(c.reshape(-1, 1, *grid), kernel, padding=1)
    return out.reshape(c.shape)


def normalise(c: torch.Tensor) -> torch.Tensor:
    """``clip((c - median(c)) / max(c), 0, 1)`` per row of ``c`` (B, N); ``torch.median`` = lower median."""
    median = c.median(dim=-1, keepdim=True).values
    top = c.amax(dim=-1, keepdim=True)
    return ((c - median) / top).clamp(0, 1)


def prompt_relevance(probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``c_raw`` (B, N) from cross-attention probabilities ``probs`` (B, heads, N, L) and token weights (B, L):
    the head mean of the probabilities summed over the weighted tokens."""
    return torch.einsum("bhnl,bl->bn", probs, weights.to(probs.dtype)) / probs.shape[1]


def compute_c(probs: torch.Tensor, weights: torch.Tensor, grid: tuple[int, int], smooth: bool = True) -> torch.Tensor:
    """PAIntA's coefficients ``c`` (B, N) in [0, 1) from cross-attention probabilities (B, heads, N, L)."""
    c = prompt_relevance(probs, weights)
    if smooth:
        c = smooth_3x3(c, grid)
    return normalise(c)


def logit_scale(c: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The multiplier of the self-attention logits (B, N, N): ``c_j`` where query ``i`` is in the hole and key ``j``
    is known, 1 elsewhere (the official ``m m^T + (1 - m) 1^T`` construction). ``mask`` (B, N) in {0, 1}."""
    hole_to_known = (mask[:, :, None] > 0.5) & (mask[:, None, :] < 0.5)
    return torch.where(hole_to_known, c[:, None, :], torch.ones((), dtype=c.dtype, device=c.device))


def scale_logits(logits: torch.Tensor, c: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """PAIntA's modified logits (paper Eq. 5): ``logits`` (B, heads, N, N) times :func:`logit_scale`, the same for
    every head."""
    return logits * logit_scale(c.to(logits.dtype), mask.to(logits.dtype))[:, None]


def self_attention_logits(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Pre-softmax logits ``q k^T / sqrt(d)`` in float32 for (B, heads, N, d) queries and keys."""
    return torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])

"""Pure attention math used by the controlled processor (each function testable alone).

Shapes: queries (B, H, Nq, d), keys and values (B, H, Nk, d). Scores are computed in float32 (or
float64 when the inputs are float64) whatever the input dtype, so edits and losses stay accurate
under fp16/bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LowRankWeight = tuple[torch.Tensor, torch.Tensor]


def score_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other dtype is scored in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H*d) -> (B, H, N, d)."""
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, d) -> (B, N, H*d)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def attention_scores(q: torch.Tensor, k: torch.Tensor, scale: float, factor: torch.Tensor | None = None,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """Pre-softmax scores ``(q kᵀ · scale) ⊙ factor + bias`` in float32 (float64 for float64 inputs)."""
    dtype = score_dtype(q.dtype)
    scores = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * scale
    if factor is not None:
        scores = scores * factor.to(dtype)
    if bias is not None:
        scores = scores + bias.to(dtype)
    return scores


def combine_low_rank(weights: list[LowRankWeight]) -> LowRankWeight:
    """Elementwise product of low-rank weights ``W = Σ_r rows[..., r] cols[..., r]ᵀ``.

    ``(Σ_r a_r b_rᵀ) ⊙ (Σ_s c_s e_sᵀ) = Σ_{r,s} (a_r ⊙ c_s)(b_r ⊙ e_s)ᵀ``: ranks multiply.
    """
    rows, cols = weights[0]
    for rows2, cols2 in weights[1:]:
        rows = (rows.unsqueeze(-1) * rows2.unsqueeze(-2)).flatten(-2)
        cols = (cols.unsqueeze(-1) * cols2.unsqueeze(-2)).flatten(-2)
    return rows, cols


def dense_low_rank(weight: LowRankWeight) -> torch.Tensor:
    """The dense (…, Nq, Nk) matrix of a low-rank weight."""
    rows, cols = weight
    return torch.matmul(rows, cols.transpose(-1, -2))


def weighted_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weight: LowRankWeight | None,
                  bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    """``(W ⊙ softmax(q kᵀ·scale + bias)) v`` without renormalisation, exactly, as one SDPA call.

    With ``W = Σ_r a_r b_rᵀ`` (rows a: (B|1, H|1, Nq, R), cols b: (B|1, H|1, Nk, R)):
    ``(W ⊙ P) v = Σ_r a_r ⊙ (P (b_r ⊙ v))``, so SDPA runs once on the values ``[b_1 ⊙ v, …, b_R ⊙ v]``
    concatenated along the channel axis and the R outputs are recombined with the row factors.
    The N×N matrix is never formed (HarmonPaint's SAMS and PILOT's SBC are rank 2): the queries and keys are
    zero-padded to the values' width R·d (``q kᵀ`` unchanged, ``scale`` kept at the unpadded 1/√d), because
    PyTorch's fused SDPA kernels need one head width for q, k and v and otherwise fall back to the math kernel,
    which materialises the N×N map (on CPU about 3× slower forward and backward at 1024 tokens).
    """
    if bias is not None:
        if bias.dtype != q.dtype and bias.dtype != torch.bool:
            bias = bias.to(q.dtype)
        bias = bias.reshape((1,) * (4 - bias.ndim) + tuple(bias.shape))  # SDPA wants at least 2 dims
    if weight is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    rows, cols = weight
    rank, d = cols.shape[-1], v.shape[-1]
    cols = cols.to(v.dtype)
    values = (cols.unsqueeze(-1) * v.unsqueeze(-2)).flatten(-2)  # (B, H, Nk, R*d)
    width = max(values.shape[-1] - q.shape[-1], 0)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = F.scaled_dot_product_attention(F.pad(q, (0, width)), F.pad(k, (0, width)), values, attn_mask=bias,
                                         scale=scale)
    out = out.unflatten(-1, (rank, d))  # (B, H, Nq, R, d)
    return (rows.to(out.dtype).unsqueeze(-1) * out).sum(-2)

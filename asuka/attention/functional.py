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


def _tiles(batch: int, heads: int, rows: int, keys: int, tile_elements: int) -> list[tuple[slice, slice]]:
    """(head slice, row slice) tiles of a (B, H, Nq, Nk) score map holding at most ``tile_elements`` scores (at least
    one row of one head): several whole heads per tile when a head fits, else a few rows of one head."""
    per_head = batch * rows * keys
    if per_head <= tile_elements:
        step = max(1, tile_elements // max(1, per_head))
        return [(slice(h, h + step), slice(None)) for h in range(0, heads, step)]
    step = max(1, tile_elements // max(1, batch * keys))
    return [(slice(h, h + 1), slice(r, r + step)) for h in range(heads) for r in range(0, rows, step)]


def _tile_scores(q: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None, heads: slice,
                 rows: slice, dtype: torch.dtype) -> torch.Tensor:
    """Scores ``q kᵀ·scale + bias`` of a tile: (B, heads, rows, Nk) in ``dtype``, a fresh tensor."""
    scores = torch.matmul(q[:, heads, rows].to(dtype) * scale, k[:, heads].to(dtype).transpose(-1, -2))
    if bias is not None:
        scores += bias[:, heads if bias.shape[1] > 1 else slice(None), rows if bias.shape[2] > 1 else slice(None)]
    return scores


class _HeadMeanProbs(torch.autograd.Function):
    """Autograd of :func:`head_mean_probs`: forward keeps q, k and the row log-sum-exp only; backward recomputes
    each tile's probabilities ``P = exp(S - lse)`` and forms ``dS = P ⊙ (G' - rowsum(P_sel ⊙ G))`` in place
    (``G'``: the incoming gradient at the selected keys, 0 elsewhere), then ``dq = dS k·scale``,
    ``dk = dSᵀ q·scale`` (each only when its input needs a gradient)."""

    @staticmethod
    def forward(ctx, q, k, scale, bias, keys, tile_elements):
        dtype = score_dtype(q.dtype)
        batch, heads, rows, _ = q.shape
        out = torch.zeros(batch, rows, k.shape[2] if keys is None else keys.numel(), device=q.device, dtype=dtype)
        lse = torch.empty(batch, heads, rows, 1, device=q.device, dtype=dtype)
        for hs, rs in _tiles(batch, heads, rows, k.shape[2], tile_elements):
            scores = _tile_scores(q, k, scale, bias, hs, rs, dtype)
            top = scores.amax(-1, keepdim=True)
            expo = scores.sub_(top).exp_()
            total = expo.sum(-1, keepdim=True)
            lse[:, hs, rs] = top + total.log()
            picked = expo if keys is None else expo.index_select(-1, keys)
            out[:, rs] += picked.div_(total).sum(1)
        ctx.save_for_backward(q, k, bias, keys, lse)
        ctx.scale, ctx.tile_elements = scale, tile_elements
        return out.div_(heads)

    @staticmethod
    def backward(ctx, grad):
        q, k, bias, keys, lse = ctx.saved_tensors
        need_q, need_k = ctx.needs_input_grad[:2]
        dtype = lse.dtype
        batch, heads, rows, _ = q.shape
        grad = (grad.to(dtype) / heads).unsqueeze(1)  # (B, 1, Nq, Nk'): the same for every head
        dq = torch.empty(q.shape, device=q.device, dtype=dtype) if need_q else None
        dk = torch.zeros(k.shape, device=k.device, dtype=dtype) if need_k else None
        for hs, rs in _tiles(batch, heads, rows, k.shape[2], ctx.tile_elements):
            probs = _tile_scores(q, k, ctx.scale, bias, hs, rs, dtype).sub_(lse[:, hs, rs]).exp_()
            if keys is None:
                weighted = probs * grad[:, :, rs]
                dscores = weighted.sub_(probs.mul_(weighted.sum(-1, keepdim=True)))
            else:
                weighted = probs.index_select(-1, keys).mul_(grad[:, :, rs])
                dscores = probs.mul_(weighted.sum(-1, keepdim=True).neg_()).index_add_(-1, keys, weighted)
            if need_q:
                dq[:, hs, rs] = torch.matmul(dscores, k[:, hs].to(dtype))
            if need_k:
                dk[:, hs] += torch.matmul(dscores.transpose(-1, -2), q[:, hs, rs].to(dtype))
        return (None if dq is None else dq.mul_(ctx.scale).to(q.dtype),
                None if dk is None else dk.mul_(ctx.scale).to(k.dtype), None, None, None, None)


def head_mean_probs(q: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None = None,
                    keys: torch.Tensor | None = None, tile_elements: int = 1 << 24) -> torch.Tensor:
    """``mean_h softmax(q_h k_hᵀ·scale + bias_h)[..., keys]``: (B, Nq, Nk') in float32 (float64 for float64 inputs).

    The softmax runs over all keys; ``keys`` (1-D indices, None for all) only picks the columns returned. Computed
    in tiles of at most ``tile_elements`` scores (whole heads when they fit, else a few rows of one head), so no
    (B, H, Nq, Nk) tensor larger than a tile exists; differentiable
    in ``q`` and ``k`` with a hand-written backward that keeps only the row log-sum-exp (B·H·Nq values) and
    recomputes each tile (two score passes per tile instead of autograd's saved softmax, zero-filled column
    gradients and head-sum copies). ``bias`` (broadcastable to (B, H, Nq, Nk), e.g. an attention mask) is a
    constant: it gets no gradient.
    """
    if bias is not None:
        if bias.requires_grad and torch.is_grad_enabled():
            raise ValueError("head_mean_probs does not differentiate its bias; pass a detached bias")
        bias = bias.to(score_dtype(q.dtype))
        bias = bias.reshape((1,) * (4 - bias.ndim) + tuple(bias.shape)).expand(q.shape[0], -1, -1, -1)
    return _HeadMeanProbs.apply(q, k, scale, bias, keys, tile_elements)

"""CorrFill correspondence estimation as pure functions on batched tensors (paper Sec. 3.2-3.3, Eqs. 1-2).

Layout: a stitched latent is ``H x 2H`` tokens (reference left, target right), row-major. Per image ``b`` the
*matching map* ("bank") ``C[b, t, r]`` scores target token ``t`` (``H*H`` of them, row-major over the target half)
against reference token ``r``; a correspondence ``P[b, t]`` is the normalised ``(row, col)`` centre of the matched
reference token, NaN where there is none. Token ``k`` of a side-``n`` grid has centre ``(k + 0.5) / n``.

Attention maps of coarser layers (side ``n = H / s``) are brought to the bank's size as in the official code
(``corrfill_module/corrfill.py``): keys bilinearly upsampled and divided by ``s**2``; queries nearest-upsampled,
which for an integer ratio repeats each coarse row over its ``s x s`` block -- so the rows are never expanded:
:func:`vote` adds each coarse row to its block of the bank by broadcasting.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def token_centers(side: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """``(side*side, 2)`` normalised ``(row, col)`` centres ``(k + 0.5) / side`` of a row-major grid."""
    axis = (torch.arange(side, device=device, dtype=torch.float64) + 0.5) / side
    rows, cols = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([rows, cols], -1).reshape(side * side, 2).to(dtype)


def grid_side(tokens: int) -> int:
    """Side of a square grid of ``tokens`` tokens."""
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"{tokens} tokens do not form a square grid")
    return side


def _lerp_axis(x: torch.Tensor, dim: int, side: int) -> torch.Tensor:
    """Linear upsampling of axis ``dim`` of ``x`` to ``side`` samples with ``F.interpolate``'s sampling
    (``align_corners=False``, source positions clamped to the edges), as ``lerp(a, b, w)``: where the two sources
    coincide (the clamped edges) the result is the source exactly."""
    n = x.shape[dim]
    src = ((torch.arange(side, device=x.device, dtype=torch.float64) + 0.5) * (n / side) - 0.5).clamp_min(0)
    lo = src.floor().long().clamp_max(n - 1)
    hi = (lo + 1).clamp_max(n - 1)
    weight = (src - lo).to(x.dtype).view([side] + [1] * (x.dim() - 1 - dim % x.dim()))
    return torch.lerp(x.index_select(dim, lo), x.index_select(dim, hi), weight)


def upsample_keys(maps: torch.Tensor, side: int) -> torch.Tensor:
    """``(B, Q, n*n)`` target->reference maps over keys of a side-``n`` grid -> ``(B, Q, side*side)``: bilinear
    upsampling of the key grid (the official code's ``F.interpolate(mode="bilinear")``), divided by the squared
    ratio (about mass-preserving).

    Computed per axis as ``lerp``, so keys that repeat one source value (the clamped edges: the last ``ratio / 2``
    rows and columns) get exactly that value: their matching scores tie exactly and the argmax takes the first.
    ``F.interpolate``'s ``(1 - w) a + w a`` differs from ``a`` in the last bit, a near-tie whose winner then depends on
    rounding elsewhere (batch size, kernel choice). Within a few float32 ulps of ``F.interpolate`` otherwise."""
    batch, queries, keys = maps.shape
    n = grid_side(keys)
    if n == side:
        return maps
    grid = maps.reshape(batch, queries, n, n)
    up = _lerp_axis(_lerp_axis(grid, -1, side), -2, side)
    return up.reshape(batch, queries, side * side) / (side // n) ** 2


def vote(bank: torch.Tensor, maps: torch.Tensor) -> None:
    """Add one layer's vote to ``bank`` (``(B, H*H, H*H)``, in place): ``max(0, A - median_keys(A))`` per query row
    (code: ``get_keep_corr_softmax``). ``maps``: ``(B, n*n, H*H)`` with keys already at ``H`` (:func:`upsample_keys`)
    and queries at the layer's side ``n``; each coarse row is added to its ``(H/n)**2`` block of fine rows."""
    batch, queries, keys = maps.shape
    side, n = grid_side(keys), grid_side(queries)
    scale = side // n
    maps = maps.to(bank.dtype)
    # torch.median: the lower of the two middle values, as the official code.
    contribution = (maps - maps.median(-1, keepdim=True).values).clamp_min_(0)
    bank.view(batch, n, scale, n, scale, keys).add_(contribution.view(batch, n, 1, n, 1, keys))


def dominant_outliers(match: torch.Tensor, valid: torch.Tensor, threshold: int) -> torch.Tensor:
    """Target tokens whose matched reference token ``match`` is shared by more than ``threshold`` valid target
    tokens, themselves included (paper Sec. 3.3: dominant tokens; compared by index, not float position)."""
    counts = torch.zeros(match.shape, device=match.device, dtype=torch.int32)
    counts.scatter_add_(1, match, valid.to(torch.int32))
    return valid & (counts.gather(1, match) > threshold)


def zero_dominant_pairs(bank: torch.Tensor, match: torch.Tensor, outlier: torch.Tensor, mode: str) -> None:
    """Zero bank entries of dominant-token outliers (in place). ``zero_pair``: ``C[t, P(t)]``; ``code_compat``: the
    official code's ``C[P(t), P(P(t))]``, reusing the matched reference index as a target index; ``off``: nothing."""
    if mode == "off":
        return
    tokens = bank.shape[-1]
    if mode == "zero_pair":
        rows = torch.arange(tokens, device=match.device).expand_as(match)
        cols = match
    elif mode == "code_compat":
        rows = match
        cols = match.gather(1, match)
    else:
        raise ValueError(f"unknown dominant bank update {mode!r}")
    keep = (~outlier).to(bank.dtype)
    # Outliers never share an entry with kept tokens (different matches), so a product of 1s and 0s is exact.
    bank.view(bank.shape[0], -1).scatter_reduce_(1, rows * tokens + cols, keep, reduce="prod")


def disk_kernel(radius: float, side: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """``(1, 1, k, k)`` indicator of token offsets closer than ``radius`` (normalised units) on a side-``side``
    grid, strict ``<`` as the official smoothing (``weight_smoothing``)."""
    reach = max(0, math.ceil(radius * side))
    offsets = torch.arange(-reach, reach + 1, device=device, dtype=torch.float64)
    dist2 = offsets[:, None] ** 2 + offsets[None, :] ** 2
    return (dist2 < (radius * side) ** 2).to(dtype)[None, None]


def smooth(P: torch.Tensor, valid: torch.Tensor, weight: torch.Tensor, radius: float) -> torch.Tensor:
    """Correspondence smoothing (paper Eq. 2): each valid token's displacement ``P - centre`` becomes the
    ``weight``-weighted mean of the displacements of the valid tokens closer than ``radius``; invalid tokens stay
    NaN, results outside ``[0, 1)`` become NaN. ``P``: ``(B, H*H, 2)``; ``valid``, ``weight``: ``(B, H*H)``."""
    batch, tokens, _ = P.shape
    side = grid_side(tokens)
    centers = token_centers(side, device=P.device, dtype=P.dtype)
    w = torch.where(valid, weight.to(P.dtype), 0)
    disp = torch.where(valid[..., None], P - centers, 0)
    fields = torch.cat([disp * w[..., None], w[..., None]], -1)  # (B, T, 3)
    kernel = disk_kernel(radius, side, device=P.device, dtype=P.dtype)
    summed = F.conv2d(fields.transpose(1, 2).reshape(batch * 3, 1, side, side), kernel,
                      padding=kernel.shape[-1] // 2).reshape(batch, 3, tokens).transpose(1, 2)
    smoothed = centers + summed[..., :2] / summed[..., 2:]
    inside = ((smoothed >= 0) & (smoothed < 1)).all(-1) & valid
    return torch.where(inside[..., None], smoothed, float("nan"))


def estimate(bank: torch.Tensor, *, enable_filter: bool, dominant_thresh: int, bank_update: str,
             enable_smoothing: bool, smooth_window: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Correspondences from the matching map: argmax (Eq. 1), dominant-token filter (may zero bank entries, in
    place), smoothing (Eq. 2). Returns ``P`` and the outliers' pre-filter correspondences ``P_o`` (NaN elsewhere),
    both ``(B, H*H, 2)``. A target row of the bank that is all zero has no correspondence."""
    top, match = bank.max(-1)
    valid = top != 0
    centers = token_centers(grid_side(bank.shape[-1]), device=bank.device, dtype=bank.dtype)
    raw = torch.where(valid[..., None], centers[match], float("nan"))
    outlier = torch.zeros_like(valid)
    if enable_filter:
        outlier = dominant_outliers(match, valid, dominant_thresh)
        zero_dominant_pairs(bank, match, outlier, bank_update)
        valid = valid & ~outlier
    P = torch.where(valid[..., None], raw, float("nan"))
    if enable_smoothing:
        P = smooth(P, valid, bank.amax(-1), smooth_window)
    P_o = torch.where(outlier[..., None], raw, float("nan"))
    return P, P_o


def valid_mask(P: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` True where a correspondence exists."""
    return ~P[..., 0].isnan()

"""MAKVS, the Mask-Adjusted Key-Value Strategy (paper §IV-B, Eqs. 10-13), as a key/value edit.

The unmasked region is the style reference: ``K~`` (Eq. 10) equals ``K`` at unmasked tokens and the mean key
``K_bar`` of the unmasked tokens at masked ones (``V~`` likewise). ``concat`` mode (Eqs. 11-12, the paper's
method) attends over ``2N`` keys ``[K; lam * K~]`` with values ``[V; V~]``; ``lam`` scales only the appended keys.
``naive`` mode (Eq. 13, the Fig. 3 ablation) replaces the keys instead: ``softmax(q K~^T) V~`` (Eq. 13 has no
``lam``; the value it is used with is not stated, ``V~`` is taken here).

Statistics are per sample (the two CFG halves are separate samples) and per layer, computed at every call; a
per-head mean equals the mean before the head split, since the mean is linear. A sample whose mask is empty (no
hole: nothing to harmonise) or full (no unmasked token: the mean is undefined) must bypass MAKVS
(:func:`makvs_applicable`); ``lam = 0`` is "MAKVS off" (the paper calls it inactive, although under the literal
Eq. 11 the appended keys would still draw attention mass).
"""

from __future__ import annotations

import torch

from asuka.pipelines.harmonpaint.options import MAKVS_MODES


def makvs_applicable(mask: torch.Tensor) -> torch.Tensor:
    """Per sample (bool, (B,)): does the binary ``mask`` (B, N) have at least one hole and one known token?"""
    hole = mask > 0.5
    return hole.any(-1) & ~hole.all(-1)


def mask_adjusted(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 10: ``x`` (B, heads, N, d) with every hole token replaced by its sample's mean over known tokens
    (a sample without known tokens gets 0 there: it must bypass MAKVS)."""
    hole = (mask > 0.5)[:, None, :, None]
    known = (~hole).to(x.dtype)
    mean = (x * known).sum(-2, keepdim=True) / known.sum(-2, keepdim=True).clamp(min=1)
    return torch.where(hole, mean, x)


def makvs_keys_values(key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, lam: float = 1.4,
                      mode: str = "concat", applicable: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values MAKVS attends over, for ``key, value`` (B, heads, N, d) and a binary ``mask`` (B, N),
    1 = hole: ``([K; lam K~], [V; V~])`` (2N keys) in ``concat`` mode, ``(K~, V~)`` in ``naive`` mode.

    ``applicable`` (bool, (B,), :func:`makvs_applicable`) marks the samples MAKVS acts on when only some do
    (``None``: all). In ``naive`` mode the others keep their keys and values here; in ``concat`` mode their
    appended keys must be switched off with :func:`makvs_bypass_bias`.
    """
    k_t, v_t = mask_adjusted(key, mask), mask_adjusted(value, mask)
    if mode == "concat":
        return torch.cat([key, lam * k_t], dim=-2), torch.cat([value, v_t], dim=-2)
    if mode == "naive":
        if applicable is not None:
            keep = applicable[:, None, None, None]
            k_t, v_t = torch.where(keep, k_t, key), torch.where(keep, v_t, value)
        return k_t, v_t
    raise ValueError(f"makvs_mode must be one of {MAKVS_MODES}, got {mode!r}")


def makvs_bypass_bias(applicable: torch.Tensor, tokens: int) -> torch.Tensor:
    """``concat`` mode, partly applicable batch: a score bias (B, 1, 1, 2N), ``-inf`` on the appended keys of the
    samples MAKVS does not act on (they then attend over their own N keys only) and 0 elsewhere."""
    bias = torch.zeros(applicable.shape[0], 1, 1, 2 * tokens, device=applicable.device)
    bias[..., tokens:] = torch.where(applicable, 0.0, float("-inf"))[:, None, None, None]
    return bias

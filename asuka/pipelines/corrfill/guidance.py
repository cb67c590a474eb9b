"""CorrFill's two guidance terms as pure functions: the attention mask (paper Eqs. 3-4) and the latent-optimisation
objective and update (Eq. 5), with the details of the official code (``corrfill_module/corrfill.py::get_attn_mask``,
``utils.py::bce_loss``, ``cg_pipeline.py``)."""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from asuka.pipelines.corrfill.correspondence import grid_side, token_centers

_EXACT = "donot_use_mm_for_euclid_dist"  # exact distances: tokens exactly at the radius must compare exactly


def block_nanmean(P: torch.Tensor, side: int) -> torch.Tensor:
    """``(B, H*H, 2)`` correspondences -> ``(B, side*side, 2)``: the mean of the finite ones over each block of
    ``H/side`` x ``H/side`` target tokens (NaN where a block has none). The ratio must be a power of 2."""
    batch, tokens, _ = P.shape
    full = grid_side(tokens)
    if full == side:
        return P
    scale = full // side
    if scale * side != full or scale & (scale - 1):
        raise ValueError(f"layer side {side} is not the correspondence side {full} divided by a power of 2")
    blocks = P.reshape(batch, side, scale, side, scale, 2).permute(0, 1, 3, 2, 4, 5)
    return blocks.reshape(batch, side * side, scale * scale, 2).nanmean(2)


def mask_radius(window: float, side: int) -> float:
    """Neighbourhood radius (normalised) at a layer of side ``side``: ``window > 0`` is a token count
    (``window / side``); ``window < 0`` a ratio of the side, at least half a token (code: ``get_attn_mask``)."""
    return window / side if window > 0 else max(1 / (2 * side), -window)


def target_to_reference_mask(P: torch.Tensor, P_o: torch.Tensor, side: int, window: float,
                             boost: torch.Tensor) -> torch.Tensor:
    """Additive attention mask for target queries -> reference keys at a layer of side ``side``: ``(B, n, n)`` with
    ``n = side*side``.

    Target query with a correspondence ``P`` (Eq. 3): ``boost`` (per image, ``(B,)``) on reference keys within the
    radius (``<=``), ``-inf`` beyond. Query without ``P`` but with an outlier correspondence ``P_o`` (Eq. 4):
    ``-inf`` within the radius (``<``), 0 elsewhere. Other queries: 0. ``P``/``P_o`` are at the correspondence
    resolution and averaged to the layer's (:func:`block_nanmean`).
    """
    P, P_o = block_nanmean(P, side), block_nanmean(P_o, side)
    radius = mask_radius(window, side)
    keys = token_centers(side, device=P.device, dtype=P.dtype)
    dist = torch.cdist(P.nan_to_num(-1.0), keys[None].expand(P.shape[0], -1, -1), compute_mode=_EXACT)
    dist_o = torch.cdist(P_o.nan_to_num(-1.0), keys[None].expand(P.shape[0], -1, -1), compute_mode=_EXACT)
    has_p = ~P[..., :1].isnan()
    has_o = ~P_o[..., :1].isnan()
    neg_inf = torch.tensor(float("-inf"), device=P.device, dtype=P.dtype)
    zero = torch.zeros((), device=P.device, dtype=P.dtype)
    with_p = torch.where(dist <= radius, boost.to(P.dtype)[:, None, None], neg_inf)
    suppressed = torch.where(has_o & (dist_o < radius), neg_inf, zero)
    return torch.where(has_p, with_p, suppressed)


def stitched_key_mask(tar2ref: torch.Tensor) -> torch.Tensor:
    """``(B, n, n)`` target->reference mask -> ``(B, n, 2n)`` over all keys of the stitched ``side x 2*side``
    sequence (reference keys are the first half of each token row; target keys get 0)."""
    batch, queries, keys = tar2ref.shape
    side = grid_side(keys)
    full = torch.zeros(batch, queries, side, 2, side, device=tar2ref.device, dtype=tar2ref.dtype)
    full[:, :, :, 0] = tar2ref.view(batch, queries, side, side)
    return full.view(batch, queries, 2 * keys)


def normalize_rows(A: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """``clamp((A - median) / max, 0, 1)`` per row with detached statistics of ``A + eps`` (code: ``bce_loss``)."""
    shifted = (A + eps).detach()
    return ((A - shifted.median(-1, keepdim=True).values) / shifted.amax(-1, keepdim=True)).clamp(0, 1)


def _disk_offsets(radius: float, side: int, device) -> torch.Tensor:
    reach = math.ceil(radius * side) + 1
    offsets = torch.arange(-reach, reach + 1, device=device)
    return torch.stack(torch.meshgrid(offsets, offsets, indexing="ij"), -1).reshape(-1, 2)


def positive_keys(P: torch.Tensor, radius: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The positives of ``E(P)`` (reference tokens closer than ``radius`` to ``P``, code ``corr_coord_2_heatmap``)
    as candidate key indices ``(B, T, M)`` and a membership mask ``(B, T, M)`` (False for NaN ``P``)."""
    side = grid_side(P.shape[1])
    base = torch.floor(P.nan_to_num(-1.0) * side).long()
    cand = base[..., None, :] + _disk_offsets(radius, side, P.device)  # (B, T, M, 2)
    inside = ((cand >= 0) & (cand < side)).all(-1)
    cand = cand.clamp(0, side - 1)
    centers = (cand.to(P.dtype) + 0.5) / side
    member = inside & ((centers - P[..., None, :]).norm(dim=-1) < radius)
    return cand[..., 0] * side + cand[..., 1], member


def correspondence_loss(maps: torch.Tensor, P: torch.Tensor, radius: float) -> torch.Tensor:
    """Per-image objective ``S`` (paper Eq. 5 with the code's Norm, heatmap and class-balanced BCE):
    ``mean over valid rows and all keys of w * BCE_logits(Norm(A), E(P))`` -> ``(B,)``.

    ``maps``: ``(B, n*n, H*H)`` head-averaged target->reference probabilities of one layer, keys at the
    correspondence side ``H``, queries at the layer's side ``n`` (each coarse row stands for its block of target
    tokens, as the code's nearest upsampling); ``P``: ``(B, H*H, 2)``. Positives get weight ``n_neg / n``, negatives
    ``n_pos / n`` over all valid rows. Uses ``BCE(x, y) = softplus(x) - x*y`` and gathers only the few positive keys
    per row, so no ``H**4`` tensor is formed. Images without a valid correspondence get 0.
    """
    batch, queries, keys = maps.shape
    side, n = grid_side(keys), grid_side(queries)
    scale = side // n
    dtype = torch.promote_types(maps.dtype, torch.float32)
    x = normalize_rows(maps.to(dtype))
    softplus = F.softplus(x)
    fine_to_coarse = torch.arange(side, device=maps.device) // scale
    rows = (fine_to_coarse[:, None] * n + fine_to_coarse[None, :]).reshape(-1)  # coarse row of each target token
    valid = ~P[..., 0].isnan()
    key_idx, member = positive_keys(P.to(dtype), radius)
    member = member & valid[..., None]
    flat = (rows[None, :, None] * keys + key_idx).reshape(batch, -1)  # (coarse row, positive key) of each token
    pos_x = torch.where(member, x.reshape(batch, -1).gather(1, flat).view_as(member), 0).sum(-1)
    pos_sp = torch.where(member, softplus.reshape(batch, -1).gather(1, flat).view_as(member), 0).sum(-1)
    all_sp = softplus.sum(-1)[:, rows]
    count = valid.sum(-1).to(x.dtype) * keys
    n_pos = member.sum((-1, -2)).to(x.dtype)
    n_neg = count - n_pos
    total = count.clamp_min(1)
    a_pos, a_neg = n_neg / total, n_pos / total
    per_row = a_neg[:, None] * (all_sp - pos_sp) + a_pos[:, None] * (pos_sp - pos_x)
    return torch.where(valid, per_row, 0).sum(-1) / total


def sigma_table(scheduler, eta: float) -> list[float]:
    """sigma_t of every timestep of ``scheduler`` (after ``set_timesteps``), computed from its own tables:
    ``eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))`` with ``prev = t - T // steps`` and ``a_prev`` the
    scheduler's ``final_alpha_cumprod`` before 0 -- DDIM's stochastic std (code: ``cg_pipeline.py``).

    Schedulers without DDIM's ``eta`` (e.g. PNDM, Paint-by-Example's default) give 0, as in the official code:
    latent optimisation then only adds votes.
    """
    import inspect

    timesteps = [int(t) for t in scheduler.timesteps.tolist()]
    if "eta" not in inspect.signature(scheduler.step).parameters or not hasattr(scheduler, "final_alpha_cumprod"):
        return [0.0] * len(timesteps)
    alphas = scheduler.alphas_cumprod.double().cpu()
    final = float(scheduler.final_alpha_cumprod)
    jump = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    out = []
    for t in timesteps:
        a_t = float(alphas[t])
        a_prev = float(alphas[t - jump]) if t - jump >= 0 else final
        out.append(eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)))
    return out


def warn_if_no_update(scheduler, eta: float, optimize_steps: int) -> None:
    """Warn when latent optimisation is on but the scheduler makes its update zero (eta 0 or no eta)."""
    import inspect

    if optimize_steps <= 0:
        return
    if "eta" not in inspect.signature(scheduler.step).parameters:
        warnings.warn(f"CorrFill latent optimisation has no effect with {type(scheduler).__name__} (its update is "
                      "proportional to DDIM's eta noise); use a DDIM scheduler with eta > 0", stacklevel=3)
    elif eta == 0:
        warnings.warn("CorrFill latent optimisation has no effect with eta = 0 (its update is proportional to "
                      "sigma_t); use eta > 0 (the paper's runs use 1)", stacklevel=3)


def normalized_gradient(grad: torch.Tensor) -> torch.Tensor:
    """``g / std(g)`` per image (in float64, as the code), 0 for an image whose gradient has zero spread."""
    g = grad.double()
    std = g.flatten(1).std(-1).view(-1, *[1] * (g.dim() - 1))
    return torch.where(std > 0, g / torch.where(std > 0, std, 1), 0).to(grad.dtype)


def latent_update(latents: torch.Tensor, direction: torch.Tensor, *, base_lr: float, rho: torch.Tensor,
                  sigma: float, strength: float) -> torch.Tensor:
    """``z[..., W/2:] -= base_lr * rho * sigma * strength * direction`` (the target half only; ``rho`` per image)."""
    width = latents.shape[-1] // 2
    step = (base_lr * sigma * strength) * rho.to(latents.dtype).view(-1, 1, 1, 1) * direction.to(latents.dtype)
    return torch.cat([latents[..., :width], latents[..., width:] - step], -1)

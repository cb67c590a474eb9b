"""CorrFill's per-generation state and its two self-attention controls on :mod:`asuka.attention`.

:class:`CorrFillState` holds everything one generation learns -- one matching map per image (fp32), the current
correspondences ``P`` / outliers ``P_o``, the adaptive weight, the maps kept for the loss -- and is created fresh
for every pipeline call, so nothing leaks between images or batch elements (the official code keeps it in module
globals). :class:`MatchReader` reads the raw head-mean probabilities of the target-query rows of the conditional
half at the reference keys (the softmax over all keys, so it is the layer's) and votes on the vote layers; in the
gradient pass it also keeps them with autograd for the objective. :class:`CorrespondenceMask` adds the Eq. 3-4 mask
on every self-attention layer during the first ``step_masking`` steps of the main pass; built after the same layer's
vote, as in the code.
"""

from __future__ import annotations

import torch

from asuka.attention import AttentionControl, Read, RowBias
from asuka.pipelines.corrfill import correspondence as corr
from asuka.pipelines.corrfill import guidance
from asuka.pipelines.corrfill.config import CorrFillConfig

GRAD, MAIN, OFF = "grad", "main", "off"


class CorrFillState:
    """Per-generation CorrFill state for ``batch`` images whose stitched latent is ``side x 2*side``; the matching
    map and correspondences are kept in ``dtype`` promoted to at least float32 (fp32 under fp16/bf16)."""

    def __init__(self, config: CorrFillConfig, batch: int, side: int, device: torch.device,
                 dtype: torch.dtype = torch.float32) -> None:
        self.config, self.batch, self.side, self.device = config, batch, side, device
        self.dtype = dtype = torch.promote_types(dtype, torch.float32)
        tokens = side * side
        self.bank = torch.zeros(batch, tokens, tokens, device=device, dtype=dtype)
        self.P = torch.full((batch, tokens, 2), float("nan"), device=device, dtype=dtype)
        self.P_o = torch.full_like(self.P, float("nan"))
        self.rho = torch.ones(batch, device=device, dtype=dtype)  # the code's initial adaptive weight
        self.phase = OFF
        self.step = 0  # the loop's step index (bookkeeping: nothing reads it inside a UNet pass)
        self.masking = False  # this pass adds the Eq. 3-4 mask (set per pass by the loop: a bool, not a step count)
        self.collected: list[torch.Tensor] = []
        # read-only during a pass (torch.compile guards stay fixed)
        self._rows, self._keys = _half_tokens_per_side(side, device, h=1), _half_tokens_per_side(side, device, h=0)
        self._masks: dict[int, torch.Tensor] = {}

    # ---------------------------------------------------------------------------------------------- estimation
    def reset(self) -> None:
        """Forget the matching map and correspondences (the code resets at the start of every pass of step 0)."""
        self.bank.zero_()
        self.P.fill_(float("nan"))
        self.P_o.fill_(float("nan"))
        self._masks.clear()

    def begin_pass(self, phase: str, masking: bool = False) -> None:
        """Set the phase and masking flag of the next UNet pass and drop the previous pass's cached masks: the
        UNet then always starts from the same Python state, so a compiled UNet (``torch.compile``) keeps one graph
        per kind of pass instead of recompiling for every step."""
        self.phase, self.masking = phase, masking
        self._masks.clear()

    def target_rows(self, grid: tuple[int, int]) -> torch.Tensor:
        """Indices of the target-half tokens of a ``(h, 2h)`` stitched grid, row-major over the target half."""
        return self._rows[self._side(grid)]

    def reference_keys(self, grid: tuple[int, int]) -> torch.Tensor:
        """Indices of the reference-half tokens of a ``(h, 2h)`` stitched grid, row-major over the reference half."""
        return self._keys[self._side(grid)]

    def _side(self, grid: tuple[int, int]) -> int:
        h, w = grid
        if w != 2 * h or h not in self._rows:
            raise ValueError(f"CorrFill needs a stitched token grid of width 2 x height (height {self.side} / 2^k), "
                             f"got {h}x{w}")
        return h

    def vote(self, tar2ref: torch.Tensor) -> None:
        """Add a layer's ``(B, n*n, n*n)`` target->reference map to the matching map and re-estimate P."""
        cfg = self.config
        corr.vote(self.bank, corr.upsample_keys(tar2ref.detach().to(self.dtype), self.side))
        self.P, self.P_o = corr.estimate(self.bank, enable_filter=cfg.enable_filter,
                                         dominant_thresh=cfg.dominant_thresh, bank_update=cfg.dominant_bank_update,
                                         enable_smoothing=cfg.enable_smoothing, smooth_window=cfg.smooth_window)
        self._masks.clear()

    def update_rho(self) -> None:
        """rho_adapt: the fraction of target tokens with a correspondence (1 without the adaptive weight)."""
        if self.config.adaptive_weight:
            self.rho = corr.valid_mask(self.P).to(self.dtype).mean(-1)

    # ---------------------------------------------------------------------------------------------- guidance
    def mask(self, side: int) -> torch.Tensor:
        """``(B, side*side, 2*side*side)`` additive mask of the target queries at a layer of side ``side`` (0 for an
        image with fewer than ``min_valid`` correspondences), cached until the next vote."""
        if side not in self._masks:
            cfg = self.config
            tar2ref = guidance.target_to_reference_mask(self.P, self.P_o, side, cfg.mask_window,
                                                        cfg.mask_boost * self.rho)
            enough = corr.valid_mask(self.P).sum(-1) >= cfg.min_valid
            tar2ref = torch.where(enough[:, None, None], tar2ref, torch.zeros((), device=self.device))
            self._masks[side] = guidance.stitched_key_mask(tar2ref)
        return self._masks[side]

    def loss(self) -> torch.Tensor:
        """``(B,)`` objective S: the mean over the collected layers of the per-layer loss against E(P)."""
        losses = [guidance.correspondence_loss(corr.upsample_keys(maps, self.side), self.P,
                                               self.config.heatmap_radius) for maps in self.collected]
        return torch.stack(losses).mean(0)


def _half_tokens_per_side(side: int, device: torch.device, h: int) -> dict[int, torch.Tensor]:
    """Token indices of the reference (``h = 0``) or target (``h = 1``) half of the ``(n, 2n)`` grid of every layer
    resolution ``n = side / 2^k``, row-major over that half."""
    tokens = {}
    n = side
    while n >= 1:
        axis = torch.arange(n, device=device)
        tokens[n] = (axis[:, None] * 2 * n + h * n + axis).reshape(-1)
        if n % 2:
            break
        n //= 2
    return tokens


class MatchReader(AttentionControl):
    """Reads raw target-query -> reference-key probabilities (the softmax over all keys, the layer's): votes on
    ``vote_layers``; keeps them with autograd in the gradient pass."""

    def __init__(self, state: CorrFillState) -> None:
        self.state = state

    @property
    def read(self) -> Read:
        return Read("probs", batch="cond", heads="mean", grad=self.state.phase == GRAD)

    def _votes(self, layer) -> bool:
        return layer.kind_index in self.state.config.vote_layers

    def active(self, layer, state) -> bool:
        s = self.state
        if s.phase == GRAD:
            return True
        return s.phase == MAIN and self._votes(layer)

    def read_rows(self, call) -> torch.Tensor:
        return self.state.target_rows(call.grid)

    def read_keys(self, call) -> torch.Tensor:
        return self.state.reference_keys(call.grid)

    def on_read(self, call, maps: torch.Tensor) -> None:
        """``maps``: ``(B, n*n, n*n)`` target-query -> reference-key head-mean probabilities."""
        s = self.state
        if self._votes(call.layer) and (s.phase == MAIN or s.config.vote_in_grad_pass):
            s.vote(maps)
        if s.phase == GRAD:
            s.collected.append(maps)


class CorrespondenceMask(AttentionControl):
    """Eqs. 3-4: the additive mask on the target queries of the conditional half (both halves in ``paper_clean``)
    during the first ``step_masking`` steps of the main pass."""

    def __init__(self, state: CorrFillState) -> None:
        self.state = state

    def active(self, layer, state) -> bool:
        return self.state.phase == MAIN and self.state.masking

    def row_bias(self, call) -> RowBias:
        s = self.state
        h, _ = call.grid
        target = s.mask(h).to(call.query.dtype)[:, None]  # (B, 1, h*h, h*w): target rows of the cond half
        if call.state.cfg and s.config.mask_uncond_branch:
            return RowBias(s.target_rows(call.grid), torch.cat([target, target]))
        return RowBias(s.target_rows(call.grid), target, batch=call.cond)

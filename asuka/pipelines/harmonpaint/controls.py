"""HarmonPaint's attention controls on :mod:`asuka.attention`: SAMS (a rank-2 post-softmax weight on the chosen
self-attention layers), MAKVS (a key/value extension on the chosen self-attention layers) and the steer loss's
cross-attention store, all gated by the per-step :class:`~asuka.pipelines.harmonpaint.schedule.StepPlan`.

The pipeline sets ``controller.state.step`` and ``controller.state.phase`` before every U-Net call: ``"main"`` for
the (CFG) denoising pass, ``"steer"`` for the steer loss's conditional gradient pass.
"""

from __future__ import annotations

from typing import Sequence

import torch

from asuka.attention import AttentionControl, AttentionLayer, AttentionStore, CallState, LayerTable, Read, TokenMasks
from asuka.pipelines.harmonpaint.makvs import makvs_applicable, makvs_bypass_bias, makvs_keys_values
from asuka.pipelines.harmonpaint.sams import sams_factors
from asuka.pipelines.harmonpaint.schedule import StepPlan

MAIN, STEER = "main", "steer"


def _cached(cache: dict, call, make):
    """``make(call)`` cached per (grid, batch, cfg): per-sample tensors are built once per generation, not per step."""
    key = (call.grid, call.batch_size, call.state.cfg)
    if key not in cache:
        cache[key] = make(call)
    return cache[key]


class SAMS(AttentionControl):
    """Eqs. 4-7: ``(W ⊙ A) V`` with ``W`` from :func:`sams_factors`, on the steps whose plan has ``sams``
    (in the steer pass too when ``in_steer_pass``)."""

    def __init__(self, masks: TokenMasks, plans: Sequence[StepPlan], tau: float, variant: str,
                 in_steer_pass: bool):
        self.masks, self.plans, self.tau, self.variant = masks, plans, tau, variant
        self.phases = (MAIN, STEER) if in_steer_pass else (MAIN,)
        self._factors: dict = {}

    def active(self, layer: AttentionLayer, state: CallState) -> bool:
        return state.phase in self.phases and self.plans[state.step].sams

    def prob_weight(self, call):
        def make(call):
            rows, cols = sams_factors(self.masks.for_call(call), self.tau, self.variant)
            return rows[:, None], cols[:, None]  # (B, 1, N, 2): the same weight for every head

        return _cached(self._factors, call, make)


class MAKVS(AttentionControl):
    """Eqs. 10-13 on the steps whose plan has ``makvs``; samples whose mask at a layer's grid is empty or full
    attend as usual (decided once per grid: ``applicable`` is read on the host when the control is built)."""

    def __init__(self, masks: TokenMasks, plans: Sequence[StepPlan], lam: float, mode: str,
                 layers: LayerTable, latent_size: tuple[int, int]):
        self.masks, self.plans, self.lam, self.mode = masks, plans, lam, mode
        grids = {layer.grid(latent_size) for layer in layers}
        flags = {grid: makvs_applicable(masks.at(grid)).tolist() for grid in grids}  # one host read per grid
        self.any = {grid: any(f) for grid, f in flags.items()}
        self.all = {grid: all(f) for grid, f in flags.items()}
        self._masks: dict = {}
        self._applicable: dict = {}
        self._bias: dict = {}

    def active(self, layer: AttentionLayer, state: CallState) -> bool:
        return (state.phase in (MAIN, STEER) and self.plans[state.step].makvs and self.lam != 0
                and self.any[layer.grid(state.latent_size)])

    def _applicable_for(self, call) -> torch.Tensor | None:
        if self.all[call.grid]:
            return None
        return _cached(self._applicable, call, lambda c: makvs_applicable(self.masks.for_call(c)))

    def keys_values(self, call, key, value):
        mask = _cached(self._masks, call, self.masks.for_call)
        return makvs_keys_values(key, value, mask, self.lam, self.mode, self._applicable_for(call))

    def score_bias(self, call):
        applicable = self._applicable_for(call)
        if applicable is None or self.mode != "concat":
            return None
        return _cached(self._bias, call, lambda c: makvs_bypass_bias(applicable, c.tokens))


def steer_store(controller, levels: Sequence[int]) -> AttentionStore:
    """The conditional branch's head-mean cross-attention probabilities (with autograd) at ``levels``, stored
    during the steer pass only."""
    layers = controller.layers.select(kind="cross", levels=tuple(levels))
    read = Read("probs", batch="cond", heads="mean", grad=True)
    return controller.add(AttentionStore(read, when=lambda layer, state: state.phase == STEER), layers)


def maps_by_grid(store: AttentionStore, latent_size: tuple[int, int]) -> dict[tuple[int, int], torch.Tensor]:
    """The stored maps averaged over the layers of each token grid: ``{(h, w): (B, N, L)}``."""
    grouped: dict[tuple[int, int], list[torch.Tensor]] = {}
    for layer, maps in zip(store.layers, store.maps):
        grouped.setdefault(layer.grid(latent_size), []).append(maps)
    return {grid: torch.stack(maps).mean(0) for grid, maps in grouped.items()}

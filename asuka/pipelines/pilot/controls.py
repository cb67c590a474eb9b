"""PILOT's attention controls on :mod:`asuka.attention` (paper §4.1; official code ``models/attn_processor.py``).

* :class:`BoundaryControl` — Semantic Boundary Control (paper Eq. 16) on every text cross-attention layer: after
  the softmax, background rows keep only the BOS key, without renormalisation. It is a rank-2 post-softmax weight
  ``W = 1·e_BOSᵀ + hole·(1 − e_BOS)ᵀ``, so the layer stays on SDPA. An IP-Adapter's image branch is left unmasked
  (as in the code's ``PILOT_IPAdapterAttnProcessor``).
* :class:`CentralisationRecorder` — during the gradient pass, reads each selected layer's pre-SBC attention
  probabilities (head mean, with autograd) and records the per-sample term ā_bg − ā_fg (paper Eqs. 12-14).

Both act only in the phases the pipeline sets on ``controller.state.phase``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from asuka.attention import AttentionControl, LayerTable, Read, TokenMasks
from asuka.pipelines.pilot.objective import attention_centralisation_term, attention_hole_mask

GRADIENT_PHASE = "pilot-gradient"
"""The conditional forward whose loss is differentiated (SBC on, terms recorded)."""
GUIDED_PHASE = "pilot-guided"
"""The classifier-free-guided denoising forward (SBC on, nothing recorded)."""


def semantic_layers(layers: LayerTable) -> LayerTable:
    """The layer set S of the semantic loss: every text cross-attention layer below the latent resolution (code:
    ``attn_loss_bank[2:13]``, the 11 SD-1.5 layers at 32², 16² and 8² for 512 px; paper §5.3 ablation, modules (II)
    and (III)). Chosen by resolution level, so it fits any UNet of SD's layout and any image size."""
    return layers.select(kind="cross", exclude_levels=0)


def hole_token_masks(latent_hole: torch.Tensor) -> TokenMasks:
    """Per-grid hole masks of a (B, 1, h, w) latent hole mask, resized the code's way (bilinear, then < 1 -> 0)."""
    return TokenMasks(latent_hole, resize=attention_hole_mask)


class BoundaryControl(AttentionControl):
    """SBC: post-softmax weight keeping BOS everywhere and the other text keys only at hole rows.

    The two rank factors are built per call from the cached token masks (a few kB; no dict of per-shape weights
    whose first fill a compiled pass would guard on)."""

    def __init__(self, masks: TokenMasks):
        self.masks = masks

    def active(self, layer, state) -> bool:
        return state.phase in (GRADIENT_PHASE, GUIDED_PHASE)

    def prob_weight(self, call):
        hole = self.masks.for_call(call)  # (B', N)
        rows = torch.stack([torch.ones_like(hole), hole], dim=-1)[:, None]  # (B', 1, N, 2)
        bos = F.one_hot(torch.zeros((), dtype=torch.long, device=hole.device), call.key.shape[2]).to(hole.dtype)
        return rows, torch.stack([bos, 1 - bos], dim=-1)[None, None]  # cols (1, 1, keys, 2)


class CentralisationRecorder(AttentionControl):
    """Records ā_bg − ā_fg per sample from the pre-SBC probabilities of its layers, during the gradient pass."""

    read = Read(what="probs", batch="all", heads="mean", grad=True)

    def __init__(self, masks: TokenMasks, words: torch.Tensor):
        self.masks = masks
        self.words = words
        self.terms: list[torch.Tensor] = []

    def active(self, layer, state) -> bool:
        return state.phase == GRADIENT_PHASE

    def on_read(self, call, maps: torch.Tensor) -> None:
        self.terms.append(attention_centralisation_term(maps[:, None], self.masks.for_call(call), self.words))

"""PILOT's objective, as pure per-sample functions (Pan et al., "Coherent and Multi-modality Image Inpainting via
Latent Space Optimization", arXiv 2407.08019 v2, §4.1; official code ``pipeline/pipeline_pilot.py`` and
``models/attn_processor.py`` of github.com/Lingzhi-Pan/PILOT).

Masks here are float tensors with **1 = hole** (the region to inpaint); PILOT's own code uses the opposite
(``mask`` = 1 on the background), which the pipeline converts at its boundary.

Every loss is returned **per sample** (shape ``(B,)``) and the optimiser sums them: a sample's latent only enters its
own loss, so the gradient of the sum is each sample's own gradient and a batch equals its single runs. (The official
code averages the semantic loss over the batch and reads the mask area of item 0 only, so its results depend on the
batch size.)
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from asuka.pipelines._sampling import predicted_x0

BG_LOSS_SCALE = 0.25
"""``cal_bg_loss`` maps latents with ``(x + 1) / 2`` before the squared difference, i.e. a factor 1/4."""


def background_loss(x0: torch.Tensor, source_latents: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """L_bg per sample (paper Eq. 9; code ``cal_bg_loss``): ``¼ Σ (1 − M)(z̃₀ − z_in)²`` over channels and pixels,
    a sum (not a mean), in latent space. ``hole``: (B, 1, h, w) latent mask, 1 = hole. Returns (B,)."""
    keep = 1 - hole
    return BG_LOSS_SCALE * (keep * (x0 - source_latents) ** 2).sum(dim=(1, 2, 3))


# ------------------------------------------------------------------------------------------------------ masks
def latent_hole_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Pixel mask (B, 1, H, W), 1 = hole -> latent mask at ``size`` (h, w): nearest neighbour, binary (code:
    ``F.interpolate(mask, (64, 64), mode='nearest')`` then a 0.5 threshold)."""
    return (F.interpolate(mask.float(), size=size, mode="nearest") >= 0.5).float()


def attention_hole_mask(latent_hole: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Latent mask (B, 1, h, w) -> the mask (B, 1, h_l, w_l) of an attention layer whose token grid is ``size``.

    Code (``__call__``, attention masks): bilinear resize (``align_corners=False``), then every value below 1 set
    to 0, so a coarse cell is hole only when all the source pixels it samples are hole (for a factor-2^k downsampling
    these are the central 2x2 pixels of its block), which acts like an erosion.
    """
    coarse = F.interpolate(latent_hole.float(), size=size, mode="bilinear", align_corners=False)
    return (coarse >= 1).float()


def sbc_weights(hole_tokens: torch.Tensor, num_keys: int) -> torch.Tensor:
    """Semantic Boundary Control mask M_ca (paper Eq. 11, code ``attn_processor.py``): (B, N) hole rows -> weights
    (B, 1, N, num_keys) that keep the first (BOS) key everywhere and the other keys only at hole rows."""
    rows = hole_tokens[:, None, :, None]
    weights = rows.expand(-1, -1, -1, num_keys).clone()
    weights[..., 0] = 1
    return weights


def apply_sbc(probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """SBC (paper Eq. 16): post-softmax masking of text attention probabilities (B, heads, N, keys), **without**
    renormalisation, so a background row's output is ``p_BOS · v_BOS`` (the other keys still set ``p_BOS``)."""
    return probs * weights.to(probs.dtype)


def word_token_mask(input_ids: torch.Tensor, special_ids: list[int] | tuple[int, ...]) -> torch.Tensor:
    """(B, T) token ids -> float (B, T) mask of the prompt's real word tokens: every position whose id is not a
    special token (BOS, EOS, padding), as the code's ``token_indices`` (ids 49406/49407 on SD-1.5's tokenizer)."""
    special = torch.tensor(sorted(set(special_ids)), device=input_ids.device, dtype=input_ids.dtype)
    return (~torch.isin(input_ids, special)).float()


def attention_centralisation_term(probs: torch.Tensor, hole_tokens: torch.Tensor,
                                  words: torch.Tensor) -> torch.Tensor:
    """One layer's ā_bg − ā_fg per sample (paper Eqs. 12-14; code ``attn_processor.py``).

    ``probs``: pre-SBC text attention (B, heads, N, T); ``hole_tokens``: (B, N), 1 = hole; ``words``: (B, T) word
    token mask. ā is the mean over heads and positions (of the background, resp. the hole) of the **total**
    attention mass on the word tokens. A layer where the hole covers no position or every position contributes 0
    (as in the code). Returns (B,) in [-1, 1].
    """
    mass = torch.einsum("bhnt,bt->bn", probs.float(), words.float()) / probs.shape[1]
    hole = hole_tokens.float()
    n_fg, n_bg = hole.sum(1), (1 - hole).sum(1)
    fg = (mass * hole).sum(1) / n_fg.clamp_min(1)
    bg = (mass * (1 - hole)).sum(1) / n_bg.clamp_min(1)
    return torch.where((n_fg > 0) & (n_bg > 0), bg - fg, torch.zeros_like(bg))


def semantic_loss(terms: list[torch.Tensor]) -> torch.Tensor:
    """L_s per sample: the mean of the layer terms over the selected layers (code: ``sum(bank[2:13]) / 11``)."""
    if not terms:
        raise ValueError("semantic_loss: no layer terms were recorded (no selected cross-attention layer ran)")
    return torch.stack(terms).mean(0)


class PilotLoss:
    """``L = L_bg + λ·L_s`` per sample at one timestep (paper Eq. 15; code ``optimize_xt``).

    ``forward(z)`` is the conditional noise prediction at this timestep (the UNet, no CFG, with SBC on and the
    semantic terms recorded into ``terms``, a list it clears and fills); ``alpha_bar``: ᾱ_t; ``lam``: λ_t per sample
    (B,). ``parts(z)`` gives (L_bg, L_s), each (B,).
    """

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], terms: list[torch.Tensor],
                 source_latents: torch.Tensor, hole: torch.Tensor, alpha_bar: torch.Tensor, lam: torch.Tensor):
        self.forward, self.terms = forward, terms
        self.source_latents, self.hole, self.alpha_bar, self.lam = source_latents, hole, alpha_bar, lam

    def parts(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.terms.clear()
        eps = self.forward(z)
        x0 = predicted_x0(z, eps.float(), self.alpha_bar)
        semantic = semantic_loss(self.terms)
        self.terms.clear()
        return background_loss(x0, self.source_latents, self.hole), semantic

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        bg, semantic = self.parts(z)
        return bg + self.lam * semantic

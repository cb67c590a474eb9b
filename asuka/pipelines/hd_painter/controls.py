"""HD-Painter's attention controls on :mod:`asuka.attention`: PAIntA on the self-attention layers at latent/2 and
latent/4 and RASG's store of the conditional cross-attention logits at latent/4 (paper §3.3-3.4; official
``src/smplfusion/patches/{attentionpatch,transformerpatch}/painta.py`` and ``src/methods/rasg.py``).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from asuka.attention import AttentionController, AttentionControl, AttentionStore, Read, TokenMasks, blocks_after
from asuka.attention.functional import attention_scores, split_heads
from asuka.errors import InputError
from asuka.pipelines.hd_painter import painta, rasg
from asuka.pipelines.hd_painter.preprocess import attention_mask

PAINTA_LEVELS = (1, 2)          # latent/2 and latent/4 (H/16 and H/32 of the image)
RASG_LEVEL = 2                  # latent/4 (H/32)
PAINTA_UNTIL = 500              # PAIntA acts while t > 500 (official ``timestep <= 500`` switch; the first half)

CMode = Literal["batch", "store", "reuse"]


class PAIntA(AttentionControl):
    """Prompt-Aware Introverted Attention on self-attention layers (multiplicative, pre-softmax).

    ``c`` is computed from the conditional samples only, from the same block's cross-attention weights:
    ``Q_c = attn2.to_q(norm2(X + Y))`` with ``X`` the block input and ``Y`` the vanilla self-attention output,
    ``K_c = attn2.to_k(text)``; then :func:`asuka.pipelines.hd_painter.painta.compute_c`. The same ``c`` multiplies
    the logits of masked queries to known keys in both CFG halves (official code). ``c`` is not detached (RASG's
    gradient flows through it, as in the official code).

    ``mode``: "batch" (the CFG batch or a conditional-only batch: compute c from the conditional samples), "store"
    (compute and keep c per layer: the conditional pass of RASG's low-memory mode), "reuse" (use the kept c: the
    unconditional pass of that mode).
    """

    needs_block_input = True

    def __init__(self, masks: TokenMasks, weights: torch.Tensor, smooth: bool = True, until: int = PAINTA_UNTIL):
        self.masks, self.weights, self.smooth, self.until = masks, weights, smooth, until
        self.mode: CMode = "batch"
        self._kept: dict[int, torch.Tensor] = {}

    def active(self, layer, state) -> bool:
        return state.timestep is not None and state.timestep > self.until

    def coefficients(self, call) -> torch.Tensor:
        """``c`` (B_cond, N) of this call from its conditional samples."""
        block, cond = call.layer.transformer_block, call.cond
        cross = block.attn2
        text = call.block_encoder_hidden_states
        text = text[0] if isinstance(text, tuple) else text        # IP-Adapter passes (text, image embeds)
        x, y = call.block_input[cond], call.original_output()[cond]
        q = split_heads(cross.to_q(block.norm2(x + y)), cross.heads)
        k = split_heads(cross.to_k(text[cond]), cross.heads)
        probs = attention_scores(q, k, cross.scale).softmax(-1)    # (B, heads, N, 77), float32
        return painta.compute_c(probs, self.weights, call.grid, self.smooth)

    def score_factor(self, call) -> torch.Tensor:
        if self.mode == "reuse":
            c = self._kept[call.layer.index]
        else:
            c = self.coefficients(call)
            if self.mode == "store":
                self._kept[call.layer.index] = c.detach()
        if call.state.cfg:
            c = torch.cat([c, c])                                  # same c for the unconditional half
        return painta.logit_scale(c, self.masks.for_call(call))[:, None]

    def clear(self) -> None:
        self._kept.clear()


def check_blocks(controller: AttentionController) -> None:
    """PAIntA re-computes ``norm2(X + attn1(norm1(X)))``: only SD's plain transformer blocks compute exactly that."""
    for layer in controller.layers.select(kind="self", levels=PAINTA_LEVELS):
        block = layer.transformer_block
        if (getattr(block, "norm_type", "layer_norm") != "layer_norm" or getattr(block, "only_cross_attention", False)
                or getattr(block, "pos_embed", None) is not None or getattr(block, "attn2", None) is None):
            raise InputError(f"{layer.name} is not a Stable Diffusion transformer block (layer norm, self- then "
                             "cross-attention); PAIntA supports SD-1.x/2.x UNets only - pass painta=False", "unet")


class HDPainterControls:
    """PAIntA and RASG installed on one UNet for one pipeline call (either may be off).

    ``mask`` (B,1,H,W) is the padded working-size mask (1 = hole); both methods resize it to their token grids with
    antialiased bicubic + ``> 0.5`` (official ``InputMask``). ``weights`` (B, 77) is the token set.
    """

    def __init__(self, unet, mask: torch.Tensor, weights: torch.Tensor, *, use_painta: bool, use_rasg: bool,
                 smooth: bool = True):
        self.controller = AttentionController(unet)
        self.masks = TokenMasks(mask, resize=attention_mask)
        self.weights = weights
        self.painta = self.store = None
        self._hooks: list = []
        if use_painta:
            check_blocks(self.controller)
            self.painta = self.controller.add(PAIntA(self.masks, weights, smooth),
                                              self.controller.layers.select(kind="self", levels=PAINTA_LEVELS))
        if use_rasg:
            self.rasg_layers = self.controller.layers.select(kind="cross", levels=RASG_LEVEL)
            self.store = self.controller.add(
                AttentionStore(Read("scores", batch="cond", heads="mean", grad=True),
                               when=lambda layer, state: state.phase != "uncond"), self.rasg_layers)

    @property
    def state(self):
        return self.controller.state

    def blocks_after_rasg(self) -> list[nn.Module]:
        """The UNet's top-level blocks that run after the block holding the last RASG layer (SD: ``up_blocks.2`` and
        ``up_blocks.3``, the 32x32 and 64x64 levels at 512 px): RASG's loss does not depend on them."""
        return blocks_after(self.controller.unet, self.rasg_layers[-1])

    def __enter__(self) -> "HDPainterControls":
        self.controller.__enter__()
        self._hooks = []
        if self.store is not None:
            try:
                self._hooks = [b.register_forward_pre_hook(_detach_when_grad, with_kwargs=True)
                               for b in self.blocks_after_rasg()]
            except BaseException:
                self.controller.__exit__(None, None, None)
                raise
        return self

    def rasg_mask(self, latent_size: tuple[int, int]) -> torch.Tensor:
        """(B, N) mask at RASG's latent/4 grid."""
        return self.masks.at(self.rasg_layers[0].grid(latent_size))

    def rasg_loss(self, latent_size: tuple[int, int]) -> torch.Tensor:
        """RASG's BCE objective summed over the batch (samples are independent, so each sample's gradient is its
        own loss's) from the maps stored during the last conditional pass."""
        mean_logits = rasg.mean_cross_attention(self.store.maps)
        return rasg.bce_loss(mean_logits, self.rasg_mask(latent_size), self.weights).sum()

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self.store is not None:
            self.store.clear()
        if self.painta is not None:
            self.painta.clear()
        self.controller.__exit__(*exc)


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detach(v) for v in value)
    return value


def _detach_when_grad(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook on the blocks after the last RASG layer: during RASG's gradient pass their inputs (including
    the skip connections) are detached, so autograd records nothing there (same values; RASG's loss never depends on
    them). The backward already skipped these blocks; this saves the activations and the bookkeeping of the
    highest-resolution up blocks in the forward."""
    if not torch.is_grad_enabled():
        return None
    return _detach(args), {name: _detach(value) for name, value in kwargs.items()}

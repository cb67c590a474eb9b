"""ASUKA's two alignment heads for FLUX.1-Fill and their null embeddings (ASUKA-FLUX ``test_asuka_flux.py``,
``src/flux/modules/layers.py::SingleStreamBlockAsuka``).

The released port aligns the MAE prior features (B, 256, 512) to FLUX's two text slots:

* ``clip``: ``Linear(512, 768)`` + 4 FLUX single-stream blocks (12 heads of 64) + LayerNorm, then the **mean over
  the 256 tokens** -> (B, 768), FLUX's CLIP-pooled ``vec`` / diffusers' ``pooled_prompt_embeds``;
* ``t5``: the same at width 4096 (64 heads) -> (B, 256, 4096), FLUX's T5 ``txt`` / diffusers' ``prompt_embeds``,
  used with all-zero text ids (diffusers' ``text_ids``).

Inference interpolates toward the empty-prompt embeddings, ``c = c_null + w·(c_mae - c_null)`` with ``w = 0.5`` (the
official ``--condition_weight`` default). ``null_pooled`` (1, 768) and ``null_text`` (1, 256, 4096) are saved with the
heads (the release's ``vec.pt`` / ``txt_256.pt``: CLIP's pooled output and T5's 256-token output for ``""``).
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from asuka.models.aligner import PriorAligner

OFFICIAL_CONDITION_WEIGHT = 0.5


def interpolate_condition(condition: torch.Tensor, null: torch.Tensor, weight: float) -> torch.Tensor:
    """``null + weight·(condition - null)`` (``null`` broadcast over the batch), computed in float32."""
    null = null.to(device=condition.device, dtype=torch.float32)
    return null + weight * (condition.float() - null)


class FluxPriorAligner(ModelMixin, ConfigMixin):
    """The CLIP-pooled and T5 alignment heads of ASUKA-FLUX plus the null (empty-prompt) embeddings.

    Args:
        in_dim: MAE feature width (512; 513 with the MAE's ``mask_concat``).
        pooled_dim: CLIP pooled width (768), the width of the ``clip`` head.
        text_dim: T5 width (4096), the width of the ``t5`` head.
        null_tokens: tokens of ``null_text`` (256 = the MAE's tokens, the release's ``txt_256.pt``).
        num_blocks, head_dim, mlp_ratio: the heads' single-stream blocks (4, 64, 4 in the release).
        keep_unused_modulation: create the port's never-called ``modulation`` layers (to load its state dicts strictly).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(self, in_dim: int = 512, pooled_dim: int = 768, text_dim: int = 4096, null_tokens: int = 256,
                 num_blocks: int = 4, head_dim: int = 64, mlp_ratio: float = 4.0,
                 keep_unused_modulation: bool = False):
        super().__init__()
        common = dict(in_dim=in_dim, num_blocks=num_blocks, head_dim=head_dim, mlp_ratio=mlp_ratio,
                      block_type="flux_single_stream", keep_unused_modulation=keep_unused_modulation)
        self.clip = PriorAligner(cross_attention_dim=pooled_dim, **common)
        self.t5 = PriorAligner(cross_attention_dim=text_dim, **common)
        self.register_buffer("null_pooled", torch.zeros(1, pooled_dim))
        self.register_buffer("null_text", torch.zeros(1, null_tokens, text_dim))

    @classmethod
    def from_heads(cls, clip: PriorAligner, t5: PriorAligner, null_pooled: torch.Tensor | None = None,
                   null_text: torch.Tensor | None = None) -> "FluxPriorAligner":
        """Combine two ``flux_single_stream`` ``PriorAligner`` heads (e.g. converted from the release) and the nulls."""
        for name, head in (("clip", clip), ("t5", t5)):
            if head.config.block_type != "flux_single_stream":
                raise ValueError(f"{name} head must have block_type='flux_single_stream', got {head.config.block_type!r}")
        a, b = clip.config, t5.config
        shared = ("in_dim", "num_blocks", "head_dim", "mlp_ratio", "keep_unused_modulation")
        if any(a[k] != b[k] for k in shared):
            raise ValueError(f"the clip and t5 heads must share {', '.join(shared)}")
        tokens = null_text.shape[-2] if null_text is not None else 256
        model = cls(in_dim=a.in_dim, pooled_dim=a.cross_attention_dim, text_dim=b.cross_attention_dim,
                    null_tokens=tokens, num_blocks=a.num_blocks, head_dim=a.head_dim, mlp_ratio=a.mlp_ratio,
                    keep_unused_modulation=a.keep_unused_modulation)
        model.clip.load_state_dict(clip.state_dict())
        model.t5.load_state_dict(t5.state_dict())
        if null_pooled is not None or null_text is not None:
            model.set_null_embeddings(null_pooled if null_pooled is not None else model.null_pooled,
                                      null_text if null_text is not None else model.null_text)
        return model

    @torch.no_grad()
    def set_null_embeddings(self, pooled: torch.Tensor, text: torch.Tensor) -> None:
        """Store the empty-prompt embeddings: ``pooled`` (1, pooled_dim) or (pooled_dim,), ``text`` (1, null_tokens,
        text_dim) or (null_tokens, text_dim)."""
        pooled = pooled.reshape(1, -1)
        text = text.reshape(1, *text.shape[-2:])
        if pooled.shape != self.null_pooled.shape or text.shape != self.null_text.shape:
            raise ValueError(f"null embeddings must be {tuple(self.null_pooled.shape)} and {tuple(self.null_text.shape)}, "
                             f"got {tuple(pooled.shape)} and {tuple(text.shape)}")
        self.null_pooled.copy_(pooled)
        self.null_text.copy_(text)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, in_dim) MAE features -> ``(text (B, N, text_dim), pooled (B, pooled_dim))``: the ``t5`` head's tokens
        and the token mean of the ``clip`` head (``torch.mean(clip_fea, dim=1)`` in the port)."""
        return self.t5(features), self.clip(features).mean(dim=1)

    def interpolate(self, text: torch.Tensor, pooled: torch.Tensor,
                    weight: float = OFFICIAL_CONDITION_WEIGHT) -> tuple[torch.Tensor, torch.Tensor]:
        """The port's condition weighting toward the null embeddings (float32): ``weight`` 1 = the aligned condition
        alone, 0 = the empty prompt."""
        if text.shape[-2:] != self.null_text.shape[-2:]:
            raise ValueError(f"text condition has {tuple(text.shape[-2:])} tokens x width but the null embedding "
                             f"{tuple(self.null_text.shape[-2:])}")
        return interpolate_condition(text, self.null_text, weight), interpolate_condition(pooled, self.null_pooled, weight)

"""ASUKA's alignment module: MAE prior features (B, 256, 512) -> SD condition (B, 256, cross_attention_dim).

Paper §3.2 ("Align MAE prior with SD"): a linear *dimension alignment* M_m=512 -> M_s, then self-attention blocks for
*distribution alignment* (4 blocks, §4 implementation details), keeping N_s = N_m = 256 tokens. The output replaces the
text condition of the frozen SD-1.5-inpainting UNet (``encoder_hidden_states`` / ``prompt_embeds``).

Two block types (paper §3.2; the FLUX port Yikai-Wang/asuka-misato ``asuka-flux/src/flux/modules/layers.py``; the SD code is unreleased):

* ``"prenorm"`` (default, the paper's "self-attention blocks"): a standard pre-LN transformer block,
  ``x + Attn(LN(x))`` then ``x + MLP(LN(x))`` with head dim 64 and a GELU MLP of ratio 4.
* ``"flux_single_stream"`` (the official FLUX port, ``SingleStreamBlockAsuka``): one parallel attention + MLP branch on a
  non-affine LayerNorm (eps 1e-6), QK-RMSNorm with a learnable scale per head dim, GELU-tanh, no positional embedding.
  The port also creates a ``modulation`` Linear(hidden, 3*hidden) that is never called; ``keep_unused_modulation=True``
  keeps it so that the released state dicts load strictly (it does not change the output).

Neither type adds a positional embedding: position comes from the MAE decoder's sin-cos embedding baked into the features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin  # also how diffusers finds load methods via model_index.json
from torch import nn

from asuka.models.checkpointing import run_module

BLOCK_TYPES = ("prenorm", "flux_single_stream")


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, L, H*D) -> (B, H, L, D)."""
    b, l, _ = x.shape
    return x.view(b, l, num_heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, L, D) -> (B, L, H*D)."""
    b, h, l, d = x.shape
    return x.transpose(1, 2).reshape(b, l, h * d)


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """FLUX's RMSNorm: computed in float32, cast back, then multiplied by the learnable ``scale``."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return normed.to(x.dtype) * scale


class RMSNorm(nn.Module):
    """RMSNorm over the last dim with a learnable ``scale`` (FLUX's parameter name, for key compatibility)."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.scale)


class QKNorm(nn.Module):
    """RMS-normalises queries and keys per head (FLUX ``QKNorm``); both are cast to the values' dtype."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.query_norm(q).to(v.dtype), self.key_norm(k).to(v.dtype)


class Modulation(nn.Module):
    """FLUX's single-stream ``Modulation`` layer. ASUKA's port creates it and never calls it (kept for loading only)."""

    def __init__(self, dim: int):
        super().__init__()
        self.lin = nn.Linear(dim, 3 * dim)


class PreNormBlock(nn.Module):
    """Pre-LN ViT block: ``x + proj(SDPA(qkv(LN(x))))``, then ``x + fc2(GELU(fc1(LN(x))))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (split_heads(t, self.num_heads) for t in self.qkv(self.norm1(x)).chunk(3, dim=-1))
        x = x + self.proj(merge_heads(F.scaled_dot_product_attention(q, k, v)))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class FluxSingleStreamBlock(nn.Module):
    """ASUKA-FLUX ``SingleStreamBlockAsuka``: parallel attention + MLP with QK-RMSNorm and no modulation applied.

    ``x_mod = LN(x)`` (non-affine, eps 1e-6); ``qkv, mlp = split(linear1(x_mod))``; q, k RMS-normalised per head;
    ``out = linear2(cat(SDPA(q, k, v), GELU_tanh(mlp)))``; returns ``x + out``. Attribute names follow the port.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, keep_unused_modulation: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.hidden_size = dim
        self.mlp_hidden_dim = int(dim * mlp_ratio)
        self.linear1 = nn.Linear(dim, 3 * dim + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(dim + self.mlp_hidden_dim, dim)
        self.norm = QKNorm(dim // num_heads)
        self.pre_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(dim) if keep_unused_modulation else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv, mlp = self.linear1(self.pre_norm(x)).split([3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
        # "B L (K H D) -> K B H L D": q, k, v are the three contiguous thirds of qkv.
        q, k, v = (split_heads(t, self.num_heads) for t in qkv.chunk(3, dim=-1))
        q, k = self.norm(q, k, v)
        attn = merge_heads(F.scaled_dot_product_attention(q, k, v))
        return x + self.linear2(torch.cat((attn, self.mlp_act(mlp)), dim=-1))


class PriorAligner(ModelMixin, ConfigMixin):
    """Linear(in_dim -> cross_attention_dim), ``num_blocks`` transformer blocks, final affine LayerNorm (paper §3.2).

    Args:
        in_dim: MAE feature width M_m (512: the MAE decoder width).
        cross_attention_dim: SD condition width M_s (768 for SD-1.5); also the blocks' width, as in the paper and port.
        num_blocks: number of self-attention blocks (4, paper §4).
        head_dim: attention head width (64, the FLUX port's ``head_num = dim // 64``).
        mlp_ratio: MLP expansion (4, both ViT and FLUX).
        block_type: ``"prenorm"`` (paper, default) or ``"flux_single_stream"`` (official FLUX port).
        keep_unused_modulation: only for ``"flux_single_stream"``: create the port's unused ``modulation`` layers so
            its state dicts load strictly. Off by default (the layers are never called).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(self, in_dim: int = 512, cross_attention_dim: int = 768, num_blocks: int = 4, head_dim: int = 64,
                 mlp_ratio: float = 4.0, block_type: str = "prenorm", keep_unused_modulation: bool = False):
        super().__init__()
        if block_type not in BLOCK_TYPES:
            raise ValueError(f"block_type={block_type!r} is not supported; choose one of {BLOCK_TYPES}.")
        if cross_attention_dim % head_dim:
            raise ValueError(f"cross_attention_dim={cross_attention_dim} must be a multiple of head_dim={head_dim}.")
        if keep_unused_modulation and block_type != "flux_single_stream":
            raise ValueError("keep_unused_modulation=True only applies to block_type='flux_single_stream'.")
        heads = cross_attention_dim // head_dim
        self.proj_in = nn.Linear(in_dim, cross_attention_dim)
        if block_type == "prenorm":
            blocks = [PreNormBlock(cross_attention_dim, heads, mlp_ratio) for _ in range(num_blocks)]
        else:
            blocks = [FluxSingleStreamBlock(cross_attention_dim, heads, mlp_ratio, keep_unused_modulation)
                      for _ in range(num_blocks)]
        self.blocks = nn.ModuleList(blocks)
        self.norm_out = nn.LayerNorm(cross_attention_dim)
        self.gradient_checkpointing = False

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, N, in_dim) MAE prior features -> (B, N, cross_attention_dim) condition C_MAE."""
        if features.ndim != 3 or features.shape[-1] != self.config.in_dim:
            raise ValueError(f"features must have shape (B, N, {self.config.in_dim}), got {tuple(features.shape)}.")
        x = self.proj_in(features.to(self.proj_in.weight.dtype))
        for block in self.blocks:
            x = run_module(self, block, x)
        return self.norm_out(x)

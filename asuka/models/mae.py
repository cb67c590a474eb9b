"""ASUKA's MAE prior: MAE-FAR's inpainting "finetune" MAE (ViT-B/16 at 256², no cls token).

Facts (Yikai-Wang/asuka-misato ``asuka-flux/MAE/models_mae.py``; MAE-FAR ``MaskedAutoencoderViTFinetune``; ASUKA-FLUX ``forward_return_feature``):

* Encoder: ViT-B/16 (768-d, 12 blocks, 12 heads, qkv bias, LayerNorm eps 1e-6) on a 16×16 patch grid of a
  256² image, with fixed 2-D sin-cos position embeddings and **no cls token** (256 tokens).
* Decoder: 512-d, 8 blocks, 16 heads, fixed sin-cos position embeddings, ``decoder_pred`` to 16·16·3 pixels.
* Inpainting extras: ``decoder_patch_embed`` embeds ``cat[image·(1-mask), mask]`` (4 channels) and is mixed
  into *partially* masked patches as ``alpha·mask_token + (1-alpha)·embed`` with a learnable scalar
  ``alpha`` (init 1) clamped to [0, 1].
* Inference keeps all tokens: the encoder masks the attention **keys** of every patch touched by the
  hole; the decoder replaces those patches by ``mask_token`` (partial ones get the alpha mix) and runs
  unmasked. The ASUKA prior features are the decoder hidden state *before* decoder block 6 (after
  blocks 0–5), not normalised, all 256 tokens: (B, 256, 512).
* Training (MAE-FAR ``forward``): adaptive random masking to exactly 75 % of the patches (real-mask
  patches always dropped), MSE on the hole pixels (real + added) of the ImageNet-normalised image.

Parameter names follow MAE-FAR's checkpoint layout one to one, so ``convert.py`` is a plain key check.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from diffusers.utils.accelerate_utils import apply_forward_hook
from timm.models.vision_transformer import Block, PatchEmbed
from torch import nn

from asuka.models.checkpointing import run_module
from asuka.models.seeding import seeded

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------------------
# Pure helpers
# ----------------------------------------------------------------------------------------------------------
def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position table of MAE (``get_2d_sincos_pos_embed``, no cls row), float64 math.

    Token ``i·grid + j`` (row i, column j): the first ``embed_dim/2`` channels encode the column j as
    ``[sin(j·ω), cos(j·ω)]``, the second half the row i, with ``ω_k = 10000^(-k/(embed_dim/4))``.
    Returns (grid², embed_dim) float32.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be a multiple of 4 for 2-D sin-cos embeddings, got {embed_dim}")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def one_dim(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([one_dim(cols), one_dim(rows)], dim=1).float()


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p·p·C) in MAE's order (row-major patches, pixel-major then channel)."""
    b, c, h, w = images.shape
    gh, gw = h // patch_size, w // patch_size
    x = images.reshape(b, c, gh, patch_size, gw, patch_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, patch_size * patch_size * c)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify` for a square patch grid: (B, L, p·p·C) -> (B, C, H, W)."""
    b, length, _ = patches.shape
    grid = math.isqrt(length)
    x = patches.reshape(b, grid, grid, patch_size, patch_size, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, grid * patch_size, grid * patch_size)


def patch_coverage(mask: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch hole coverage of a binary (B, 1, H, W) mask (1 = hole).

    Returns ``(touched, full)``, both (B, L) bool: a patch is *touched* (masked, in MAE-FAR's
    ``area > 0`` sense) if any of its pixels is a hole and *full* if all are (``area == 1``).
    """
    patches = patchify(mask, patch_size)
    return patches.amax(dim=-1) > 0.5, patches.amin(dim=-1) > 0.5


def _area_weights(src: int, dst: int) -> torch.Tensor:
    """(dst, src) weights of ``cv2.INTER_AREA`` along one axis when shrinking: output pixel ``d`` averages the source
    interval ``[d·s, (d+1)·s)`` (``s = src/dst``), each source pixel weighted by its overlap (fractional at the ends),
    divided by ``s`` (OpenCV ``computeResizeAreaTab``)."""
    scale = src / dst
    start = torch.arange(dst, dtype=torch.float64)[:, None] * scale
    pixel = torch.arange(src, dtype=torch.float64)[None, :]
    overlap = (torch.minimum(start + scale, pixel + 1) - torch.maximum(start, pixel)).clamp_min(0)
    return overlap / overlap.sum(dim=1, keepdim=True)


def _area_linear_weights(src: int, dst: int) -> torch.Tensor:
    """(dst, src) weights of ``cv2.INTER_AREA`` along one axis when the image grows on some axis: OpenCV then runs
    its 2-tap linear resampler with area coefficients, ``sx = floor(d·s)``, ``fx = (d+1) - (sx+1)/s`` and
    ``fx = 0 if fx <= 0 else frac(fx)``, weights ``1-fx`` on ``sx`` and ``fx`` on ``sx+1`` (clamped at the border)."""
    inv_scale = dst / src
    scale = 1.0 / inv_scale
    out = torch.zeros(dst, src, dtype=torch.float64)
    for d in range(dst):
        sx = math.floor(d * scale)
        fx = (d + 1) - (sx + 1) * inv_scale
        fx = 0.0 if fx <= 0 else fx - math.floor(fx)
        fx = float(torch.tensor(fx, dtype=torch.float32))  # OpenCV stores the coefficient as float
        if sx >= src - 1:
            sx, fx = src - 1, 0.0
        out[d, sx] += 1 - fx
        if fx:
            out[d, sx + 1] += fx
    return out


@functools.lru_cache(maxsize=32)
def _inter_area_matrices(size_in: tuple[int, int], size_out: tuple[int, int], device: torch.device,
                         dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows (H', H), transposed columns (W, W')) matrices of ``cv2.resize(INTER_AREA)`` (separable in both paths),
    built once per sizes, device and dtype (no host-to-device copy per call)."""
    (h, w), (oh, ow) = size_in, size_out
    weights = _area_weights if oh <= h and ow <= w else _area_linear_weights
    return weights(h, oh).to(device, dtype), weights(w, ow).T.contiguous().to(device, dtype)


@functools.lru_cache(maxsize=64)
def _nearest_indices(src: int, dst: int, device: torch.device) -> torch.Tensor:
    """``cv2.INTER_NEAREST``'s source index per output pixel: ``min(floor(d · (1 / (dst/src))), src - 1)`` in double
    precision, OpenCV's exact rounding (torch's ``"nearest"`` differs where ``d·src/dst`` is an integer); built once
    per sizes and device."""
    scale = 1.0 / (dst / src)
    return torch.tensor([min(math.floor(d * scale), src - 1) for d in range(dst)], device=device)


def resize_mask_nearest(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize (B, C, H, W) exactly like ``cv2.resize(..., interpolation=cv2.INTER_NEAREST)``: two index gathers."""
    h, w = mask.shape[-2:]
    rows = _nearest_indices(h, int(size[0]), mask.device)
    cols = _nearest_indices(w, int(size[1]), mask.device)
    return mask.index_select(-2, rows).index_select(-1, cols)


def resize_image(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize (B, C, H, W) exactly like ``cv2.resize(..., interpolation=cv2.INTER_AREA)`` on float input.

    Shrinking on both axes averages each output pixel's source box with fractional weights at its edges; otherwise
    (the image grows on an axis) OpenCV falls back to its linear resampler with area coefficients on both axes — both
    rules are reproduced (:func:`_area_weights`, :func:`_area_linear_weights`) as two batched matrix products on
    ``x``'s device and dtype (float32 accumulation; uint8 sources rounded by OpenCV differ by at most half a level).
    """
    h, w = x.shape[-2:]
    size = (int(size[0]), int(size[1]))
    if (h, w) == size:
        return x
    compute = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    rows, cols_t = _inter_area_matrices((h, w), size, x.device, compute)
    return (rows @ x.to(compute) @ cols_t).to(x.dtype)


def preprocess(image: torch.Tensor, mask: torch.Tensor, size: int = 256,
               known_only: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """ASUKA's MAE input preprocessing (``asuka-flux/datas/misato_dataset.py::prepare_data``), on tensors.

    ``image`` (B, 3, H, W) in [-1, 1] and ``mask`` (B, 1, H, W), 1 = hole, of any size, binarised at 0.5. The
    mask is resized with nearest neighbour (:func:`resize_mask_nearest`, ``cv2.INTER_NEAREST``); the image is resized
    to ``size``² with :func:`resize_image` (``cv2.INTER_AREA``, exact at every size) and ImageNet-normalised;
    hole pixels are set to 0 in the normalised space. Non-square inputs are squashed (as the official code does).

    ``known_only`` (default True, ours): the resize is mask-normalised, ``resize(image·known) / resize(known)``,
    so only known pixels are averaged and hole content cannot leak into known pixels next to the hole (exact
    invariance to hole content). Away from the hole (and for inputs already at ``size``²) it equals the official
    resize. ``known_only=False``: the official full-image resize (hole colours bleed into the known pixels
    within one source box of the hole).
    Returns ``(x_norm_masked (B, 3, size, size), mask (B, 1, size, size) in {0, 1})``.
    """
    _check_image_mask(image, mask)
    mean = image.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = image.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    hole = (mask > 0.5).to(image.dtype)
    if known_only:
        known = 1 - hole
        weight = resize_image(known, (size, size))
        x = resize_image((image + 1) / 2 * known, (size, size)) / weight.clamp_min(1e-6)
    else:
        x = resize_image((image + 1) / 2, (size, size))
    m = resize_mask_nearest(hole, (size, size))
    x = (x - mean) / std
    return x * (1 - m), m


def postprocess(pred_norm: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """ImageNet-normalised prediction -> [-1, 1] image (clamped) resized to ``size`` with :func:`resize_image`."""
    mean = pred_norm.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = pred_norm.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    image = ((pred_norm * std + mean) * 2 - 1).clamp(-1, 1)
    return resize_image(image, size)


def _check_image_mask(image: torch.Tensor, mask: torch.Tensor) -> None:
    if not isinstance(image, torch.Tensor) or not isinstance(mask, torch.Tensor):
        raise TypeError("image and mask must be torch tensors; use asuka.pipelines._common.load_image/load_mask "
                        f"for files, PIL or numpy (got {type(image).__name__}, {type(mask).__name__})")
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"image must have shape (B, 3, H, W) in [-1, 1], got {tuple(image.shape)}")
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must have shape (B, 1, H, W) with 1 = hole, got {tuple(mask.shape)}; "
                         "add the channel axis with mask[:, None]")
    if mask.shape[0] != image.shape[0] or mask.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"mask {tuple(mask.shape)} must match image {tuple(image.shape)} in batch size and H, W")
    if not image.is_floating_point():
        raise TypeError(f"image must be a floating-point tensor in [-1, 1], got dtype {image.dtype}")


def clamp_alpha(alpha: torch.Tensor) -> torch.Tensor:
    """``alpha`` clamped to [0, 1] with the gradient kept *at* the bounds (zero only strictly outside).

    MAE-FAR initialises ``alpha = 1`` and clamps with ``torch.clamp``; recent torch versions give zero
    gradient at the bound itself, which would freeze ``alpha`` (and ``decoder_patch_embed``) at init.
    """
    inside = (alpha >= 0) & (alpha <= 1)
    return torch.where(inside, alpha, alpha.detach().clamp(0.0, 1.0))


@dataclass
class PatchMasking:
    """Result of :func:`adaptive_random_masking` for a (B, L) patch grid and ``K = int(L·(1-ratio))``.

    ids_keep: (B, K) long, the patch indices fed to the encoder (MAE's gather).
    keep_valid: (B, K) bool, False where a kept slot holds a hole patch (only when the hole touches more
        than ``L - K`` patches); such slots are masked as attention keys and their output is discarded.
    dropped: (B, L) bool, patches hidden from the encoder (every hole patch plus the random ones).
    added: (B, L) bool, the randomly added patches (dropped but untouched by the hole).
    """

    ids_keep: torch.Tensor
    keep_valid: torch.Tensor
    dropped: torch.Tensor
    added: torch.Tensor


def adaptive_random_masking(touched: torch.Tensor, mask_ratio: float = 0.75,
                            generator: Optional[torch.Generator] = None) -> PatchMasking:
    """MAE-FAR's adaptive random masking (paper §3.1 "enlarge the mask ratio to 75 %"), leak-free.

    ``touched`` (B, L) bool marks patches touched by the real hole (:func:`patch_coverage`). Every touched
    patch is dropped; untouched patches are dropped at random until exactly ``L - K`` are, with
    ``K = int(L·(1-mask_ratio))`` (64 of 256 at 0.75), i.e. per-sample ``argsort(noise + touched)`` keeps the
    K smallest. Fix of the leak (specs §1.1.1 "Edge case"): when the hole touches more than ``L - K``
    patches MAE-FAR keeps (and leaks) some hole patches; here those slots stay in the fixed-size gather
    (equal K across the batch, no host sync) but are flagged ``keep_valid=False``: the encoder masks them as
    attention keys and the decoder replaces them by the mask token, so no hole pixel reaches the encoder's
    visible tokens and more than ``mask_ratio`` of the patches are dropped.
    """
    if touched.ndim != 2 or touched.dtype != torch.bool:
        raise ValueError(f"touched must be a (B, L) bool tensor, got {tuple(touched.shape)} {touched.dtype}")
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    b, length = touched.shape
    len_keep = int(length * (1 - mask_ratio))
    noise = torch.rand(b, length, generator=generator, device=touched.device) + touched.float()
    ids_keep = noise.argsort(dim=1)[:, :len_keep]
    keep_valid = ~touched.gather(1, ids_keep)
    visible = torch.zeros_like(touched).scatter(1, ids_keep, keep_valid)
    dropped = ~visible
    return PatchMasking(ids_keep=ids_keep, keep_valid=keep_valid, dropped=dropped, added=dropped & ~touched)


def training_loss_mask(mask: torch.Tensor, added: torch.Tensor, patch_size: int) -> torch.Tensor:
    """MAE-FAR's pixel loss mask (``irr_mask``): the real hole pixels plus the full randomly added patches.

    (Every patch touched by the real hole is dropped by :func:`adaptive_random_masking`, so the real mask
    restricted to dropped patches is the whole real mask.) Returns (B, 1, H, W) in {0, 1}.
    """
    b, _, h, w = mask.shape
    grid_h, grid_w = h // patch_size, w // patch_size
    added_px = added.to(mask.dtype).reshape(b, 1, grid_h, grid_w)
    added_px = added_px.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)
    return torch.maximum(mask, added_px)


def masked_mse_loss(pred: torch.Tensor, target: torch.Tensor, loss_mask: torch.Tensor, patch_size: int,
                    norm_pix: bool = False) -> torch.Tensor:
    """MAE-FAR's fine-tuning loss: squared error averaged over hole pixels (and channels) only.

    ``pred``/``target`` (B, 3, H, W) in the ImageNet-normalised space (MAE-FAR's ``norm_pix_loss=False``:
    the target is the normalised image itself, not per-patch normalised; it is *not* a per-patch mean
    first — "should not get mean loss for ft"). ``norm_pix=True`` normalises each target patch by its
    mean and (unbiased) variance + 1e-6 as MAE does. An empty mask gives 0, never NaN.
    """
    target_p = patchify(target, patch_size)
    if norm_pix:
        mean = target_p.mean(dim=-1, keepdim=True)
        var = target_p.var(dim=-1, keepdim=True)
        target_p = (target_p - mean) / (var + 1.0e-6).sqrt()
    weight = patchify(loss_mask.expand_as(target).to(pred.dtype), patch_size)
    err = (patchify(pred, patch_size) - target_p).square()
    return (err * weight).sum() / weight.sum().clamp_min(1.0)


ALL_HOLE_MODES = ("zeros", "mask_token")

NO_DECAY_NAMES = ("mask_token", "alpha", "pos_embed", "decoder_pos_embed")


def param_groups_weight_decay(model: nn.Module, weight_decay: float = 0.05) -> list[dict]:
    """AdamW parameter groups: decay on weight matrices/kernels only (MAE recipe, wd 0.05).

    No decay for biases and norm weights (``ndim <= 1``, which also covers the 0-d ``alpha``) and for
    ``mask_token`` (MAE-FAR's ``add_weight_decay`` only exempts 1-d tensors, so it decays ``mask_token`` and
    ``alpha``; exempting these learned embeddings follows timm's later convention). Frozen parameters
    are skipped. Returns ``[{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]``.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or name.split(".")[-1] in NO_DECAY_NAMES:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------
@dataclass
class MAEPriorOutput(BaseOutput):
    """features: (B, L, decoder_embed_dim) prior features; image: the MAE prediction (None when not requested
    or when the model predicts per-patch normalised pixels, ``norm_pix_loss=True``)."""

    features: torch.Tensor
    image: Optional[torch.Tensor] = None


class MAEPrior(ModelMixin, ConfigMixin):
    """ASUKA's MAE prior (MAE-FAR finetune variant), see the module docstring for the facts.

    Defaults are ViT-B/16 at 256² (≈112.5 M parameters). ``feature_layer`` = number of decoder blocks run
    before the features are read (6 of 8, ASUKA / MAE-FAR issue #20). ``norm_pix_loss`` records whether the
    decoder predicts per-patch normalised pixels (official MAE ``*_full`` checkpoints) instead of the
    ImageNet-normalised image; it is the default target of :meth:`forward_train`.

    Official inference options (ASUKA-FLUX ``MAE/models_mae.py``):

    * ``mask_concat`` (``mae_mask_concat``, off in the release): the features get one more channel, the patch's
      "touched by the hole" flag, so they are (B, L, decoder_embed_dim + 1).
    * ``all_hole``: when every patch is touched by the hole the official encoder attends to no key and gives NaN,
      and ``test_asuka_flux.py`` replaces the features by zeros — ``"zeros"`` (default) reproduces that per sample
      (the official check zeroes the whole batch when any sample is NaN; batch-independent here). ``"mask_token"``
      (ours) lets such tokens attend to every key, so the decoder sees exactly ``mask_token`` (+ the alpha mix) and
      position embeddings: finite features that still depend on nothing hidden.
    * ``resize_known_only``: :func:`preprocess`'s ``known_only`` (True: ours, hole colours cannot bleed into known
      pixels; False: the official full-image ``cv2.INTER_AREA`` resize).

    MAE-FAR's ``mask_decoder`` needs no option: in the official ``Attention`` it masks only the attention *scores*
    the module returns (discarded), never the attention that computes the features, so checkpoints and outputs
    with ``mask_decoder=True`` are those of this model.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(self, img_size: int = 256, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, decoder_embed_dim: int = 512, decoder_depth: int = 8,
                 decoder_num_heads: int = 16, mlp_ratio: float = 4.0, norm_eps: float = 1e-6,
                 feature_layer: int = 6, norm_pix_loss: bool = False, mask_concat: bool = False,
                 all_hole: str = "zeros", resize_known_only: bool = True):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size ({img_size}) must be a multiple of patch_size ({patch_size})")
        if not 0 <= feature_layer <= decoder_depth:
            raise ValueError(f"feature_layer must be in [0, decoder_depth={decoder_depth}], got {feature_layer}")
        if in_chans != 3:
            raise ValueError(f"in_chans must be 3 (RGB), got {in_chans}")
        if all_hole not in ALL_HOLE_MODES:
            raise ValueError(f"all_hole must be one of {ALL_HOLE_MODES}, got {all_hole!r}")
        grid = img_size // patch_size
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        block = partial(Block, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=norm_layer)

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(embed_dim, grid)[None])
        self.blocks = nn.ModuleList([block(embed_dim, num_heads) for _ in range(depth)])
        self.norm = norm_layer(embed_dim)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed_2d(decoder_embed_dim, grid)[None])
        self.decoder_blocks = nn.ModuleList([block(decoder_embed_dim, decoder_num_heads)
                                             for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size * patch_size * in_chans)
        self.decoder_patch_embed = PatchEmbed(img_size, patch_size, in_chans + 1, decoder_embed_dim)
        self.alpha = nn.Parameter(torch.tensor(1.0))

        self.gradient_checkpointing = False
        self.reset_parameters()

    # -- construction ----------------------------------------------------------------------------------
    @classmethod
    def tiny(cls, seed: int = 0, **overrides) -> "MAEPrior":
        """A seeded tiny MAE for tests: 256² input, 16×16 grid (256 tokens), 32-d encoder/decoder, 2+2 blocks,
        features after decoder block 1 (so ``prior`` gives (B, 256, 32))."""
        config = dict(img_size=256, patch_size=16, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32,
                      decoder_depth=2, decoder_num_heads=2, mlp_ratio=2.0, feature_layer=1)
        config.update(overrides)
        with seeded(seed):
            return cls(**config)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """MAE-FAR's initialisation: xavier-uniform linears and patch kernels (as flat linears), zero biases,
        unit LayerNorms, ``mask_token ~ N(0, 0.02)``, ``alpha = 1`` (decoder_patch_embed starts switched off)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for embed in (self.patch_embed, self.decoder_patch_embed):
            nn.init.xavier_uniform_(embed.proj.weight.view(embed.proj.weight.shape[0], -1))
            nn.init.zeros_(embed.proj.bias)
        nn.init.normal_(self.mask_token, std=0.02)
        self.alpha.fill_(1.0)

    @property
    def num_tokens(self) -> int:
        return (self.config.img_size // self.config.patch_size) ** 2

    @property
    def feature_dim(self) -> int:
        return self.config.decoder_embed_dim + int(self.config.mask_concat)

    # -- building blocks --------------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor, mask: torch.Tensor) -> None:
        _check_image_mask(x, mask)
        size = self.config.img_size
        if x.shape[-2:] != (size, size):
            raise ValueError(f"expected preprocessed {size}x{size} inputs, got {tuple(x.shape[-2:])}; "
                             "use MAEPrior.prior(image, mask) for images of any size")

    def encode(self, tokens: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        """Encoder blocks + norm on (B, K, D) position-embedded tokens; ``key_valid`` (B, K) bool says which
        tokens other tokens may attend to (MAE-FAR's key masking). Rows with no valid key attend to all
        keys instead of producing NaN (their outputs are discarded by the decoder, see :meth:`decode`)."""
        key_valid = key_valid | ~key_valid.any(dim=1, keepdim=True)
        attn_mask = key_valid[:, None, None, :]
        for block in self.blocks:
            tokens = run_module(self, block, tokens, attn_mask)
        return self.norm(tokens)

    def decode(self, latent: torch.Tensor, dropped: torch.Tensor, image: torch.Tensor, hole: torch.Tensor,
               feature_layer: Optional[int] = None, predict: bool = True
               ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Decoder on the full (B, L, D) encoder output.

        Dropped patches become ``mask_token``; partially masked patches of ``hole`` (B, 1, H, W) become
        ``alpha·mask_token + (1-alpha)·decoder_patch_embed(cat[image·(1-hole), hole])``; then the position
        embedding and the (unmasked) decoder blocks. Returns ``(features, pred_patches)``: the hidden state
        before block ``feature_layer`` (default from the config; pre-norm) and, with ``predict``, the patch
        predictions (B, L, p·p·3) after all blocks, ``decoder_norm`` and ``decoder_pred`` (else None, and the
        blocks after ``feature_layer`` are skipped).
        """
        x = self.decoder_embed(latent)
        x = torch.where(dropped[..., None], self.mask_token.to(x.dtype), x)
        touched, full = patch_coverage(hole, self.config.patch_size)
        embed = self.decoder_patch_embed(torch.cat([image * (1 - hole), hole], dim=1).to(x.dtype))
        alpha = clamp_alpha(self.alpha).to(x.dtype)
        x = torch.where((touched & ~full)[..., None], alpha * x + (1 - alpha) * embed, x)
        x = x + self.decoder_pos_embed.to(x.dtype)

        feature_layer = self.config.feature_layer if feature_layer is None else feature_layer
        if not 0 <= feature_layer <= len(self.decoder_blocks):
            raise ValueError(f"feature_layer must be in [0, {len(self.decoder_blocks)}], got {feature_layer}")
        features = x
        for index, block in enumerate(self.decoder_blocks[: None if predict else feature_layer]):
            if index == feature_layer:
                features = x
            x = run_module(self, block, x)
        if feature_layer == len(self.decoder_blocks) or not predict:
            features = x
        if not predict:
            return features, None
        return features, self.decoder_pred(self.decoder_norm(x))

    # -- inference ----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, mask: torch.Tensor, feature_layer: Optional[int] = None,
                return_image: bool = True) -> MAEPriorOutput:
        """Prior on preprocessed inputs (see :func:`preprocess`): ``x`` (B, 3, S, S) ImageNet-normalised,
        ``mask`` (B, 1, S, S) in {0, 1}, S = ``img_size``.

        All tokens are encoded; a patch touched by the hole is masked as an attention key in every encoder
        block. Returns features (B, L, decoder_embed_dim) read before decoder block ``feature_layer`` and,
        with ``return_image``, ``image`` = the decoder prediction (B, 3, S, S) in the normalised space.
        Hole pixels never influence the result (they only enter touched patches, whose encoder outputs are
        replaced by ``mask_token`` and whose decoder embedding sees ``x·(1-mask)``).

        All-hole inputs (every patch touched): with ``all_hole="zeros"`` (default, official) the features are
        zero. With ``"mask_token"`` the decoder input is exactly ``mask_token`` (plus the alpha mix with the
        visible pixels of partially masked patches) + position embedding for every token, so the features are
        finite and independent of the image content. The image is computed the second way in both modes.
        """
        self._check_input(x, mask)
        mask = mask.to(x.dtype)
        touched, _ = patch_coverage(mask, self.config.patch_size)
        tokens = self.patch_embed(x) + self.pos_embed.to(x.dtype)
        latent = self.encode(tokens, ~touched)
        features, pred = self.decode(latent, touched, x, mask, feature_layer, predict=return_image)
        if self.config.mask_concat:
            features = torch.cat([features, touched[..., None].to(features.dtype)], dim=-1)
        if self.config.all_hole == "zeros":
            features = features.masked_fill(touched.all(dim=1)[:, None, None], 0.0)
        if pred is None or self.config.norm_pix_loss:
            return MAEPriorOutput(features=features, image=None)
        return MAEPriorOutput(features=features, image=unpatchify(pred, self.config.patch_size))

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor,
                         feature_layer: Optional[int] = None) -> torch.Tensor:
        """Features only (B, L, decoder_embed_dim) on preprocessed S² inputs; stops after ``feature_layer``
        decoder blocks (the call the aligner trainer makes on batches it preprocessed itself)."""
        return self.forward(x, mask, feature_layer=feature_layer, return_image=False).features

    @apply_forward_hook  # under enable_model_cpu_offload the model moves to the GPU before the inputs follow it
    def prior(self, image: torch.Tensor, mask: torch.Tensor, return_image: bool = True) -> MAEPriorOutput:
        """ASUKA's MAE prior for ``image`` (B, 3, H, W) in [-1, 1] and ``mask`` (B, 1, H, W), 1 = hole, any size.

        Preprocesses as the official code (:func:`preprocess`: 256² area resize, ImageNet normalisation,
        nearest mask, hole pixels zeroed), runs :meth:`forward`, and returns features (B, 256, 512) and the
        prior image: the MAE prediction de-normalised to [-1, 1] (clamped) and resized back to (H, W) with
        :func:`resize_image`. The image is the raw prediction everywhere (no paste-back of known pixels).
        """
        _check_image_mask(image, mask)
        param = self.patch_embed.proj.weight
        image = image.to(device=param.device)
        mask = mask.to(device=param.device)
        x, m = preprocess(image.float(), mask.float(), self.config.img_size, self.config.resize_known_only)
        out = self.forward(x.to(param.dtype), m.to(param.dtype), return_image=return_image)
        if out.image is not None:
            out.image = postprocess(out.image.float(), tuple(image.shape[-2:])).to(image.dtype)
        return out

    def reconstructed_prior(self, image: torch.Tensor, return_image: bool = True) -> MAEPriorOutput:
        """The MAE *reconstructed* prior (paper §3.2 "Misalignment"): :meth:`prior` with an all-zero mask."""
        if not isinstance(image, torch.Tensor) or image.ndim != 4:
            raise TypeError("image must be a (B, 3, H, W) torch tensor in [-1, 1]")
        mask = torch.zeros_like(image[:, :1])
        return self.prior(image, mask, return_image=return_image)

    # -- training -----------------------------------------------------------------------------------------
    def forward_train(self, x: torch.Tensor, mask: torch.Tensor, mask_ratio: float = 0.75,
                      generator: Optional[torch.Generator] = None,
                      norm_pix: Optional[bool] = None) -> dict[str, torch.Tensor]:
        """MAE-FAR's fine-tuning forward on S² inputs: ``x`` (B, 3, S, S) ImageNet-normalised (the full image;
        hole pixels never reach the encoder's visible tokens) and ``mask`` (B, 1, S, S) in {0, 1}.

        :func:`adaptive_random_masking` picks K = ``int(L·(1-mask_ratio))`` encoder tokens (gathered, as MAE);
        the decoder gets ``mask_token`` on dropped patches and the alpha mix on partially masked ones of the
        loss mask (:func:`training_loss_mask`). Returns ``pred`` (B, 3, S, S) (normalised space, or per-patch
        normalised with ``norm_pix``), ``loss_mask`` (B, 1, S, S), ``dropped`` (B, L) and ``loss``
        (:func:`masked_mse_loss`; ``norm_pix`` defaults to the config's ``norm_pix_loss``).
        """
        self._check_input(x, mask)
        p = self.config.patch_size
        mask = mask.to(x.dtype)
        touched, _ = patch_coverage(mask, p)
        masking = adaptive_random_masking(touched, mask_ratio, generator)
        tokens = self.patch_embed(x) + self.pos_embed.to(x.dtype)
        index = masking.ids_keep[..., None].expand(-1, -1, tokens.shape[-1])
        latent_kept = self.encode(tokens.gather(1, index), masking.keep_valid)
        latent = latent_kept.new_zeros(tokens.shape[0], tokens.shape[1], latent_kept.shape[-1])
        latent = latent.scatter(1, index, latent_kept)
        loss_mask = training_loss_mask(mask, masking.added, p)
        _, pred_patches = self.decode(latent, masking.dropped, x, loss_mask)
        pred = unpatchify(pred_patches, p)
        norm_pix = self.config.norm_pix_loss if norm_pix is None else norm_pix
        loss = masked_mse_loss(pred.float(), x.float(), loss_mask, p, norm_pix=norm_pix)
        return {"pred": pred, "loss_mask": loss_mask, "dropped": masking.dropped, "loss": loss}


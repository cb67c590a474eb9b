"""ASUKA's harmonizing decoder: a mask-conditioned VAE decoder (paper §3.3; Yikai-Wang/asuka-misato ``asuka-flux/ldm/modules/diffusionmodules/asuka_decoder.py``; buxiangzhiren/Asymmetric_VQGAN ``my_decoder.py``).

``HarmonizingDecoderKL`` subclasses diffusers' ``AsymmetricAutoencoderKL``, so diffusers'
``StableDiffusionInpaintPipeline`` recognises it (``isinstance(vae, AsymmetricAutoencoderKL)``) and
calls ``vae.decode(latents, image=init_image, mask=mask)`` with the full original image and the
binary mask by itself. Two options select between ASUKA and Asymmetric VQGAN [62]:

* ``condition_channels``: 4 = ``cat[(1-mask)*image, mask]`` (ASUKA's ``concat_mask=True``, default);
  3 = the masked image only ([62] and diffusers' ``MaskConditionEncoder``).
* ``mask_downsample``: ``"area_any"`` = ``area`` resize then ``>0`` (ASUKA: a feature cell that touches
  the hole counts as generated, default); ``"nearest"`` ([62], diffusers).

With ``condition_channels=3, mask_downsample="nearest"`` the decoder computes exactly what diffusers'
``AsymmetricAutoencoderKL`` computes with the same weights (tested bit for bit).

Decoder width: ``up_block_out_channels``/``layers_per_up_block`` as in ``AsymmetricAutoencoderKL``
(``layers_per_up_block=2`` means 3 ResNets per level, like SD's ``layers_per_block=2``).
``DECODER_WIDTHS`` names the two used here: ``"sd"`` (SD's own decoder; ASUKA's released decoder is
this size, specs §1.1.3) and ``"1.5x"`` ([62]'s ``larger1.5``: 1.5x channels, 4 ResNets per level).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from diffusers import AsymmetricAutoencoderKL, AutoencoderKL
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.vae import MaskConditionDecoder, MaskConditionEncoder
# diffusers resolves a model_index.json entry's load method through this module-level name:
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401
from torch import nn

from asuka.models.checkpointing import run_module

MaskDownsample = Literal["area_any", "nearest"]
MASK_DOWNSAMPLE_MODES = ("area_any", "nearest")
CONDITION_CHANNELS = (3, 4)
# name -> (channel multiplier over the encoder's widths, layers_per_up_block)
DECODER_WIDTHS: dict[str, tuple[float, int]] = {"sd": (1.0, 2), "1.5x": (1.5, 3)}


def downsample_mask(mask: torch.Tensor, size: tuple[int, int], mode: MaskDownsample) -> torch.Tensor:
    """Resize a (B,1,H,W) hole mask (1 = hole) to a feature resolution.

    ``"area_any"``: ASUKA's ``m = interpolate(mask, mode='area'); m[m>0] = 1``, i.e. a cell is a hole
    cell as soon as any covered pixel is a hole. ``"nearest"``: diffusers / Asymmetric VQGAN.
    """
    if mode == "nearest":
        return F.interpolate(mask, size=size, mode="nearest")
    if mode == "area_any":
        return (F.interpolate(mask, size=size, mode="area") > 0).to(mask.dtype)
    raise ValueError(f"mask_downsample must be one of {MASK_DOWNSAMPLE_MODES}, got {mode!r}")


def decoder_widths(encoder_channels: tuple[int, ...], width: str) -> tuple[tuple[int, ...], int]:
    """``(up_block_out_channels, layers_per_up_block)`` for a named width over the encoder's widths."""
    if width not in DECODER_WIDTHS:
        raise ValueError(f"decoder_width must be one of {sorted(DECODER_WIDTHS)}, got {width!r}")
    factor, layers = DECODER_WIDTHS[width]
    return tuple(int(round(c * factor)) for c in encoder_channels), layers


def gate(x: torch.Tensor) -> torch.Tensor:
    """ASUKA's gated convolution output (``Conditionencoder`` with ``gate_conv=True``): the first half of the
    channels times ``clamp(1 - tanh(second half), 0, 1)``."""
    value, gate_logits = x.chunk(2, dim=1)
    return value * (1 - torch.tanh(gate_logits)).clamp(0, 1)


class HarmonizingConditionEncoder(MaskConditionEncoder):
    """diffusers' ``MaskConditionEncoder`` whose first conv optionally also reads the mask (ASUKA), optionally with
    gated convolutions (ASUKA's ``gate_conv``: every conv has twice the outputs, gated by :func:`gate`)."""

    def __init__(self, image_channels: int, out_ch: int, res_ch: int, concat_mask: bool,
                 gate_conv: bool = False) -> None:
        super().__init__(in_ch=image_channels + int(concat_mask), out_ch=out_ch, res_ch=res_ch)
        self.concat_mask = concat_mask
        self.gate_conv = gate_conv
        if gate_conv:
            self.layers = nn.Sequential(*(
                nn.Conv2d(conv.in_channels, 2 * conv.out_channels, conv.kernel_size, conv.stride, conv.padding)
                for conv in self.layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Features keyed by ``str(tuple(shape))``, stored before the ReLU between layers (as diffusers/ASUKA)."""
        if self.concat_mask:
            x = torch.cat([x, mask.to(x.dtype)], dim=1)
        out = {}
        for layer in self.layers:
            x = layer(x)
            if self.gate_conv:
                x = gate(x)
            out[str(tuple(x.shape))] = x
            x = torch.relu(x)
        return out


class HarmonizingMaskConditionDecoder(MaskConditionDecoder):
    """``MaskConditionDecoder`` with a configurable condition input and mask downsampling.

    Fusion (specs §1.1.3): before every up block, features inside the (downsampled) known region are
    replaced by the condition encoder's features of the same shape; after the last block, the same
    with the full-resolution mask.
    """

    def __init__(self, *, condition_channels: int, mask_downsample: MaskDownsample, gate_conv: bool = False,
                 tanh_out: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        block_out_channels = kwargs["block_out_channels"]
        self.mask_downsample = mask_downsample
        self.tanh_out = tanh_out
        self.condition_encoder = HarmonizingConditionEncoder(
            image_channels=kwargs["out_channels"], out_ch=block_out_channels[0], res_ch=block_out_channels[-1],
            concat_mask=condition_channels == kwargs["out_channels"] + 1, gate_conv=gate_conv)

    def forward(self, z: torch.Tensor, image: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                latent_embeds: torch.Tensor | None = None) -> torch.Tensor:
        sample = self.conv_in(z)
        upscale_dtype = next(iter(self.up_blocks.parameters())).dtype
        sample = run_module(self, self.mid_block, sample, latent_embeds).to(upscale_dtype)
        conditioned = image is not None and mask is not None
        if conditioned:
            features = run_module(self, self.condition_encoder, (1 - mask) * image, mask)
        for up_block in self.up_blocks:
            if conditioned:
                known = features[str(tuple(sample.shape))]
                hole = downsample_mask(mask, sample.shape[-2:], self.mask_downsample)
                sample = sample * hole + known * (1 - hole)
            sample = run_module(self, up_block, sample, latent_embeds)
        if conditioned:
            sample = sample * mask + features[str(tuple(sample.shape))] * (1 - mask)
        sample = self.conv_norm_out(sample) if latent_embeds is None else self.conv_norm_out(sample, latent_embeds)
        sample = self.conv_out(self.conv_act(sample))
        return torch.tanh(sample) if self.tanh_out else sample


class HarmonizingDecoderKL(AsymmetricAutoencoderKL):
    """SD VAE with ASUKA's harmonizing (mask-conditioned) decoder; a drop-in ``vae=`` for SD inpainting.

    ``decode(latents / scaling_factor, image=image, mask=mask)`` takes the *full* image in [-1, 1] and
    the (B,1,H,W) mask with 1 = hole, at the output resolution (8x the latent). Without image and mask
    it decodes like a plain VAE. Always pass ``image=``/``mask=`` as keywords: diffusers' ``decode``
    has ``generator`` as its second positional argument.

    Defaults: SD-1.5's VAE layout with SD's decoder width, ASUKA's 4-channel condition and
    ``area_any`` mask downsampling.

    ``shift_factor`` is the latent shift of diffusers' ``AutoencoderKL`` (FLUX: 0.1159 with ``scaling_factor``
    0.3611): pipelines decode ``latents / scaling_factor + shift_factor`` (``None`` = no shift, SD). The official
    ASUKA decoder options (``asuka-flux/ldm/modules/diffusionmodules/asuka_decoder.py``) map as:
    ``gate_conv`` = gated condition-encoder convolutions (:func:`gate`); ``tanh_out`` = ``tanh`` on the output;
    ``attn_resolutions`` = ``"AttnUpDecoderBlock2D"`` in ``up_block_types`` for those levels (one single-head
    attention after every ResNet, as the official ``AttnBlock``; :func:`up_block_types_for`).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4,
        down_block_out_channels: tuple[int, ...] = (128, 256, 512, 512),
        layers_per_down_block: int = 2,
        up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4,
        up_block_out_channels: tuple[int, ...] = (128, 256, 512, 512),
        layers_per_up_block: int = 2,
        act_fn: str = "silu",
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        sample_size: int = 512,
        scaling_factor: float = 0.18215,
        condition_channels: int = 4,
        mask_downsample: MaskDownsample = "area_any",
        shift_factor: float | None = None,
        gate_conv: bool = False,
        tanh_out: bool = False,
    ) -> None:
        if condition_channels not in (out_channels, out_channels + 1):
            raise ValueError(f"condition_channels must be out_channels ({out_channels}, masked image only, "
                             f"Asymmetric VQGAN) or out_channels + 1 ({out_channels + 1}, masked image + mask, "
                             f"ASUKA), got {condition_channels}")
        if mask_downsample not in MASK_DOWNSAMPLE_MODES:
            raise ValueError(f"mask_downsample must be one of {MASK_DOWNSAMPLE_MODES}, got {mask_downsample!r}")
        super().__init__(
            in_channels=in_channels, out_channels=out_channels, down_block_types=tuple(down_block_types),
            down_block_out_channels=tuple(down_block_out_channels), layers_per_down_block=layers_per_down_block,
            up_block_types=tuple(up_block_types), up_block_out_channels=tuple(up_block_out_channels),
            layers_per_up_block=layers_per_up_block, act_fn=act_fn, latent_channels=latent_channels,
            norm_num_groups=norm_num_groups, sample_size=sample_size, scaling_factor=scaling_factor)
        self.decoder = HarmonizingMaskConditionDecoder(
            in_channels=latent_channels, out_channels=out_channels, up_block_types=tuple(up_block_types),
            block_out_channels=tuple(up_block_out_channels), layers_per_block=layers_per_up_block, act_fn=act_fn,
            norm_num_groups=norm_num_groups, condition_channels=condition_channels, mask_downsample=mask_downsample,
            gate_conv=gate_conv, tanh_out=tanh_out)

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        # ``block_out_channels`` and ``force_upcast`` are derived entries that AsymmetricAutoencoderKL.__init__
        # registers itself (diffusers reads them, e.g. for vae_scale_factor); they are no __init__ arguments.
        config_dict = {k: v for k, v in config_dict.items() if k not in ("block_out_channels", "force_upcast")}
        return super().extract_init_dict(config_dict, **kwargs)

    def _decode(self, z: torch.Tensor, image: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                return_dict: bool = True):
        if (image is None) != (mask is None):
            raise ValueError("pass both image= and mask= for a harmonized decode, or neither for a plain decode")
        if image is not None:
            factor = 2 ** (len(self.config.up_block_out_channels) - 1)
            expected = (z.shape[-2] * factor, z.shape[-1] * factor)
            if image.ndim != 4 or mask.ndim != 4 or mask.shape[1] != 1:
                raise ValueError(f"image must be (B,C,H,W) and mask (B,1,H,W); got image {tuple(image.shape)}, "
                                 f"mask {tuple(mask.shape)}")
            if image.shape[-2:] != mask.shape[-2:] or tuple(image.shape[-2:]) != expected:
                raise ValueError(f"image {tuple(image.shape[-2:])} and mask {tuple(mask.shape[-2:])} must both have "
                                 f"the output size {expected} of latents {tuple(z.shape[-2:])}")
            image, mask = image.to(z.dtype), mask.to(z.dtype)
        return super()._decode(z, image, mask, return_dict)

    @classmethod
    def from_vae(cls, vae: AutoencoderKL | AsymmetricAutoencoderKL, *, condition_channels: int = 4,
                 mask_downsample: MaskDownsample = "area_any", decoder_width: str | None = None
                 ) -> "HarmonizingDecoderKL":
        """Initialise from an SD ``AutoencoderKL`` or an ``AsymmetricAutoencoderKL`` (our choice; the papers do not say).

        Encoder, ``quant_conv`` and ``post_quant_conv`` are always copied (and ``scaling_factor`` /
        ``shift_factor``) (a VAE built without quant
        convs gets identity 1x1 convs, which computes the same). The decoder is copied when
        ``decoder_width`` is None or gives the source's width; otherwise it starts fresh. From an
        ``AsymmetricAutoencoderKL`` the condition encoder is copied too; from a plain VAE it is new.
        In both cases a mask input channel that the source lacks is zero-initialised, so the new
        decoder starts out computing exactly what the source computes.
        """
        if not isinstance(vae, (AutoencoderKL, AsymmetricAutoencoderKL)):
            raise TypeError(f"vae must be a diffusers AutoencoderKL or AsymmetricAutoencoderKL, got {type(vae).__name__}")
        cfg = vae.config
        if isinstance(vae, AsymmetricAutoencoderKL):
            down, layers_down = tuple(cfg.down_block_out_channels), cfg.layers_per_down_block
            up, layers_up = tuple(cfg.up_block_out_channels), cfg.layers_per_up_block
        else:
            down, layers_down = tuple(cfg.block_out_channels), cfg.layers_per_block
            up, layers_up = down, layers_down
        if decoder_width is not None:
            target = decoder_widths(down, decoder_width)
            copy_decoder = target == (up, layers_up)
            up, layers_up = target
        else:
            copy_decoder = True
        model = cls(in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                    down_block_types=tuple(cfg.down_block_types), down_block_out_channels=down,
                    layers_per_down_block=layers_down, up_block_types=tuple(cfg.up_block_types),
                    up_block_out_channels=up, layers_per_up_block=layers_up, act_fn=cfg.act_fn,
                    latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups,
                    sample_size=cfg.sample_size, scaling_factor=cfg.scaling_factor,
                    shift_factor=cfg.get("shift_factor"),
                    condition_channels=condition_channels, mask_downsample=mask_downsample)
        if vae.dtype != model.dtype:
            model.to(dtype=vae.dtype)
        source = vae.state_dict()
        target_state = model.state_dict()
        copied = {k: v for k, v in source.items()
                  if (copy_decoder or not k.startswith("decoder.")) and k in target_state
                  and not k.startswith("decoder.condition_encoder.layers.0.weight")}
        for name in ("quant_conv", "post_quant_conv"):
            if f"{name}.weight" not in source:  # e.g. VAEs configured with use_quant_conv=False
                copied[f"{name}.weight"] = identity_conv1x1(target_state[f"{name}.weight"])
                copied[f"{name}.bias"] = torch.zeros_like(target_state[f"{name}.bias"])
        first = "decoder.condition_encoder.layers.0.weight"
        if copy_decoder and first in source:
            weight = torch.zeros_like(target_state[first])
            n = min(weight.shape[1], source[first].shape[1])
            weight[:, :n] = source[first][:, :n]
            copied[first] = weight
        elif first in target_state:
            weight = target_state[first].clone()
            weight[:, cfg.out_channels:] = 0  # the mask channel of a fresh condition encoder
            copied[first] = weight
        unexpected = sorted(k for k in source if k not in target_state)
        if unexpected:
            raise ValueError(f"vae has parameters HarmonizingDecoderKL does not know: {unexpected}")
        model.load_state_dict(copied, strict=False)
        return model


def up_block_types_for(attn_resolutions: tuple[int, ...] | list[int], resolution: int, levels: int) -> tuple[str, ...]:
    """diffusers ``up_block_types`` (lowest resolution first) for the official decoder's ``attn_resolutions`` at its
    training ``resolution`` with ``levels`` levels: a level at ``resolution / 2**k`` gets ``AttnUpDecoderBlock2D``
    when that size is listed."""
    sizes = [resolution // 2 ** (levels - 1 - i) for i in range(levels)]
    return tuple("AttnUpDecoderBlock2D" if size in set(attn_resolutions) else "UpDecoderBlock2D" for size in sizes)


def identity_conv1x1(weight: torch.Tensor) -> torch.Tensor:
    """The 1x1-conv weight of the identity map, shaped and typed like ``weight``."""
    return torch.eye(weight.shape[0], dtype=weight.dtype)[:, :, None, None]

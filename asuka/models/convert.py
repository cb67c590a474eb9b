"""Key converters for published checkpoints, with strict key checking.

Shared pieces (reused by every converter): :func:`~asuka.models.checkpoint.read_checkpoint`
(``torch.load(weights_only=True)`` or safetensors), :func:`load_strict` (names every missing, unexpected and mis-shaped key) and
:class:`StateDictMismatchError`.

MAE prior (:class:`~asuka.models.mae.MAEPrior`; MAE-FAR ``MAE/models_mae.py``, facebookresearch/mae ``models_mae.py``):

* **MAE-FAR / ASUKA** (``ewrfcas/MAE-FAR`` ``MaskedAutoencoderViT[Finetune]``, ASUKA's ``mae_300.pth``):
  ``{'model': state_dict, ...}`` whose keys already are ``MAEPrior``'s (``patch_embed.proj.*``,
  ``pos_embed``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*``, ``norm.*``,
  ``decoder_embed.*``, ``mask_token``, ``decoder_pos_embed``, ``decoder_blocks.N.*``, ``decoder_norm.*``,
  ``decoder_pred.*``, and for the finetune variant ``decoder_patch_embed.proj.*`` and ``alpha``).
* **Official MAE** (``facebookresearch/mae`` ``mae_pretrain_vit_*_full.pth`` and
  ``mae_visualize_vit_*.pth``): the same names plus ``cls_token``, with ``pos_embed`` /
  ``decoder_pos_embed`` of length 1 + 14·14 (a zero cls row, then the 14×14 sin-cos table). The cls token
  is dropped and both tables are recomputed for the 16×16 grid: they are the *fixed* 2-D sin-cos
  embeddings (checked on load), so re-gridding means evaluating the same formula on the new grid, not
  interpolating. ``*_full`` models predict per-patch normalised pixels (``norm_pix_loss=True``);
  ``mae_visualize_*`` predict pixels.

Checkpoints without the inpainting extras (official MAE, MAE-FAR's non-finetune MAE) get them with
MAE-FAR's initialisation: ``decoder_patch_embed`` xavier-uniform (seeded) with zero bias and
``alpha = 1``, which switches the extra branch off, so the converted model computes exactly the source
MAE's decoder until fine-tuning moves ``alpha``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Mapping, Optional, Union

import torch
from torch import nn

from diffusers import AutoencoderKL

from asuka.models.checkpoint import PathLike, StateDict, read_checkpoint, unwrap_state_dict
from asuka.models.decoder import HarmonizingDecoderKL, identity_conv1x1
from asuka.models.mae import MAEPrior, sincos_pos_embed_2d


# Encoder heads are not recoverable from weights; MAE's published sizes (ViT-B/L/H) fix them.
_ENCODER_HEADS = {768: 12, 1024: 16, 1280: 16}  # ViT-B/L/H; other widths: 64-d heads, ViT's convention
_DECODER_HEADS = 16
_EXTRA_KEYS = ("decoder_patch_embed.proj.weight", "decoder_patch_embed.proj.bias", "alpha")


# ---------------------------------------------------------------------------------------------- shared
class StateDictMismatchError(ValueError):
    """A state dict does not fit a model; ``missing``, ``unexpected`` and ``mismatched`` name the keys."""

    def __init__(self, source: str, model: str, missing: list[str], unexpected: list[str],
                 mismatched: list[str], hint: str = ""):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        lines = [f"{source} does not fit {model}:"]
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("shape mismatches", mismatched)):
            if keys:
                lines.append(f"  {label} ({len(keys)}): {', '.join(keys)}")
        if hint:
            lines.append(f"  hint: {hint}")
        super().__init__("\n".join(lines))


def _read_any(checkpoint: Union[PathLike, Mapping[str, torch.Tensor]], key: Optional[str],
              what: str) -> tuple[StateDict, str]:
    """``(state dict, name for messages)`` from a checkpoint path (:func:`read_checkpoint`) or an in-memory
    checkpoint / state dict (:func:`unwrap_state_dict`, named ``what``)."""
    if isinstance(checkpoint, Mapping):
        return unwrap_state_dict(checkpoint, key, source=what), what
    return read_checkpoint(checkpoint, key=key), str(checkpoint)


def load_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str = "state dict",
                hint: str = "") -> nn.Module:
    """``model.load_state_dict(state_dict, strict=True)`` after a check that names every missing,
    unexpected and mis-shaped key (raises :class:`StateDictMismatchError`). Returns ``model``."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                  if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if missing or unexpected or mismatched:
        raise StateDictMismatchError(source, type(model).__name__, missing, unexpected, mismatched, hint)
    model.load_state_dict(state_dict, strict=True)
    return model


# ---------------------------------------------------------------------------------------------- MAE
def _strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str = "module.") -> StateDict:
    """Drop a DDP ``module.`` prefix when every key carries it."""
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def _count_blocks(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    indices = {int(m.group(1)) for k in state_dict if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


def _require(state_dict: Mapping[str, torch.Tensor], keys: Iterable[str], source: str) -> None:
    missing = [k for k in keys if k not in state_dict]
    if missing:
        raise StateDictMismatchError(source, "MAEPrior", missing, [], [],
                                     "not an MAE checkpoint with MAE's key layout")


def mae_config_from_state_dict(state_dict: Mapping[str, torch.Tensor], *, cls_token: bool = False,
                               source: str = "state dict", **overrides) -> dict:
    """``MAEPrior`` config read off an MAE state dict's shapes (heads from MAE's published sizes)."""
    _require(state_dict, ("patch_embed.proj.weight", "pos_embed", "decoder_embed.weight",
                          "blocks.0.mlp.fc1.weight"), source)
    kernel = state_dict["patch_embed.proj.weight"]
    embed_dim, patch_size = kernel.shape[0], kernel.shape[-1]
    tokens = state_dict["pos_embed"].shape[1] - int(cls_token)
    grid = int(round(tokens ** 0.5))
    if grid * grid != tokens:
        raise ValueError(f"{source}: pos_embed has {tokens} patch tokens, not a square grid")
    config = dict(
        img_size=grid * patch_size, patch_size=patch_size, embed_dim=embed_dim,
        depth=_count_blocks(state_dict, "blocks"),
        num_heads=_ENCODER_HEADS.get(embed_dim, embed_dim // 64 if embed_dim % 64 == 0 else None),
        decoder_embed_dim=state_dict["decoder_embed.weight"].shape[0],
        decoder_depth=_count_blocks(state_dict, "decoder_blocks"), decoder_num_heads=_DECODER_HEADS,
        mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
    )
    config.update(overrides)
    if config["num_heads"] is None:
        raise ValueError(f"{source}: cannot infer num_heads for embed_dim {embed_dim}; pass num_heads=...")
    config.setdefault("feature_layer", min(6, config["decoder_depth"]))
    return config


def _finetune_extras(state_dict: Mapping[str, torch.Tensor], patch_size: int, seed: int) -> StateDict:
    """MAE-FAR's initialisation of ``decoder_patch_embed`` (4 → decoder width) and ``alpha`` (= 1)."""
    width = state_dict["decoder_embed.weight"].shape[0]
    generator = torch.Generator().manual_seed(seed)
    fan_in, fan_out = 4 * patch_size * patch_size, width
    bound = (6.0 / (fan_in + fan_out)) ** 0.5  # xavier-uniform on the flattened kernel, as MAE-FAR
    weight = (torch.rand(width, 4, patch_size, patch_size, generator=generator) * 2 - 1) * bound
    return {"decoder_patch_embed.proj.weight": weight, "decoder_patch_embed.proj.bias": torch.zeros(width),
            "alpha": torch.tensor(1.0)}


def convert_mae_far_state_dict(state_dict: Mapping[str, torch.Tensor], *, seed: int = 0,
                               source: str = "MAE-FAR state dict") -> StateDict:
    """MAE-FAR / ASUKA state dict -> ``MAEPrior`` state dict (the names are the same: a checked copy).

    A DDP ``module.`` prefix is removed. Non-finetune MAE-FAR checkpoints (no ``decoder_patch_embed`` nor
    ``alpha``) get the extras with MAE-FAR's initialisation (module docstring); a checkpoint holding only
    some of them is an error.
    """
    state = _strip_prefix(state_dict)
    if "cls_token" in state:
        raise StateDictMismatchError(source, "MAEPrior", [], ["cls_token"], [],
                                     "this is an official MAE checkpoint: use convert_official_mae_state_dict")
    present = [k for k in _EXTRA_KEYS if k in state]
    if not present:
        state.update(_finetune_extras(state, state["patch_embed.proj.weight"].shape[-1], seed))
    elif len(present) != len(_EXTRA_KEYS):
        raise StateDictMismatchError(source, "MAEPrior", [k for k in _EXTRA_KEYS if k not in state], [], [],
                                     "a finetune checkpoint needs decoder_patch_embed.proj.* and alpha together")
    return state


def _regrid_sincos(table: torch.Tensor, key: str, grid: int, source: str) -> torch.Tensor:
    """Check that ``table`` (1, 1 + g², D) is MAE's fixed sin-cos table with a zero cls row; return the
    (1, grid², D) table for the new grid."""
    _, length, dim = table.shape
    old_grid = int(round((length - 1) ** 0.5))
    if old_grid * old_grid != length - 1:
        raise ValueError(f"{source}: {key} of shape {tuple(table.shape)} is not 1 cls row + a square grid")
    expected = torch.cat([torch.zeros(1, dim), sincos_pos_embed_2d(dim, old_grid)])[None]
    if not torch.allclose(table.float(), expected, atol=1e-4):
        raise ValueError(f"{source}: {key} is not MAE's fixed 2-D sin-cos table, so it cannot be re-gridded by "
                         "recomputation (learned position embeddings are not supported)")
    return sincos_pos_embed_2d(dim, grid)[None]


def convert_official_mae_state_dict(state_dict: Mapping[str, torch.Tensor], *, grid_size: int = 16, seed: int = 0,
                                    source: str = "official MAE state dict") -> StateDict:
    """Official MAE (``*_full`` / ``mae_visualize_*``) -> ``MAEPrior`` state dict at ``grid_size``².

    Drops ``cls_token``; replaces ``pos_embed`` / ``decoder_pos_embed`` (1 + 14², D) by the sin-cos tables of
    the ``grid_size``² grid (after checking they are sin-cos); adds ``decoder_patch_embed`` and ``alpha``
    with MAE-FAR's initialisation (``alpha = 1``: the extra branch starts off).
    """
    state = _strip_prefix(state_dict)
    _require(state, ("cls_token", "pos_embed", "decoder_pos_embed", "patch_embed.proj.weight",
                     "decoder_embed.weight"), source)
    del state["cls_token"]
    state["pos_embed"] = _regrid_sincos(state["pos_embed"], "pos_embed", grid_size, source)
    state["decoder_pos_embed"] = _regrid_sincos(state["decoder_pos_embed"], "decoder_pos_embed", grid_size, source)
    unexpected = [k for k in _EXTRA_KEYS if k in state]
    if unexpected:
        raise StateDictMismatchError(source, "MAEPrior", [], unexpected, [],
                                     "official MAE checkpoints have no inpainting extras: use convert_mae_far_state_dict")
    state.update(_finetune_extras(state, state["patch_embed.proj.weight"].shape[-1], seed))
    return state


def convert_mae_far_checkpoint(path: PathLike, *, seed: int = 0) -> StateDict:
    """Read a MAE-FAR / ASUKA ``.pth`` (``{'model': ...}``) and return the ``MAEPrior`` state dict."""
    return convert_mae_far_state_dict(read_checkpoint(path, "model"), seed=seed, source=str(path))


def convert_official_mae_checkpoint(path: PathLike, *, grid_size: int = 16, seed: int = 0) -> StateDict:
    """Read an official MAE ``.pth`` (``{'model': ...}``) and return the ``MAEPrior`` state dict."""
    return convert_official_mae_state_dict(read_checkpoint(path, "model"), grid_size=grid_size, seed=seed,
                                           source=str(path))


def mae_prior_from_mae_far(checkpoint: Union[PathLike, Mapping[str, torch.Tensor]], *, seed: int = 0,
                           **config_overrides) -> MAEPrior:
    """Build an ``MAEPrior`` from a MAE-FAR / ASUKA checkpoint (path or state dict); config from the shapes."""
    raw, source = _read_any(checkpoint, "model", "MAE-FAR state dict")
    state = convert_mae_far_state_dict(raw, seed=seed, source=source)
    model = MAEPrior(**mae_config_from_state_dict(state, source=source, **config_overrides))
    return load_strict(model, state, source=source)


def mae_prior_from_official_mae(checkpoint: Union[PathLike, Mapping[str, torch.Tensor]], *, norm_pix_loss: bool = False,
                                grid_size: int = 16, seed: int = 0, **config_overrides) -> MAEPrior:
    """Build an ``MAEPrior`` at ``grid_size``² patches from an official MAE checkpoint (path or state dict).

    Pass ``norm_pix_loss=True`` for ``mae_pretrain_vit_*_full.pth`` (per-patch normalised predictions:
    ``prior(...).image`` is then None); the ``mae_visualize_vit_*.pth`` checkpoints predict pixels.
    """
    raw, source = _read_any(checkpoint, "model", "official MAE state dict")
    state = convert_official_mae_state_dict(raw, grid_size=grid_size, seed=seed, source=source)
    config = mae_config_from_state_dict(state, source=source, norm_pix_loss=norm_pix_loss, **config_overrides)
    return load_strict(MAEPrior(**config), state, source=source)


# --------------------------------------------------------------------------------------------------
# Harmonizing decoder: Asymmetric VQGAN and ASUKA checkpoints (LDM key layout) -> HarmonizingDecoderKL
# Sources: Yikai-Wang/asuka-misato ``asuka_decoder.py``, buxiangzhiren/Asymmetric_VQGAN ``my_decoder.py``. LDM names: ``{encoder,decoder}.conv_in``, ``down.{i}.block.{j}``,
# ``down.{i}.downsample.conv``, ``mid.block_{1,2}``, ``mid.attn_1.{norm,q,k,v,proj_out}`` (1x1 convs),
# ``up.{i}.block.{j}`` (``up.0`` is the full-resolution level, diffusers' last up block),
# ``up.{i}.upsample.conv``, ``norm_out``, ``conv_out``, ``nin_shortcut``; the condition branch is
# ``decoder.encoder.layers.{k}``. Dropped on purpose: ``decoder.up_layers.*`` (ConvTranspose2d stack that
# only derives channel counts, never used in forward) and ``loss.*`` (LPIPS, discriminator, logvar).
# --------------------------------------------------------------------------------------------------

_LDM_DROPPED_PREFIXES = ("decoder.up_layers.", "loss.")
_LDM_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _ldm_vae_key(key: str, num_levels: int) -> str:
    """Rename one LDM VAE key to diffusers' names (unknown layouts come back unchanged)."""
    key = re.sub(r"^(encoder|decoder)\.down\.(\d+)\.block\.", r"\1.down_blocks.\2.resnets.", key)
    key = re.sub(r"^(encoder|decoder)\.down\.(\d+)\.downsample\.", r"\1.down_blocks.\2.downsamplers.0.", key)
    key = re.sub(r"^decoder\.up\.(\d+)\.block\.",
                 lambda m: f"decoder.up_blocks.{num_levels - 1 - int(m.group(1))}.resnets.", key)
    key = re.sub(r"^decoder\.up\.(\d+)\.upsample\.",
                 lambda m: f"decoder.up_blocks.{num_levels - 1 - int(m.group(1))}.upsamplers.0.", key)
    key = re.sub(r"^(encoder|decoder)\.mid\.block_([12])\.",
                 lambda m: f"{m.group(1)}.mid_block.resnets.{int(m.group(2)) - 1}.", key)
    key = re.sub(r"^(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.",
                 lambda m: f"{m.group(1)}.mid_block.attentions.0.{_LDM_ATTENTION[m.group(2)]}.", key)
    key = re.sub(r"^decoder\.up\.(\d+)\.attn\.(\d+)\.(norm|q|k|v|proj_out)\.",
                 lambda m: f"decoder.up_blocks.{num_levels - 1 - int(m.group(1))}.attentions.{m.group(2)}."
                           f"{_LDM_ATTENTION[m.group(3)]}.", key)
    key = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", key)
    key = re.sub(r"^decoder\.encoder\.layers\.", "decoder.condition_encoder.layers.", key)
    return key.replace(".nin_shortcut.", ".conv_shortcut.")


def convert_ldm_harmonizing_decoder(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LDM-layout conditional VAE state dict (Asymmetric VQGAN, ASUKA) -> diffusers key names.

    Attention q/k/v/proj_out 1x1-conv weights become linear weights. The known-unused
    ``decoder.up_layers.*`` and training-only ``loss.*`` entries are dropped; every other key is
    renamed and later checked strictly against the model.
    """
    levels = {int(m.group(1)) for k in state_dict if (m := re.match(r"decoder\.up\.(\d+)\.", k))}
    if not levels:
        raise ValueError("state dict has no LDM decoder keys 'decoder.up.{i}.block.{j}...': not an Asymmetric VQGAN "
                         "or ASUKA decoder checkpoint")
    out = {}
    for key, value in state_dict.items():
        if key.startswith(_LDM_DROPPED_PREFIXES):
            continue
        new = _ldm_vae_key(key, max(levels) + 1)
        if re.search(r"\.attentions\.\d+\.to_", new) and new.endswith("weight") and value.ndim == 4:
            value = value[:, :, 0, 0]
        out[new] = value
    return out


def _count(state_dict: Mapping[str, torch.Tensor], pattern: str) -> int:
    return len({m.group(1) for k in state_dict if (m := re.match(pattern, k))})


def harmonizing_config_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Read ``HarmonizingDecoderKL`` widths from a diffusers-named state dict (decoder, and encoder if present)."""
    needed = ("decoder.conv_in.weight", "decoder.conv_out.weight", "decoder.condition_encoder.layers.0.weight",
              "decoder.condition_encoder.layers.1.weight", "decoder.up_blocks.0.resnets.0.conv1.weight")
    missing = [k for k in needed if k not in state_dict]
    if missing:
        raise StateDictMismatchError("decoder state dict", "HarmonizingDecoderKL", missing, [], [],
                                     "not a conditional (Asymmetric VQGAN / ASUKA) decoder checkpoint")
    levels = _count(state_dict, r"decoder\.up_blocks\.(\d+)\.")
    up = [state_dict[f"decoder.up_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(levels)]
    attention = [any(k.startswith(f"decoder.up_blocks.{i}.attentions.") for k in state_dict) for i in range(levels)]
    first, second = (state_dict[f"decoder.condition_encoder.layers.{i}.weight"] for i in (0, 1))
    config = dict(
        up_block_types=tuple("AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in attention),
        gate_conv=first.shape[0] == 2 * second.shape[1],  # gated convs have twice the outputs the next conv reads
        up_block_out_channels=tuple(reversed(up)),
        layers_per_up_block=_count(state_dict, r"decoder\.up_blocks\.0\.resnets\.(\d+)\.") - 1,
        latent_channels=state_dict["decoder.conv_in.weight"].shape[1],
        out_channels=state_dict["decoder.conv_out.weight"].shape[0],
        condition_channels=state_dict["decoder.condition_encoder.layers.0.weight"].shape[1],
    )
    down_levels = _count(state_dict, r"encoder\.down_blocks\.(\d+)\.")
    if down_levels:
        config.update(
            down_block_types=("DownEncoderBlock2D",) * down_levels,
            down_block_out_channels=tuple(state_dict[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0]
                                          for i in range(down_levels)),
            layers_per_down_block=_count(state_dict, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."),
            in_channels=state_dict["encoder.conv_in.weight"].shape[1],
        )
    return config


FLUX_SCALING_FACTOR = 0.3611  # FLUX.1 AE (BFL ``AutoEncoderParams``; diffusers' FLUX vae config)
FLUX_SHIFT_FACTOR = 0.1159


def _latent_factors(vae: Optional[AutoencoderKL], latent_channels: int) -> dict:
    """``scaling_factor`` / ``shift_factor`` of ``vae``, else FLUX's for 16 latent channels, else none (SD's)."""
    if vae is not None:
        return {"scaling_factor": vae.config.scaling_factor, "shift_factor": vae.config.get("shift_factor")}
    if latent_channels == 16:
        return {"scaling_factor": FLUX_SCALING_FACTOR, "shift_factor": FLUX_SHIFT_FACTOR}
    return {}


def load_harmonizing_decoder_checkpoint(
    checkpoint: str | Path | Mapping[str, torch.Tensor],
    *,
    vae: Optional[AutoencoderKL] = None,
    mask_downsample: str | None = None,
    identity_quant_convs: bool = False,
    **config,
) -> HarmonizingDecoderKL:
    """Build a ``HarmonizingDecoderKL`` from an Asymmetric VQGAN or ASUKA checkpoint (LDM layout), strictly.

    ``checkpoint``: a ``.ckpt`` path (a Lightning checkpoint, read with ``weights_only=True``; its
    ``state_dict`` is used) or a state dict. The condition input (3 = Asymmetric VQGAN, 4 = ASUKA) is
    read from the weights; ``mask_downsample`` defaults to ``"nearest"`` for 3 channels ([62]) and
    ``"area_any"`` for 4 (ASUKA). Checkpoints with only ``decoder.*`` keys (as ASUKA's demo loads
    them) take encoder and quant convs from ``vae``, the SD ``AutoencoderKL`` they were trained on.
    ASUKA's released checkpoint is the FLUX port (``z_channels`` 16, FLUX AE without quant convs):
    load it with the FLUX VAE as ``vae`` or with ``identity_quant_convs=True``; the SD-1.5 decoder has
    ``z_channels`` 4. Every model parameter must come from the checkpoint (or ``vae``) and every
    checkpoint key must be used; otherwise :class:`StateDictMismatchError` lists the missing, unexpected and
    mis-shaped names.
    Latent scaling: ``vae``'s ``scaling_factor`` / ``shift_factor`` when given, else FLUX's (0.3611 / 0.1159, the
    values ``AutoEncoder.my_decode`` uses) for 16 latent channels, else SD's 0.18215 without shift.
    The official decoder's ``gate_conv`` and ``attn_resolutions`` are read off the weights (gated convs have twice
    the outputs; ``decoder.up.{i}.attn.{j}.*`` keys become ``AttnUpDecoderBlock2D`` levels); ``tanh_out`` leaves no
    trace in the weights: pass ``tanh_out=True`` for checkpoints trained with it.
    ``config`` overrides other ``HarmonizingDecoderKL`` settings (e.g. ``scaling_factor``, ``tanh_out``).
    """
    raw, source_name = _read_any(checkpoint, "state_dict", "decoder state dict")
    converted = convert_ldm_harmonizing_decoder(raw)
    inferred = harmonizing_config_from_state_dict(converted)
    if "encoder.conv_in.weight" not in converted:
        if vae is None:
            raise ValueError("checkpoint has no encoder.* keys; pass vae= (the AutoencoderKL it was trained with) "
                             "to supply the encoder and quant convs")
        base = HarmonizingDecoderKL.from_vae(vae, condition_channels=inferred["condition_channels"])
        source = {k: v for k, v in base.state_dict().items() if not k.startswith("decoder.")}
        inferred.update(down_block_types=tuple(vae.config.down_block_types), in_channels=vae.config.in_channels,
                        down_block_out_channels=tuple(base.config.down_block_out_channels),
                        layers_per_down_block=base.config.layers_per_down_block,
                        norm_num_groups=vae.config.norm_num_groups)
        converted = {**source, **converted}
    inferred.update(_latent_factors(vae, inferred["latent_channels"]))
    if vae is not None:
        inferred["norm_num_groups"] = vae.config.norm_num_groups
    if mask_downsample is None:
        mask_downsample = "area_any" if inferred["condition_channels"] == inferred["out_channels"] + 1 else "nearest"
    model = HarmonizingDecoderKL(**{**inferred, **config, "mask_downsample": mask_downsample})
    if not identity_quant_convs and vae is not None and getattr(vae, "quant_conv", None) is None:
        identity_quant_convs = "quant_conv.weight" not in converted  # the FLUX AE has no quant convs
    if identity_quant_convs:
        for name in ("quant_conv", "post_quant_conv"):
            weight = getattr(model, name).weight
            if f"{name}.weight" in converted:
                raise ValueError(f"identity_quant_convs=True but the checkpoint has {name}; leave it False")
            converted[f"{name}.weight"] = identity_conv1x1(weight)
            converted[f"{name}.bias"] = torch.zeros(weight.shape[0], dtype=weight.dtype)
    load_strict(model, converted, source=source_name,
                hint="an LDM-layout Asymmetric VQGAN / ASUKA decoder checkpoint is expected (keys decoder.up.{i}.block.{j}.*, "
                     "decoder.encoder.layers.{k}.*, quant convs unless identity_quant_convs=True)")
    return model.eval()


# ---------------------------------------------------------------------------------------------- aligner
def convert_asuka_flux_aligner_state_dict(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """ASUKA-FLUX alignment module (``get_single_stram_blk_asuka``: an ``nn.Sequential`` of Linear(512, dim),
    N ``SingleStreamBlockAsuka`` and LayerNorm; released as ``asuka_alignment_{clip,t5}.pt``) -> ``PriorAligner``
    keys: ``0.*`` -> ``proj_in.*``, ``{1..N}.*`` -> ``blocks.{0..N-1}.*`` (the port's names are kept inside a block),
    ``{N+1}.*`` -> ``norm_out.*``."""
    state_dict = _strip_prefix(state_dict)
    hint = "expected the FLUX port's nn.Sequential layout (0.*, 1..N.*, N+1.*)"
    bad = [k for k in state_dict if not k.partition(".")[0].isdigit()]
    if bad:
        raise StateDictMismatchError("aligner state dict", "PriorAligner", [], bad, [], hint)
    last = max((int(k.partition(".")[0]) for k in state_dict), default=-1)
    if last < 2 or "0.weight" not in state_dict or f"{last}.weight" not in state_dict:
        raise StateDictMismatchError("aligner state dict", "PriorAligner",
                                     [k for k in ("0.weight", "1.linear1.weight") if k not in state_dict], [], [], hint)
    converted = {}
    for key, value in state_dict.items():
        index, _, rest = key.partition(".")
        i = int(index)
        prefix = "proj_in" if i == 0 else "norm_out" if i == last else f"blocks.{i - 1}"
        converted[f"{prefix}.{rest}"] = value
    return converted


def aligner_from_asuka_flux(checkpoint: Union[PathLike, Mapping[str, torch.Tensor]], *, head_dim: int = 64):
    """A ``PriorAligner`` (``block_type="flux_single_stream"``) loaded strictly from the FLUX port's alignment module.

    Widths, depth and the MLP ratio come from the weights; the port's unused ``modulation`` layers are kept when the
    checkpoint has them (``keep_unused_modulation``). ``head_dim``: 64 in the port (``head_num = dim // 64``).
    """
    from asuka.models.aligner import PriorAligner

    raw, source = _read_any(checkpoint, None, "aligner state dict")
    converted = convert_asuka_flux_aligner_state_dict(raw)
    dim, in_dim = converted["proj_in.weight"].shape
    model = PriorAligner(
        in_dim=in_dim, cross_attention_dim=dim, num_blocks=_count_blocks(converted, "blocks"), head_dim=head_dim,
        mlp_ratio=(converted["blocks.0.linear1.weight"].shape[0] - 3 * dim) / dim, block_type="flux_single_stream",
        keep_unused_modulation=any(".modulation." in k for k in converted))
    return load_strict(model, converted, source=source,
                       hint="the FLUX port's alignment module (nn.Sequential: Linear, SingleStreamBlockAsuka x N, "
                            "LayerNorm) is expected").eval()


# ---------------------------------------------------------------------------------------------- ASUKA-FLUX release
ASUKA_FLUX_RELEASE_FILES = {"mae": "mae_300.pth", "aligner_clip": "asuka_alignment_clip.pt",
                            "aligner_t5": "asuka_alignment_t5.pt", "decoder": "asuka_decoder.ckpt",
                            "null_pooled": "vec.pt", "null_text": "txt_256.pt"}


def read_tensor(path: PathLike) -> torch.Tensor:
    """A single tensor saved with ``torch.save`` (the release's ``vec.pt`` / ``txt_256.pt``), read with
    ``weights_only=True`` on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist (pass the path of a torch.save'd tensor)")
    value = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{str(path)!r} holds a {type(value).__name__}, expected a tensor")
    return value


def convert_asuka_flux_release(release: PathLike, flux_fill: PathLike, out: PathLike, *,
                               mae_options: Optional[dict] = None, torch_dtype: Optional[torch.dtype] = None,
                               **load_kwargs) -> Path:
    """The released ``yikaiwang/ASUKA-FLUX.1-Fill`` folder (``mae_300.pth``, ``asuka_alignment_{clip,t5}.pt``,
    ``asuka_decoder.ckpt``, ``vec.pt``, ``txt_256.pt``) + a diffusers FLUX.1-Fill-dev folder or hub id ->
    an :class:`~asuka.pipelines.asuka_flux.AsukaFluxFillPipeline` ``save_pretrained`` folder at ``out``.

    Every part loads strictly (the MAE, both heads with their unused ``modulation`` layers, the decoder with FLUX's
    encoder, ``scaling_factor`` 0.3611 and ``shift_factor`` 0.1159). ``mae_options``: ``MAEPrior`` config entries
    (the release is ViT-B/16 with the official options off). Returns ``out``.
    """
    from asuka.pipelines.asuka_flux.pipeline import AsukaFluxFillPipeline

    release = Path(release)
    files = {name: release / file for name, file in ASUKA_FLUX_RELEASE_FILES.items()}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"the ASUKA-FLUX release folder lacks {', '.join(missing)}")
    pipe = AsukaFluxFillPipeline.from_parts(
        flux_fill, mae=files["mae"], aligner_clip=files["aligner_clip"], aligner_t5=files["aligner_t5"],
        decoder=files["decoder"], null_embeddings=(files["null_pooled"], files["null_text"]), mae_options=mae_options,
        torch_dtype=torch_dtype,
        **load_kwargs)
    out = Path(out)
    pipe.save_pretrained(out)
    return out

"""Key converters for published checkpoints, with strict key checking.

Shared pieces (reused by every converter): :func:`read_checkpoint` (``torch.load(weights_only=True)`` or
safetensors), :func:`load_strict` (names every missing, unexpected and mis-shaped key) and
:class:`StateDictMismatchError`.

MAE prior (:class:`~asuka.models.mae.MAEPrior`, specs/asuka.md §1.1.1, §1.3, §1.4):

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

import argparse
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import torch
from torch import nn

from asuka.models.mae import MAEPrior, sincos_pos_embed_2d

PathLike = Union[str, os.PathLike]
StateDict = dict[str, torch.Tensor]

# Encoder heads are not recoverable from weights; MAE's published sizes (ViT-B/L/H) fix them.
_ENCODER_HEADS = {768: 12, 1024: 16, 1280: 16}
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


def read_checkpoint(path: PathLike, key: Optional[str] = "model",
                    safe_globals: Iterable[Any] = (argparse.Namespace,)) -> StateDict:
    """Read a state dict from ``.safetensors`` or a pickle (``torch.load(weights_only=True)``, on CPU).

    ``key``: the entry holding the weights in a training checkpoint (``"model"`` for MAE/MAE-FAR,
    ``"state_dict"`` for Lightning); a file that already is a flat tensor dict is returned as is.
    ``safe_globals`` are the only extra classes the unpickler may build (MAE-FAR saves its
    ``argparse.Namespace`` next to the weights).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist (pass the path of a .pth/.ckpt/.safetensors file)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # the unpickler's own message names the offending global
        raise ValueError(f"cannot read {str(path)!r} with torch.load(weights_only=True): {error}") from error
    return unwrap_state_dict(obj, key, source=str(path))


def unwrap_state_dict(obj: Any, key: Optional[str] = "model", source: str = "checkpoint") -> StateDict:
    """``obj[key]`` for a training checkpoint, ``obj`` itself for a flat ``{name: tensor}`` dict."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source} holds a {type(obj).__name__}, expected a dict of tensors")
    if key is not None and key in obj and isinstance(obj[key], Mapping):
        obj = obj[key]
    if not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{source} is not a state dict (expected entry {key!r} or a flat dict of tensors); "
                         f"top-level keys: {', '.join(map(str, list(obj)[:20]))}")
    return dict(obj)


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
        depth=_count_blocks(state_dict, "blocks"), num_heads=_ENCODER_HEADS.get(embed_dim),
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
    source = str(checkpoint) if not isinstance(checkpoint, Mapping) else "MAE-FAR state dict"
    raw = unwrap_state_dict(checkpoint, "model") if isinstance(checkpoint, Mapping) else read_checkpoint(checkpoint)
    state = convert_mae_far_state_dict(raw, seed=seed, source=source)
    model = MAEPrior(**mae_config_from_state_dict(state, source=source, **config_overrides))
    return load_strict(model, state, source=source)


def mae_prior_from_official_mae(checkpoint: Union[PathLike, Mapping[str, torch.Tensor]], *, norm_pix_loss: bool = False,
                                grid_size: int = 16, seed: int = 0, **config_overrides) -> MAEPrior:
    """Build an ``MAEPrior`` at ``grid_size``² patches from an official MAE checkpoint (path or state dict).

    Pass ``norm_pix_loss=True`` for ``mae_pretrain_vit_*_full.pth`` (per-patch normalised predictions:
    ``prior(...).image`` is then None); the ``mae_visualize_vit_*.pth`` checkpoints predict pixels.
    """
    source = str(checkpoint) if not isinstance(checkpoint, Mapping) else "official MAE state dict"
    raw = unwrap_state_dict(checkpoint, "model") if isinstance(checkpoint, Mapping) else read_checkpoint(checkpoint)
    state = convert_official_mae_state_dict(raw, grid_size=grid_size, seed=seed, source=source)
    config = mae_config_from_state_dict(state, source=source, norm_pix_loss=norm_pix_loss, **config_overrides)
    return load_strict(MAEPrior(**config), state, source=source)

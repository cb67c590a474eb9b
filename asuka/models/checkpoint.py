"""Reading weights from disk safely: ``.safetensors``, or pickles with ``torch.load(weights_only=True)``.

Torch-only (no diffusers/timm import), so metric backbones and model converters share it.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import torch

PathLike = Union[str, os.PathLike]
StateDict = dict[str, torch.Tensor]


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

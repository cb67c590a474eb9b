"""Explicit weight resolution for metric backbones: nothing downloads unless the user asks.

torch-fidelity, torchmetrics and ``lpips`` all fetch their backbones from the internet when no local file
is given. Every metric here instead takes a local path, or downloads only when ``allow_download=True``
(CLI: ``--allow-download``). A missing weight raises :class:`MissingWeightsError` naming the option to
pass and where such a file comes from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


class MissingWeightsError(FileNotFoundError):
    """A metric needs backbone weights that were neither given nor allowed to download."""


@dataclass(frozen=True)
class WeightSource:
    """Where a backbone's weights come from, for error messages and docs."""

    what: str
    option: str
    url: str


def resolve_weights(path: str | Path | None, source: WeightSource, *, allow_download: bool) -> Path | None:
    """Return the local weight file, or ``None`` when downloading was explicitly allowed.

    Raises :class:`MissingWeightsError` when no path is given and downloading is not allowed, and when
    the given path does not exist.
    """
    if path is None:
        if allow_download:
            return None
        raise MissingWeightsError(
            f"{source.what} needs weights: pass {source.option} PATH (a local copy of {source.url}) "
            f"or --allow-download (Python: allow_download=True) to fetch them into the torch hub cache."
        )
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingWeightsError(f"{source.option}: no such file {str(path)!r} ({source.what}; source: {source.url}).")
    return path


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict from ``.safetensors`` or a pickle read with ``weights_only=True``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise TypeError(f"{str(path)!r} holds a {type(state).__name__}, expected a state dict of tensors.")
    return state

"""HarmonPaint's diagnostic images (paper Figs. 2, 12 and 13): a PCA of a self-attention map and the
cross-attention map of each prompt token, as RGB / grey images.

* :func:`attention_pca_image`: the rows of an (N, N) self-attention map (conditional branch, averaged over heads)
  are centred and projected onto their top-3 principal components; each component is min-max scaled to [0, 1]
  and the three are shown as RGB at the layer's token grid. Without SAMS, hole and known tokens share colours;
  with SAMS they separate.
* :func:`cross_attention_images`: the (N, L) cross-attention probabilities of the chosen tokens, each min-max
  scaled, at the token grid.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image


def _min_max(x: torch.Tensor, dim: int) -> torch.Tensor:
    low, high = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    return (x - low) / (high - low).clamp(min=1e-12)


def attention_pca_image(attention_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(3, H, W) in [0, 1]: the rows of ``attention_map`` (N, N), N = H * W, on their top-3 principal components
    (fewer than 3 when N < 3: the missing channels are 0)."""
    rows = attention_map.double()
    rows = rows - rows.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(rows, full_matrices=False)
    projected = rows @ vh[:3].T  # (N, k)
    rgb = torch.zeros(rows.shape[0], 3, dtype=torch.float64)
    rgb[:, : projected.shape[1]] = _min_max(projected, 0)
    return rgb.T.reshape(3, *size).float()


def cross_attention_images(probs: torch.Tensor, size: tuple[int, int], tokens: Sequence[int]) -> torch.Tensor:
    """(len(tokens), H, W) in [0, 1]: each token's map from ``probs`` (N, L), min-max scaled."""
    maps = probs[:, list(tokens)].double().T  # (T, N)
    return _min_max(maps, 1).reshape(len(tokens), *size).float()


def save_png(image: torch.Tensor, path: str | Path, scale: int = 8) -> Path:
    """Write a (C, H, W) image in [0, 1] (C = 1 or 3) as a PNG, each token shown as ``scale x scale`` pixels."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    array = np.repeat(np.repeat(array, scale, axis=1), scale, axis=2)
    Image.fromarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)).save(path)
    return path

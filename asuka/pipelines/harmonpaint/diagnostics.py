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


class DiagnosticsRecorder:
    """Writes the §5.6 diagnostics of chosen steps as PNGs into ``config.diagnostics_dir``:

    * ``sample{b}_step{i}_t{t}_self{k}_pca.png``: :func:`attention_pca_image` of self-attention layer ``k``
      (execution order; default 4, a latent/4 encoder layer) - the map that multiplies ``V``, i.e. ``W ⊙ A`` where
      SAMS acts on that layer at that step;
    * ``sample{b}_step{i}_t{t}_cross{h}x{w}_token{j}.png``: the cross-attention map of prompt token ``j`` averaged
      over the layers of grid ``h x w`` (the steer loss's resolutions), for the sample's prompt tokens.

    Maps are the conditional branch's, head-averaged, from the main (CFG) pass. Default steps: the last
    structure-phase step and the last step.
    """

    def __init__(self, controller, config, plans, token_masks, latent_size, prompt_tokens: list[list[int]]):
        from asuka.attention import AttentionStore, Read
        from asuka.pipelines.harmonpaint.controls import MAIN

        self.dir = Path(config.diagnostics_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        steps = config.diagnostics_steps
        if steps is None:
            structure = [i for i, plan in enumerate(plans) if plan.structure]
            steps = {structure[-1] if structure else 0, len(plans) - 1}
        self.steps = set(steps)
        self.plans, self.masks, self.latent_size, self.tokens = plans, token_masks, latent_size, prompt_tokens
        self.tau, self.variant = config.tau, config.sams_variant
        layers = controller.layers.select(kind="self")
        self.sams_layers = {layers[i].kind_index for i in config.sams_layers}
        read = Read("probs", batch="cond", heads="mean")

        def when(layer, state):
            return state.phase == MAIN and state.step in self.steps

        self.self_store = controller.add(AttentionStore(read, when), layers.select(indices=config.diagnostics_layers))
        self.cross_store = controller.add(AttentionStore(read, when),
                                          controller.layers.select(kind="cross", levels=config.steer_levels))

    def write(self, index: int, timestep: int) -> None:
        """Write the maps recorded at step ``index`` (nothing on other steps)."""
        if index not in self.steps:
            return
        from asuka.pipelines.harmonpaint.controls import maps_by_grid
        from asuka.pipelines.harmonpaint.sams import sams_factors

        stem = f"step{index:02d}_t{int(timestep)}"
        for layer, maps in zip(self.self_store.layers, self.self_store.maps):
            grid = layer.grid(self.latent_size)
            if self.plans[index].sams and layer.kind_index in self.sams_layers:
                rows, cols = sams_factors(self.masks.at(grid).to(maps), self.tau, self.variant)
                maps = maps * (rows @ cols.transpose(-1, -2))
            for b, sample_map in enumerate(maps):
                save_png(attention_pca_image(sample_map, grid),
                         self.dir / f"sample{b}_{stem}_self{layer.kind_index}_pca.png")
        for grid, maps in maps_by_grid(self.cross_store, self.latent_size).items():
            for b, sample_maps in enumerate(maps):
                tokens = self.tokens[b]
                if not tokens:
                    continue
                images = cross_attention_images(sample_maps, grid, tokens)
                for token, image in zip(tokens, images):
                    save_png(image[None], self.dir / f"sample{b}_{stem}_cross{grid[0]}x{grid[1]}_token{token}.png")
        self.self_store.clear()
        self.cross_store.clear()

"""Per-layer token masks from one latent-resolution mask, cached per token grid.

The methods resize masks differently (HD-Painter: antialiased bicubic then > 0.5; HarmonPaint: area
then >= 0.5; PILOT / CorrFill: nearest); :class:`TokenMasks` takes the resize function and caches the
flattened result per (h, w) grid, so each grid is resized once per generation.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from asuka.attention.control import AttentionCall

Resize = Callable[[torch.Tensor, tuple[int, int]], torch.Tensor]


def resize_nearest(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(mask, size=size, mode="nearest")


class TokenMasks:
    """``mask`` (B, 1, h, w) at latent resolution, 1 = hole -> (B', N) per layer call, row-major tokens.

    For a call whose batch is the CFG batch (``state.cfg`` and twice the mask's batch) the mask is
    repeated for both halves; a batch-1 mask broadcasts. ``resize(mask, (h, w))`` maps the latent mask
    to a layer's grid (default nearest).
    """

    def __init__(self, mask: torch.Tensor, resize: Resize = resize_nearest):
        if mask.ndim != 4 or mask.shape[1] != 1:
            raise ValueError(f"mask must be (B, 1, h, w), got {tuple(mask.shape)}")
        self.mask = mask
        self.resize = resize
        self._cache: dict[tuple[int, int], torch.Tensor] = {}

    def at(self, grid: tuple[int, int]) -> torch.Tensor:
        """(B, N) mask on the (h, w) grid."""
        grid = tuple(grid)
        if grid not in self._cache:
            self._cache[grid] = self.resize(self.mask, grid).flatten(1)
        return self._cache[grid]

    def prefill(self, grids) -> "TokenMasks":
        """Resize for every (h, w) grid in ``grids`` now, before the first UNet call: a compiled pass then never sees
        the cache fill (dynamo guards on its keys, so a fill inside the first pass costs one more graph)."""
        for grid in grids:
            self.at(grid)
        return self

    def for_call(self, call: AttentionCall) -> torch.Tensor:
        """(B_call, N) mask for this call's batch and query grid."""
        if call.grid is None:
            raise ValueError("the call has no token grid (the UNet was not called through the controller)")
        mask = self.at(call.grid)
        batch = call.batch_size
        if mask.shape[0] == batch or mask.shape[0] == 1:
            return mask
        if call.state.cfg and 2 * mask.shape[0] == batch:
            return torch.cat([mask, mask])
        raise ValueError(f"mask batch {mask.shape[0]} does not fit the UNet batch {batch} "
                         f"(cfg={call.state.cfg}); give one mask per sample")

"""High-resolution strategies, as IOPaint offers them (``schema.py::InpaintRequest``, ``model/base.py``).

Pure geometry, no model: which region of a large image a method sees.

- ``original``: the whole image at its own size.
- ``crop`` (IOPaint's default): when the longest side exceeds ``trigger_size`` (800), only the box around the
  hole(s), grown by ``margin`` (128) pixels on every side and clipped to the image, is processed; the result
  is pasted back into the full image. Below the trigger size it equals ``original``.
- ``resize``: when the longest side exceeds ``resize_limit`` (1280), the image is processed downscaled so that
  its longest side equals the limit and the result is upscaled back (paste-back then restores the known
  pixels at full resolution).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # kept import-light: the CLI reads the defaults below for ``asuka --help``
    import torch

DEFAULT_MAX_SIZE = 2048
"""Longest side (pixels) a method is run at by default; raise it with ``max_size=`` / ``--max-size``."""

HDStrategyName = Literal["original", "crop", "resize"]
HD_STRATEGIES: tuple[str, ...] = ("original", "crop", "resize")


@dataclass(frozen=True)
class HDStrategy:
    """IOPaint's defaults: ``hd_strategy=crop``, ``crop_trigger_size=800``, ``crop_margin=128``,
    ``resize_limit=1280``."""

    name: HDStrategyName = "crop"
    trigger_size: int = 800
    margin: int = 128
    resize_limit: int = 1280

    def __post_init__(self) -> None:
        from asuka.errors import InputError  # torch-free, import-light

        if self.name not in HD_STRATEGIES:
            raise InputError(f"must be one of {', '.join(HD_STRATEGIES)}; got {self.name!r}", "hd_strategy")
        for field in ("trigger_size", "resize_limit"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"must be a positive number of pixels; got {value!r}", f"hd_{field}")
        if isinstance(self.margin, bool) or not isinstance(self.margin, int) or self.margin < 0:
            raise InputError(f"must be >= 0 pixels; got {self.margin!r}", "hd_margin")


Box = tuple[int, int, int, int]  # (top, bottom, left, right), bottom/right exclusive


def hole_bbox(mask: "torch.Tensor") -> Box | None:
    """Bounding box of all hole pixels (mask > 0.5) over the whole batch; ``None`` when there is no hole."""
    hole = mask.detach().reshape(-1, *mask.shape[-2:]).gt(0.5).any(dim=0)
    rows = hole.any(dim=1).nonzero().flatten()
    cols = hole.any(dim=0).nonzero().flatten()
    if rows.numel() == 0:
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def expand_box(box: Box, margin: int, height: int, width: int) -> Box:
    """Grow ``box`` by ``margin`` pixels on every side, clipped to the ``height`` x ``width`` image."""
    top, bottom, left, right = box
    return max(0, top - margin), min(height, bottom + margin), max(0, left - margin), min(width, right + margin)


def crop_region(mask: "torch.Tensor", strategy: HDStrategy) -> Box | None:
    """The box the ``crop`` strategy processes, or ``None`` when the whole image is processed."""
    height, width = mask.shape[-2:]
    if strategy.name != "crop" or max(height, width) <= strategy.trigger_size:
        return None
    box = hole_bbox(mask)
    if box is None:
        return None
    return expand_box(box, strategy.margin, height, width)


def resize_target(height: int, width: int, strategy: HDStrategy) -> tuple[int, int] | None:
    """The (height, width) the ``resize`` strategy processes at, or ``None`` to keep the size."""
    longest = max(height, width)
    if strategy.name != "resize" or longest <= strategy.resize_limit:
        return None
    scale = strategy.resize_limit / longest
    return max(1, round(height * scale)), max(1, round(width * scale))

"""Batched, per-sample ColorJitter with torchvision's semantics (ASUKA paper §3.3).

ASUKA applies ``torchvision.transforms.ColorJitter(brightness=0.15, contrast=0.2, saturation=0.1, hue=0.03)`` to
the image that is encoded, for every training image. torchvision's transform handles one image per call; here a
whole batch is jittered on its device in one pass, each sample with its own factors *and its own order* of the four
operations, drawn from an explicit ``torch.Generator``. The operations follow torchvision's float-tensor code:

* brightness ``f``: ``clamp(f·x)``; contrast ``f``: ``clamp(f·x + (1-f)·mean(gray(x)))``;
* saturation ``f``: ``clamp(f·x + (1-f)·gray(x))`` with ITU-R 601 luma (0.2989, 0.587, 0.114);
* hue ``f`` ∈ [-0.5, 0.5]: HSV hue shifted by ``f`` turns (``(h + f) mod 1``);
* factors ``U[max(0, 1-b), 1+b]`` (hue ``U[-h, h]``), order a uniform random permutation (``torch.randperm(4)``).

Images are in [-1, 1] (the project convention) and are jittered on the [0, 1] scale, as torchvision expects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from kornia.color import hsv_to_rgb, rgb_to_hsv

__all__ = ["ColorJitterParams", "adjust", "color_jitter", "sample_params"]

_LUMA = (0.2989, 0.587, 0.114)
OPS = ("brightness", "contrast", "saturation", "hue")


@dataclass(frozen=True)
class ColorJitterParams:
    """Per-sample factors (B,) each, and ``order`` (B,4): indices into ``OPS`` applied left to right."""

    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor
    order: torch.Tensor


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(dim=-3)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(-3)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = factor.view(-1, 1, 1, 1).to(x.dtype)
    return (f * x + (1 - f) * other).clamp(0, 1)


def adjust(x: torch.Tensor, op: str, factor: torch.Tensor) -> torch.Tensor:
    """One torchvision colour operation on a batch (B,3,H,W) in [0,1] with per-sample ``factor`` (B,)."""
    if op == "brightness":
        return _blend(x, torch.zeros_like(x), factor)
    if op == "contrast":
        return _blend(x, _gray(x).mean(dim=(-3, -2, -1), keepdim=True), factor)
    if op == "saturation":
        return _blend(x, _gray(x), factor)
    if op == "hue":
        hsv = rgb_to_hsv(x)
        turn = 2 * math.pi
        h = torch.remainder(hsv[:, :1] + factor.view(-1, 1, 1, 1).to(x.dtype) * turn, turn)
        return hsv_to_rgb(torch.cat([h, hsv[:, 1:]], dim=1)).clamp(0, 1)
    raise ValueError(f"op must be one of {OPS}, got {op!r}")


def _range(value: float, name: str, center: float = 1.0, bound: float | None = None) -> tuple[float, float]:
    if value < 0 or (bound is not None and value > bound):
        raise ValueError(f"{name} must lie in [0, {bound if bound is not None else 'inf'}], got {value}")
    return (max(0.0, center - value), center + value) if center else (-value, value)


def sample_params(batch: int, *, brightness: float, contrast: float, saturation: float, hue: float,
                  generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> ColorJitterParams:
    """Draw per-sample factors and operation orders as torchvision's ``ColorJitter.get_params`` does per image."""
    def uniform(lo_hi: tuple[float, float]) -> torch.Tensor:
        lo, hi = lo_hi
        return lo + (hi - lo) * torch.rand(batch, generator=generator, device=device)

    return ColorJitterParams(
        brightness=uniform(_range(brightness, "brightness")),
        contrast=uniform(_range(contrast, "contrast")),
        saturation=uniform(_range(saturation, "saturation")),
        hue=uniform(_range(hue, "hue", center=0.0, bound=0.5)),
        order=torch.rand(batch, len(OPS), generator=generator, device=device).argsort(dim=1),
    )


def color_jitter(image: torch.Tensor, params: ColorJitterParams) -> torch.Tensor:
    """Apply ``params`` to ``image`` (B,3,H,W) in [-1,1]; returns the jittered batch in [-1,1]."""
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"image must be (B,3,H,W) in [-1,1], got {tuple(image.shape)}")
    x = ((image + 1) / 2).clamp(0, 1)
    factors = {op: getattr(params, op) for op in OPS}
    for position in range(len(OPS)):
        chosen = params.order[:, position].view(-1, 1, 1, 1)
        x = sum(torch.where(chosen == i, adjust(x, op, factors[op]), 0) for i, op in enumerate(OPS))
    return x * 2 - 1

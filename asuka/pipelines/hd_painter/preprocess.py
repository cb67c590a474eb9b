"""HD-Painter's pre-processing (paper §3.2; official code ``hd_inpaint.py``, ``src/smplfusion/utils/input_mask.py``).

Pure tensor functions, batched, no I/O:

- :func:`working_size`: the official size rule (long side ``long_side``, aspect kept, truncation as in the code);
- :func:`pad_bottom_right`: pad to a multiple on the bottom/right with a constant (the official code pads the image
  with black and the mask with 0 = known, ``IImage.padx(64)``);
- :func:`dilate`: binary dilation with the 4-neighbourhood (``iterations`` steps = an L1 diamond of that radius),
  as ``scipy.ndimage.binary_dilation``'s default structure;
- :func:`latent_mask`: the UNet's mask channel, 1 where any hole pixel falls in the latent cell;
- :func:`attention_mask`: PAIntA's / RASG's masks, antialiased bicubic downsampling then ``> 0.5``;
- :func:`token_weights`: the token set ``ind`` of paper §3.3 (words of the user prompt + the EOT of the full prompt)
  as a 0/1 weight vector over the 77 positions, one row per sample.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def working_size(height: int, width: int, long_side: int = 512) -> tuple[int, int]:
    """``(H', W')`` with the long side ``long_side`` and the aspect ratio kept, truncated like the official
    ``size=(min(512, int(512*w/h)), min(512, int(512*h/w)))`` (at least 1 px)."""
    new_w = min(long_side, int(long_side * width / height))
    new_h = min(long_side, int(long_side * height / width))
    return max(new_h, 1), max(new_w, 1)


def pad_bottom_right(x: torch.Tensor, multiple: int, value: float = 0.0,
                     mode: str = "constant") -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad ``x`` (..., H, W) on the bottom/right to multiples of ``multiple``; returns the padded tensor and the
    original ``(H, W)`` for cropping. ``mode="reflect"`` (the SR stage) falls back to ``replicate`` where the input
    is too small to reflect."""
    h, w = x.shape[-2:]
    pad = (0, (-w) % multiple, 0, (-h) % multiple)
    if pad[1] == 0 and pad[3] == 0:
        return x, (h, w)
    if mode == "constant":
        return F.pad(x, pad, mode="constant", value=value), (h, w)
    if mode == "reflect" and (pad[1] >= w or pad[3] >= h):
        mode = "replicate"
    return F.pad(x, pad, mode=mode), (h, w)


def dilate(mask: torch.Tensor, iterations: int) -> torch.Tensor:
    """Binary dilation of ``mask`` (B,1,H,W) in {0,1} with the 4-neighbourhood cross, ``iterations`` times (scipy's
    ``binary_dilation`` default; 19 iterations = an L1 diamond of radius 19). Zero padding at the border."""
    m = mask
    for _ in range(iterations):
        vertical = F.max_pool2d(m, kernel_size=(3, 1), stride=1, padding=(1, 0))
        horizontal = F.max_pool2d(m, kernel_size=(1, 3), stride=1, padding=(0, 1))
        m = torch.maximum(vertical, horizontal)
    return m


def _bicubic(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """PIL-like bicubic resize of a [0, 1] mask (antialiased when downsampling)."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.interpolate(mask, size=size, mode="bicubic", antialias=True, align_corners=False)


def resize_mask_bicubic(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic (antialiased) resize of a {0,1} mask, then "any coverage" (> 0): the official code's
    ``resize(..., BICUBIC)`` followed by ``> 0``, used for the working-size mask before its 1-px dilation."""
    return _bicubic(mask.float(), size).gt(1e-6).to(mask.dtype)


def latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The UNet's mask channel at latent ``size``: 1 where the bicubic-downsampled mask is > 0 (any coverage;
    official ``smplfusion/ddim.py::get_inpainting_condition``)."""
    return resize_mask_bicubic(mask, size)


def attention_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """PAIntA's / RASG's mask at a token grid ``size``: antialiased bicubic downsampling, then ``> 0.5``
    (official ``InputMask``; the paper says nearest-neighbour). (B,1,H,W) -> (B,1,h,w) float {0,1}."""
    return _bicubic(mask.float(), size).gt(0.5).to(mask.dtype)


def first_eos(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Index of the first ``eos_token_id`` in each row of ``input_ids`` (B, L); the last index if there is none."""
    is_eos = input_ids == eos_token_id
    first = is_eos.int().argmax(dim=1)
    return torch.where(is_eos.any(dim=1), first, torch.full_like(first, input_ids.shape[1] - 1))


def token_weights(prompt_ids: torch.Tensor, full_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """PAIntA's / RASG's token set as 0/1 weights (B, L): positions ``1..n`` (the words of the user prompt, which
    tokenises to ``[SOT, w1..wn, EOT, ...]``) plus the first EOT of the full conditioning prompt (user prompt + the
    positive suffix), paper §3.3 and the official ``rasg.py`` (l.48-49). SOT, the suffix's words and padding are
    excluded. Words beyond the full prompt's truncation are dropped with it."""
    length = full_ids.shape[1]
    positions = torch.arange(length, device=full_ids.device)[None]
    n_words = first_eos(prompt_ids, eos_token_id)[:, None]           # EOT index of tau = number of words + 1
    eot_full = first_eos(full_ids, eos_token_id)[:, None]
    words = (positions >= 1) & (positions < n_words) & (positions < eot_full)
    return (words | (positions == eot_full)).float()


def token_indices(weights: Sequence[float] | torch.Tensor) -> list[int]:
    """The positions with non-zero weight (one row of :func:`token_weights`), for display and tests."""
    return [int(i) for i in torch.as_tensor(weights).nonzero().flatten()]

"""PSNR and SSIM on the whole image or on a region (e.g. the known pixels, "background preservation").

Conventions follow ASUKA's ``asuka-flux/eval/cal_psnr_lpips_ssim.py`` (Yikai-Wang/asuka-misato): images are compared
on the [0, 1] scale, PSNR is ``-10 log10(MSE + 1e-7)`` (so identical images give 70 dB instead of
infinity) and SSIM is scikit-image's ``structural_similarity`` (7×7 uniform window, sample covariance,
``data_range=1``) on grayscale images (``torchvision`` ``rgb_to_grayscale`` weights 0.2989/0.587/0.114).
Pass ``gray=False`` for SSIM averaged over the RGB channels instead.

Region versions: ``within`` is a (B,1,H,W) {0,1} tensor of the pixels that count (for the known region
pass ``1 - mask``). Region PSNR is the PSNR of the MSE over those pixels (all channels). Region SSIM is
the mean of the SSIM map over those pixels, excluding the ``(win_size - 1) // 2`` border that
scikit-image also excludes from its mean, so ``within = 1`` everywhere gives exactly scikit-image's value.
An image whose region is empty scores NaN (reports aggregate with nan-mean and count such images).
"""

from __future__ import annotations

import numpy as np
import torch
from skimage.metrics import structural_similarity
from torchvision.transforms.functional import rgb_to_grayscale

PSNR_EPS = 1e-7  # ASUKA cal_psnr_lpips_ssim.py: -10 * log10(mse + 1e-7)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Map images from [-1, 1] to [0, 1] (float64 for exact metric arithmetic)."""
    return (x.double() + 1.0) / 2.0


def _check_pair(pred: torch.Tensor, target: torch.Tensor, within: torch.Tensor | None) -> None:
    if pred.ndim != 4 or pred.shape[1] != 3:
        raise ValueError(f"pred must be (B,3,H,W) in [-1,1], got shape {tuple(pred.shape)}.")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}.")
    if within is not None and (within.ndim != 4 or within.shape[1] != 1 or within.shape[0] != pred.shape[0]
                               or within.shape[-2:] != pred.shape[-2:]):
        raise ValueError(f"within must be (B,1,H,W) matching pred {tuple(pred.shape)}, got {tuple(within.shape)}.")


def mse(pred: torch.Tensor, target: torch.Tensor, within: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image mean squared error on the [0, 1] scale, optionally over the pixels where ``within`` is 1."""
    _check_pair(pred, target, within)
    err = (to_unit(pred) - to_unit(target)).square()
    if within is None:
        return err.mean(dim=(1, 2, 3))
    w = within.double().expand_as(err)
    return (err * w).sum(dim=(1, 2, 3)) / w.sum(dim=(1, 2, 3))  # 0/0 -> NaN for an empty region


def psnr(pred: torch.Tensor, target: torch.Tensor, within: torch.Tensor | None = None, *,
         eps: float = PSNR_EPS) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1, 1] (data range 1 after mapping to [0, 1]), shape (B,)."""
    return -10.0 * torch.log10(mse(pred, target, within) + eps)


def ssim(pred: torch.Tensor, target: torch.Tensor, within: torch.Tensor | None = None, *,
         gray: bool = True, win_size: int = 7) -> torch.Tensor:
    """Per-image SSIM (scikit-image, data range 1) for images in [-1, 1], shape (B,) float64.

    ``gray=True`` (default, ASUKA) converts to grayscale first; ``gray=False`` averages the RGB channels.
    """
    _check_pair(pred, target, within)
    if win_size < 3 or win_size % 2 == 0:
        raise ValueError(f"win_size must be an odd integer >= 3, got {win_size}.")
    p, t = to_unit(pred), to_unit(target)
    if gray:
        p, t = rgb_to_grayscale(p), rgb_to_grayscale(t)
    p_np, t_np = p.cpu().numpy(), t.cpu().numpy()
    w_np = None if within is None else within.detach().cpu().numpy()[:, 0] > 0.5
    pad = (win_size - 1) // 2
    scores = []
    for i in range(p_np.shape[0]):
        _, smap = structural_similarity(p_np[i], t_np[i], data_range=1.0, win_size=win_size,
                                        channel_axis=0, full=True)
        smap = smap.mean(axis=0)[pad:-pad, pad:-pad]
        if w_np is None:
            scores.append(smap.mean())
        else:
            region = w_np[i][pad:-pad, pad:-pad]
            scores.append(smap[region].mean() if region.any() else np.nan)
    return torch.tensor(scores, dtype=torch.float64)

"""Reduced-precision inference on CPU: ``Inpainter(..., dtype=torch.bfloat16)`` for ``sd`` and ``asuka``."""

from __future__ import annotations

import pytest
import torch

from asuka.api import Inpainter


@pytest.mark.parametrize("method", ["sd", "asuka"])
def test_bf16_inference_runs_and_stays_close_to_fp32(method):
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    options = {"num_inference_steps": 2}
    full = Inpainter(method, device="cpu", options=options)(image, mask, seed=0)
    painter = Inpainter(method, device="cpu", dtype=torch.bfloat16, options=options)
    half = painter(image, mask, seed=0)
    assert painter.runner.pipe.unet.dtype == torch.bfloat16
    assert half.dtype == full.dtype and torch.isfinite(half).all()
    assert torch.equal(half[..., :8, :], full[..., :8, :])  # known pixels pasted back exactly
    assert (half - full).abs().max() < 0.25  # bf16 keeps 8 bits of mantissa: the tiny models stay close

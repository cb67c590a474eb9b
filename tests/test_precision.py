"""Reduced-precision inference on CPU: ``Inpainter(..., dtype=torch.float16 | torch.bfloat16)`` for every method.

The models run in the half type; what the methods' papers and code keep in float32 stays float32 under it: the
losses whose gradients steer the latents (HD-Painter's RASG, HarmonPaint's steer loss, PILOT's objective, CorrFill's
correspondence loss) — checked by spying on them during a half-precision run.
"""

from __future__ import annotations

import pytest
import torch

from asuka.api import Inpainter
from asuka.compile import denoiser_of
from asuka.pipelines._registry import available_methods, get_method

# module attribute through which each method computes its guiding loss (the spy wraps it)
LOSSES = {
    "hd-painter": ("asuka.pipelines.hd_painter.pipeline", "latent_gradient"),  # RASG (HD-Painter §3.3)
    "harmonpaint": ("asuka.pipelines.harmonpaint.pipeline", "steer_loss"),  # Eq. 9
    "pilot": ("asuka.pipelines.pilot.schedule", "latent_gradient"),  # background + semantic objective
    "corrfill": ("asuka.pipelines.corrfill.guidance", "correspondence_loss"),  # attention-correspondence loss
}


def _inputs(size=64):
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, size, size, generator=g) * 2 - 1
    mask = torch.zeros(1, 1, size, size)
    mask[..., size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
    reference = torch.rand(1, 3, size, size, generator=g) * 2 - 1
    return image, mask, reference


def _spy_loss_dtypes(monkeypatch, method):
    """Record the dtype of every loss the method computes (an empty list for methods without one)."""
    import importlib

    seen: list[torch.dtype] = []
    if method in LOSSES:
        module_name, name = LOSSES[method]
        module = importlib.import_module(module_name)
        original = getattr(module, name)

        def spy(*args, **kwargs):
            result = original(*args, **kwargs)
            seen.append((result[1] if isinstance(result, tuple) else result).dtype)
            return result

        monkeypatch.setattr(module, name, spy)
    return seen


@pytest.mark.parametrize("method", available_methods())
def test_fp16_inference_runs_keeps_losses_in_fp32_and_stays_close_to_fp32(method, monkeypatch):
    image, mask, reference = _inputs()
    registered = get_method(method)
    inputs = {d.role: "a photo" if d.kind == "text" else reference for d in registered.spec.inputs
              if d.required or d.kind == "text"}  # a prompt where one is taken: HarmonPaint steers toward it
    options = dict(registered.quick)
    full = Inpainter(method, device="cpu", options=options)(image, mask, inputs=inputs, seed=0)
    losses = _spy_loss_dtypes(monkeypatch, method)
    painter = Inpainter(method, device="cpu", dtype=torch.float16, options=options)
    half = painter(image, mask, inputs=inputs, seed=0)
    assert denoiser_of(painter.runner.pipe).dtype == torch.float16
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    assert (half - full).abs().max() < 0.1  # fp16 keeps 11 bits of mantissa: measured <= 0.03 on the tiny models
    if method in LOSSES:
        assert losses and all(dtype == torch.float32 for dtype in losses), losses


@pytest.mark.parametrize("method", ["sd", "asuka"])
def test_bf16_inference_runs_and_stays_close_to_fp32(method):
    image, mask, _ = _inputs(32)
    options = {"num_inference_steps": 2}
    full = Inpainter(method, device="cpu", options=options)(image, mask, seed=0)
    painter = Inpainter(method, device="cpu", dtype=torch.bfloat16, options=options)
    half = painter(image, mask, seed=0)
    assert painter.runner.pipe.unet.dtype == torch.bfloat16
    assert half.dtype == full.dtype and torch.isfinite(half).all()
    assert torch.equal(half[..., :8, :], full[..., :8, :])  # known pixels pasted back exactly
    assert (half - full).abs().max() < 0.25  # bf16 keeps 8 bits of mantissa: the tiny models stay close

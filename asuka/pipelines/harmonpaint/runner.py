"""The ``harmonpaint`` method's builder and runner: :class:`~asuka.pipelines.harmonpaint.pipeline.HarmonPaintPipeline`
loaded from any 9-channel SD inpainting folder or hub id, sampling with DDIM as in the paper (§V-A: 50 DDIM steps,
guidance 7.5; DDIM on the folder's noise schedule, without sample clipping, as SD uses it and as the official
code's scheduler)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from asuka.pipelines._registry import PipelineRunner, load_pipeline
from asuka.pipelines._sampling import ddim_without_clipping
from asuka.pipelines.harmonpaint.pipeline import HarmonPaintPipeline


class HarmonPaintRunner(PipelineRunner):
    """``(image [-1,1], mask {0,1}) -> image [-1,1]`` through :class:`HarmonPaintPipeline` (paste-back is left to the
    caller). ``options`` are HarmonPaint's (see :mod:`asuka.pipelines.harmonpaint.options`)."""

    def __call__(self, image: torch.Tensor, mask: torch.Tensor, *, generator=None, progress_bar: bool = True,
                 prompt: list[str] | None = None, negative_prompt: list[str] | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5, **options: Any) -> torch.Tensor:
        batch, _, height, width = image.shape
        return self._run(image, progress_bar, prompt=prompt or [""] * batch, negative_prompt=negative_prompt,
                         image=(image + 1) / 2, mask_image=mask, height=height, width=width,
                         num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, generator=generator,
                         **options)


def build_harmonpaint(model: str | Path, *, device: torch.device, dtype: torch.dtype,
                      vae: Any = None) -> HarmonPaintRunner:
    """Load :class:`HarmonPaintPipeline` from ``model`` (safety checker off); ``vae`` replaces the folder's VAE
    (e.g. a ``HarmonizingDecoderKL``, which then decodes with the image and the mask)."""
    pipe = load_pipeline(HarmonPaintPipeline, model, dtype, vae=vae, safety_checker=None,
                         requires_safety_checker=False)
    pipe.scheduler = ddim_without_clipping(pipe.scheduler)
    return HarmonPaintRunner(pipe.to(device))

"""``sd``: diffusers' ``StableDiffusionInpaintPipeline`` as an inference method (the base every other builds on).

Defaults are diffusers' (``num_inference_steps=50``, ``guidance_scale=7.5``, ``strength=1.0``) with the
pipeline's own scheduler; the safety checker is off. Default weights: the tiny offline pipeline of
:func:`asuka.models.tiny.default_tiny_inpaint_dir` (pass ``--model runwayml/stable-diffusion-inpainting`` or a
local copy for the real model).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from asuka.pipelines._registry import PipelineRunner, load_pipeline, register_method


class SDInpaintRunner(PipelineRunner):
    """``(image [-1,1], mask {0,1}) -> image [-1,1]`` through ``StableDiffusionInpaintPipeline.__call__``."""

    def __call__(self, image: torch.Tensor, mask: torch.Tensor, *, generator: torch.Generator | None = None,
                 prompt: str = "", negative_prompt: str | None = None, num_inference_steps: int = 50,
                 guidance_scale: float = 7.5, strength: float = 1.0, progress_bar: bool = True) -> torch.Tensor:
        batch, _, height, width = image.shape
        return self._run(
            image, progress_bar,
            prompt=[prompt] * batch,
            negative_prompt=None if negative_prompt is None else [negative_prompt] * batch,
            image=(image + 1) / 2,  # diffusers takes [0, 1] tensors
            mask_image=mask,
            height=height,
            width=width,
            strength=strength,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generator,
        )


def _default_model() -> Path:
    from asuka.models.tiny import default_tiny_inpaint_dir

    return default_tiny_inpaint_dir()


@register_method("sd", default_model=_default_model,
                 description="diffusers StableDiffusionInpaintPipeline (default: the tiny offline pipeline)")
def build_sd(model: str | Path, *, device: torch.device, dtype: torch.dtype, **overrides: Any) -> SDInpaintRunner:
    """Load ``StableDiffusionInpaintPipeline.from_pretrained(model)`` with the safety checker off.

    ``overrides`` are passed to ``from_pretrained`` (e.g. ``vae=`` a harmonizing decoder).
    """
    from diffusers import StableDiffusionInpaintPipeline

    pipe = load_pipeline(StableDiffusionInpaintPipeline, model, dtype, safety_checker=None,
                         requires_safety_checker=False, **overrides)
    return SDInpaintRunner(pipe.to(device))

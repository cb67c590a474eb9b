"""``sd``: diffusers' ``StableDiffusionInpaintPipeline`` as an inference method (the base every other builds on).

Defaults are diffusers' (``num_inference_steps=50``, ``guidance_scale=7.5``, ``strength=1.0``) with the
pipeline's own scheduler; the safety checker is off. Default weights: the tiny offline pipeline of
:func:`asuka.models.tiny.default_tiny_inpaint_dir` (pass ``--model runwayml/stable-diffusion-inpainting`` or a
local copy for the real model). Torch-free at import (registration only; torch and diffusers load in the builder).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from asuka.options import Input, Option
from asuka.pipelines._registry import PipelineRunner, register_method

if TYPE_CHECKING:
    import torch

_DIFFUSERS = "diffusers StableDiffusionInpaintPipeline.__call__"

OPTIONS = (
    Option("num_inference_steps", "int", 50, "number of denoising steps", _DIFFUSERS, min=1),
    Option("guidance_scale", "float", 7.5, "classifier-free guidance scale (<= 1: no guidance)", _DIFFUSERS, min=0),
    Option("strength", "float", 1.0, "how much the masked area is noised (1 = start from pure noise)", _DIFFUSERS,
           min=0, max=1, min_exclusive=True),
)
INPUTS = (
    Input("prompt", "text", "text prompt", default=""),
    Input("negative_prompt", "text", "negative prompt (guides away from it; needs guidance_scale > 1)"),
)


class SDInpaintRunner(PipelineRunner):
    """``(image [-1,1], mask {0,1}) -> image [-1,1]`` through ``StableDiffusionInpaintPipeline.__call__``."""

    def __call__(self, image: "torch.Tensor", mask: "torch.Tensor", *, generator=None, progress_bar: bool = True,
                 prompt: list[str] | None = None, negative_prompt: list[str] | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5, strength: float = 1.0) -> "torch.Tensor":
        batch, _, height, width = image.shape
        return self._run(
            image, progress_bar,
            prompt=prompt or [""] * batch,
            negative_prompt=negative_prompt,
            image=(image + 1) / 2,  # diffusers takes [0, 1] tensors
            mask_image=mask,
            height=height,
            width=width,
            strength=strength,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generator,
        )


def build_sd(model: str | Path, *, device: "torch.device", dtype: "torch.dtype", vae: Any = None) -> SDInpaintRunner:
    """Load ``StableDiffusionInpaintPipeline.from_pretrained(model)`` with the safety checker off; ``vae`` replaces
    the pipeline's VAE (diffusers' pipeline decodes an ``AsymmetricAutoencoderKL`` with the image and mask)."""
    from diffusers import StableDiffusionInpaintPipeline

    from asuka.pipelines._registry import load_pipeline

    pipe = load_pipeline(StableDiffusionInpaintPipeline, model, dtype, vae=vae, safety_checker=None,
                         requires_safety_checker=False)
    return SDInpaintRunner(pipe.to(device))


def _default_model() -> Path:
    from asuka.models.tiny import default_tiny_inpaint_dir

    return default_tiny_inpaint_dir()


register_method("sd", build="asuka.pipelines.sd:build_sd", default_model=_default_model,
                description="diffusers StableDiffusionInpaintPipeline (default: the tiny offline pipeline)",
                options=OPTIONS, inputs=INPUTS)

"""The registry's builder for ``hd-painter``: :class:`HDPainterRunner` around :class:`HDPainterPipeline`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from asuka.pipelines._registry import PipelineRunner, load_pipeline
from asuka.pipelines.hd_painter.defaults import NEGATIVE_PROMPT, POSITIVE_PROMPT
from asuka.pipelines.hd_painter.pipeline import HDPainterPipeline
from asuka.tensors import resize_image


class HDPainterRunner(PipelineRunner):
    """``(image [-1,1], mask {0,1}) -> image [-1,1]``: the pipeline works at ``working_long_side`` and the result is
    resized back (bicubic) to the input's size; paste-back is left to :func:`asuka.pipelines._common.run_inpainting`."""

    def __call__(self, image: torch.Tensor, mask: torch.Tensor, *, generator=None, progress_bar: bool = True,
                 prompt: list[str] | None = None, negative_prompt: list[str] | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5, painta: bool = True, rasg: bool = True,
                 eta: float = 0.1, sigma_mode: str = "official", painta_smoothing: bool = True,
                 rasg_low_memory: bool = True, working_long_side: int = 512, mask_dilation: int = 1,
                 positive_prompt: str = POSITIVE_PROMPT, official_negative_prompt: bool = True) -> torch.Tensor:
        batch = image.shape[0]
        if negative_prompt is None:
            negative_prompt = [NEGATIVE_PROMPT if official_negative_prompt else ""] * batch
        out = self._run(image, progress_bar, image=image, mask_image=mask, prompt=prompt or [""] * batch,
                        negative_prompt=negative_prompt, positive_prompt=positive_prompt, painta=painta, rasg=rasg,
                        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, eta=eta,
                        sigma_mode=sigma_mode, painta_smoothing=painta_smoothing, rasg_low_memory=rasg_low_memory,
                        working_long_side=working_long_side, mask_dilation=mask_dilation, generator=generator)
        return resize_image(out, tuple(image.shape[-2:]))


def build_hd_painter(model: str | Path, *, device: torch.device, dtype: torch.dtype, vae: Any = None) -> HDPainterRunner:
    """Load any SD-inpainting pipeline folder or hub id as :class:`HDPainterPipeline`; ``vae`` (e.g. a
    ``HarmonizingDecoderKL``) replaces its VAE and decodes with the image and the mask."""
    pipe = load_pipeline(HDPainterPipeline, model, dtype, vae=vae, safety_checker=None, requires_safety_checker=False)
    return HDPainterRunner(pipe.to(device))

"""``asuka``: ASUKA on Stable Diffusion 1.5 inpainting (paper §3, Fig. 3) as an inference method.

This package module only registers the method (torch-free); the pipeline is :mod:`asuka.pipelines.asuka.pipeline`,
whose public names (``AsukaInpaintPipeline``, ``AsukaRunner``, ``build_asuka``, ``default_tiny_asuka_dir``) are also
reachable from here, imported on first access.
"""

from __future__ import annotations

from typing import Any

from asuka.options import Option
from asuka.pipelines._registry import register_method

_PIPELINE_NAMES = ("AsukaInpaintPipeline", "AsukaRunner", "build_asuka", "default_tiny_asuka_dir")

OPTIONS = (
    Option("num_inference_steps", "int", 50, "number of denoising steps (no classifier-free guidance)",
           "diffusers StableDiffusionInpaintPipeline default; the ASUKA paper names no step count", min=1),
)


def __getattr__(name: str) -> Any:  # PEP 562: the heavy pipeline module loads on first use
    if name in _PIPELINE_NAMES:
        from asuka.pipelines.asuka import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _default_model():
    from asuka.pipelines.asuka.pipeline import default_tiny_asuka_dir

    return default_tiny_asuka_dir()


register_method("asuka", build="asuka.pipelines.asuka.pipeline:build_asuka", default_model=_default_model,
                description="ASUKA: MAE prior + aligner + SD-inpaint (no CFG) + harmonizing decoder "
                            "(default: a tiny random offline pipeline)",
                options=OPTIONS)

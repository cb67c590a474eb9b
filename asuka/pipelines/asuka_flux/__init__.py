"""``asuka-flux``: ASUKA on FLUX.1-Fill-dev with the released weights (``yikaiwang/ASUKA-FLUX.1-Fill``) as an
inference method.

This package module only registers the method (torch-free); the pipeline is :mod:`asuka.pipelines.asuka_flux.pipeline`,
whose public names (``AsukaFluxFillPipeline``, ``AsukaFluxRunner``, ``build_asuka_flux``, ``empty_prompt_embeddings``,
``tiny_asuka_flux_pipeline``, ``default_tiny_asuka_flux_dir``) are also reachable from here, imported on first access.
"""

from __future__ import annotations

from typing import Any

from asuka.options import Option
from asuka.pipelines._registry import register_method

_PIPELINE_NAMES = ("AsukaFluxFillPipeline", "AsukaFluxRunner", "build_asuka_flux", "empty_prompt_embeddings",
                   "tiny_asuka_flux_pipeline", "default_tiny_asuka_flux_dir")

OPTIONS = (
    Option("num_inference_steps", "int", 50, "flow-matching Euler steps (FLUX's shifted schedule)",
           "asuka-flux test_asuka_flux.py: get_schedule(50, seq_len, shift=True)", min=1),
    Option("guidance_scale", "float", 30.0, "FLUX.1-Fill's distilled guidance",
           "asuka-flux test_asuka_flux.py: denoise(..., guidance=30.)", min=0),
    Option("condition_weight", "float", 0.5,
           "interpolation of the aligned MAE condition toward the empty-prompt embeddings (1 = condition alone)",
           "asuka-flux test_asuka_flux.py --condition_weight default; README 'CFG scale of 0.5'"),
)


def __getattr__(name: str) -> Any:  # PEP 562: the heavy pipeline module loads on first use
    if name in _PIPELINE_NAMES:
        from asuka.pipelines.asuka_flux import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _default_model():
    from asuka.pipelines.asuka_flux.pipeline import default_tiny_asuka_flux_dir

    return default_tiny_asuka_flux_dir()


register_method("asuka-flux", build="asuka.pipelines.asuka_flux.pipeline:build_asuka_flux",
                default_model=_default_model,
                description="ASUKA on FLUX.1-Fill (the released weights): MAE prior + CLIP/T5 alignment heads + "
                            "FLUX.1-Fill + harmonizing decoder (default: a tiny random offline pipeline)",
                options=OPTIONS)

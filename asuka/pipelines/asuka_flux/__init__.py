"""``asuka-flux``: ASUKA on FLUX.1-Fill (the released weights) as an inference method.

This package module only registers the method (torch-free); the pipeline is
:mod:`asuka.pipelines.asuka_flux.pipeline`, whose public names are also reachable from here, imported on first access.
"""

from __future__ import annotations

from typing import Any

from asuka.options import Option
from asuka.pipelines._registry import register_method

_PIPELINE_NAMES = ("AsukaFluxFillPipeline", "AsukaFluxRunner", "build_asuka_flux", "default_tiny_asuka_flux_dir",
                   "tiny_asuka_flux_pipeline")
_OFFICIAL = "official asuka-misato test_asuka_flux.py"

OPTIONS = (
    Option("num_inference_steps", "int", 50, "number of Euler flow-matching steps", f"{_OFFICIAL} (get_schedule(50))",
           min=1),
    Option("guidance_scale", "float", 30.0, "FLUX.1 distilled guidance value", f"{_OFFICIAL} (guidance=30)", min=0),
    Option("condition_weight", "float", 0.5, "c = c_null + w (c_mae - c_null): weight of the MAE condition",
           f"{_OFFICIAL} (--condition_weight)"),
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

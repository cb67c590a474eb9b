"""``harmonpaint``: HarmonPaint (Li et al., "HarmonPaint: Harmonized Training-Free Diffusion Inpainting",
arXiv:2507.16732), training-free harmonious inpainting on a 9-channel Stable Diffusion inpainting model, registered
as an inference method. Torch-free: this module only declares (options in :mod:`~.options`).

Modules: :mod:`~.masks` (token-grid masks, Eq. 7 soft mask), :mod:`~.sams` (Eqs. 4-7), :mod:`~.makvs`
(Eqs. 10-13), :mod:`~.steer` (Eqs. 8-9 and the latent step schedule), :mod:`~.schedule` (the Efficient Division
Strategy, §IV-C), :mod:`~.controls` (the attention controls on :mod:`asuka.attention`), :mod:`~.diagnostics`
(Figs. 2, 12, 13), :mod:`~.pipeline` (``HarmonPaintPipeline``), :mod:`~.runner` (builder).
"""

from __future__ import annotations

from typing import Any

from asuka.pipelines._registry import register_method
from asuka.pipelines.harmonpaint.options import INPUTS, OPTIONS, PRESETS


def __getattr__(name: str) -> Any:  # PEP 562: the heavy pipeline module loads on first use
    if name in ("HarmonPaintPipeline", "HarmonPaintConfig"):
        from asuka.pipelines.harmonpaint import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _default_model():
    from asuka.models.tiny import default_tiny_inpaint_dir

    return default_tiny_inpaint_dir()


register_method("harmonpaint", build="asuka.pipelines.harmonpaint.runner:build_harmonpaint",
                default_model=_default_model,
                description="HarmonPaint: SAMS + attention steer loss + MAKVS on SD-inpainting (Li et al. 2025; "
                            "default: the tiny random offline model)",
                options=OPTIONS, inputs=INPUTS, presets=PRESETS,
                quick={"num_inference_steps": 3})  # t = 667 (structure: SAMS + steer), 334, 1 (style: MAKVS)

"""``hd-painter``: HD-Painter (Manukyan et al., "HD-Painter: High-Resolution and Prompt-Faithful Text-Guided Image
Inpainting with Diffusion Models", arXiv 2312.14091; official code github.com/Picsart-AI-Research/HD-Painter) as an
inference method: PAIntA + RASG on any 9-channel SD inpainting model, and the inpainting-specialised x4
super-resolution (:mod:`.sr`), usable after any method.

This module only registers the method (torch-free). Modules: :mod:`.preprocess` (sizes, masks, token set),
:mod:`.painta` / :mod:`.rasg` (the math), :mod:`.controls` (the attention controls on :mod:`asuka.attention`),
:mod:`.pipeline` (``HDPainterPipeline``), :mod:`.runner` (the registry's builder), :mod:`.sr`
(``InpaintSRPipeline``), :mod:`.blend` (Poisson blending). ``HDPainterPipeline`` and ``InpaintSRPipeline`` are also
reachable from here, imported on first access.
"""

from __future__ import annotations

from typing import Any

from asuka.options import Input, Option, Preset
from asuka.pipelines._registry import register_method
from asuka.pipelines.hd_painter.defaults import NEGATIVE_PROMPT, POSITIVE_PROMPT

_LAZY = {"HDPainterPipeline": "pipeline", "InpaintSRPipeline": "sr"}
_HD = "official hd_inpaint.py"
_RASG = "official src/methods/rasg.py"

OPTIONS = (
    Option("num_inference_steps", "int", 50, "DDIM steps, trailing timesteps (999, 979, ... for 50)", _HD, min=1),
    Option("guidance_scale", "float", 7.5, "classifier-free guidance scale (<= 1: no guidance)", _HD, min=0),
    Option("painta", "bool", True, "PAIntA: prompt-aware introverted attention at latent/2 and latent/4 while t > 500",
           "paper §3.3"),
    Option("rasg", "bool", True, "RASG: reweighting attention score guidance (the gradient replaces DDIM's noise)",
           "paper §3.4"),
    Option("eta", "float", 0.1, "RASG's eta (the official evaluation script uses 0.25)", f"paper §4.2; {_HD}",
           min=0),
    Option("sigma_mode", "str", "official", "RASG's sigma: 'official' (per-step alphas, released code) or 'paper' "
           "(DDIM's cumulative alphas, 10-25x larger)", "official src/smplfusion/scheduler.py; paper §4.2",
           choices=("official", "paper")),
    Option("painta_smoothing", "bool", True, "3x3 Gaussian smoothing of PAIntA's coefficients (official, not in the "
           "paper)", "official attentionpatch/painta.py"),
    Option("rasg_low_memory", "bool", True, "RASG's graph only for the conditional half: the unconditional half runs "
           "as a separate pass without one (less memory and backward work; off = the official CFG-batch graph)",
           "asuka (the official code keeps the whole CFG batch's graph)"),
    Option("working_long_side", "int", 512, "long side of the working resolution (a multiple of 64)", _HD, min=64),
    Option("mask_dilation", "int", 1, "pixels of 4-neighbourhood mask dilation at the working resolution", _HD,
           min=0),
    Option("positive_prompt", "str", POSITIVE_PROMPT, "appended to the prompt as ', <positive_prompt>' ('' = off)",
           _HD),
    Option("official_negative_prompt", "bool", True, "use the official negative prompt when none is given", _HD),
)
PRESETS = (
    Preset("official", {}, "the official inference script hd_inpaint.py (the defaults)", _HD),
    Preset("official-eval", {"eta": 0.25, "positive_prompt": "", "official_negative_prompt": False},
           "the official evaluation script: eta 0.25, no positive/negative prompts", "official metrics/eval.py"),
    Preset("paper-sigma", {"sigma_mode": "paper"}, "RASG with the paper's (cumulative) sigma", "paper §4.2"),
    Preset("painta-only", {"rasg": False}, "ablation: only PAIntA (deterministic DDIM)", "paper Table 2"),
    Preset("rasg-only", {"painta": False}, "ablation: only RASG", "paper Table 2"),
    Preset("base", {"painta": False, "rasg": False}, "the base inpainting model with the same sampler and prompts",
           "paper Table 2"),
)
INPUTS = (
    Input("prompt", "text", "what to put in the hole (e.g. 'a red boat')", default="", source="paper §3"),
    Input("negative_prompt", "text", "negative prompt (default: the official one, see official_negative_prompt)",
          source=_HD),
)


def __getattr__(name: str) -> Any:  # PEP 562: the heavy modules load on first use
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _default_model():
    from asuka.models.tiny import default_tiny_inpaint_dir

    return default_tiny_inpaint_dir()


register_method("hd-painter", build="asuka.pipelines.hd_painter.runner:build_hd_painter", default_model=_default_model,
                description="HD-Painter: PAIntA + RASG on any SD inpainting model (default: the tiny offline "
                            "pipeline)", options=OPTIONS, inputs=INPUTS, presets=PRESETS,
                quick={"num_inference_steps": 2, "working_long_side": 128})

__all__ = ["NEGATIVE_PROMPT", "OPTIONS", "POSITIVE_PROMPT", "PRESETS", "INPUTS", "HDPainterPipeline",
           "InpaintSRPipeline"]

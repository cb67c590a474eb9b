"""``corrfill``: CorrFill (Liu et al., WACV 2025) -- reference-guided inpainting by correspondence guidance on four
baselines (Side-by-side, LeftRefill, IP-Adapter-Plus, Paint-by-Example), as an inference method.

This package module only registers the method (torch-free). The parts: :mod:`.config` (settings, Table S1 presets,
profiles), :mod:`.correspondence` and :mod:`.guidance` (the math), :mod:`.control` (state and attention controls),
:mod:`.loop` (the denoising loop), :mod:`.pipelines` (the pipeline classes), :mod:`.runner` (the builder); the
pipeline classes and ``make_config`` are also reachable from here, imported on first use.
"""

from __future__ import annotations

from typing import Any

from asuka.options import Input, Option, Preset
from asuka.pipelines._registry import register_method
from asuka.pipelines.corrfill.config import BANK_UPDATES, BASELINES, PRESETS, PROFILES, make_config

_PIPELINE_NAMES = ("CorrFillInpaintPipeline", "CorrFillPaintByExamplePipeline", "CorrFillOutput")
_S1 = "paper Table S1"
_CODE = "official corrfill_module/corrfill.py"
_TABLE = "; none = the baseline's RealEstate10K value of Table S1"

OPTIONS = (
    Option("baseline", "str", "side-by-side", "base model formulation CorrFill guides (the --model must match: "
           "SD-2 inpainting for side-by-side/leftrefill, SD-1.5 inpainting for ip-adapter-plus, a Paint-by-Example "
           "folder for paint-by-example)", "paper §4.1", choices=BASELINES),
    Option("profile", "str", "reference_code", "reference_code: the official code's behaviour; paper_clean: "
           "dominant pairs zeroed at C[t,P(t)] and masks on both CFG branches", "official code vs paper §3.3-3.4",
           choices=PROFILES),
    Option("num_inference_steps", "int", 50, "denoising steps (DDIM; Paint-by-Example: the folder's scheduler)",
           "paper §4.1", min=1),
    Option("scheduler", "str", "ddim", "sampler: ddim (the paper's; a DDIMScheduler on the folder's schedule, as the "
           "official code for SD) or model (the folder's own; the official code keeps Paint-by-Example's PNDM, which "
           "makes the latent update zero)", "paper §4.1; official corr_guided.py", choices=("ddim", "model")),
    Option("guidance_scale", "float", None, "classifier-free guidance; none = the baseline's (side-by-side 3, "
           "leftrefill 2.5, ip-adapter-plus 7.5, paint-by-example 5)", _CODE, min=0, nullable=True),
    Option("eta", "float", 1.0, "DDIM eta (the latent update scales with sigma_t, so 0 disables it)",
           "official corr_guided.py", min=0, max=1),
    Option("step_masking", "int", None, "Step_a: leading steps with attention masking" + _TABLE, _S1, min=0,
           nullable=True),
    Option("step_optimize", "int", None, "Step_o: leading steps with latent optimisation" + _TABLE, _S1, min=0,
           nullable=True),
    Option("mask_window", "float", None, "Win_a: masking radius, > 0 in tokens, < 0 a ratio of the side" + _TABLE,
           _S1, nullable=True),
    Option("smooth_window", "float", None, "Win_s: smoothing radius, ratio of the side" + _TABLE, _S1, min=0,
           min_exclusive=True, nullable=True),
    Option("mask_boost", "float", None, "Str_a: logit boost v inside the radius" + _TABLE, _S1, min=0,
           nullable=True),
    Option("str_optimize", "float", None, "Str_o: latent-optimisation strength" + _TABLE, _S1, min=0,
           nullable=True),
    Option("vote_layers", "int_list", None, "self-attention layers (execution order) voting into the matching map; "
           "none = 7..15 (paint-by-example 10..14)", "official config/*.json vote_blocks", min=0, nullable=True),
    Option("enable_masking", "bool", True, "attention masking (Eqs. 3-4)", "paper §3.4"),
    Option("enable_filter", "bool", True, "dominant-token filter", "paper §3.3"),
    Option("enable_smoothing", "bool", True, "correspondence smoothing (Eq. 2)", "paper §3.3"),
    Option("enable_latent_opt", "bool", True, "latent optimisation (Eq. 5)", "paper §3.5"),
    Option("gradient_checkpointing", "bool", False, "checkpoint the UNet's blocks in the gradient pass: less "
           "memory (autograd keeps block inputs only), one more forward of the conditional half per optimised step",
           "diffusers enable_gradient_checkpointing"),
    Option("dominant_bank_update", "str", None, "matching-map entries zeroed for dominant tokens; none = the "
           "profile's (code_compat / zero_pair)", _CODE, choices=BANK_UPDATES, nullable=True),
    Option("mask_uncond_branch", "bool", None, "also mask the unconditional CFG branch; none = the profile's",
           _CODE, nullable=True),
    Option("prompt_embeds", "str", None, "LeftRefill: file (.pt or .safetensors) of the learned prompt embeddings "
           "(e.g. leftrefill_pos_prompt.pt)", "official leftrefill/README.md", nullable=True),
    Option("negative_prompt_embeds", "str", None, "LeftRefill: file of the learned negative prompt embeddings",
           "official leftrefill/README.md", nullable=True),
    Option("ip_adapter", "str", None, "IP-Adapter-Plus: folder or hub id with the adapter weights (h94/IP-Adapter)",
           "paper §4.1", nullable=True),
    Option("ip_adapter_subfolder", "str", "models", "IP-Adapter: subfolder of the weights and image_encoder/",
           "h94/IP-Adapter layout"),
    Option("ip_adapter_weight_name", "str", "ip-adapter-plus_sd15.safetensors", "IP-Adapter: weight file name",
           "h94/IP-Adapter layout"),
    Option("ip_adapter_scale", "float", 1.0, "IP-Adapter: image-prompt scale", "official corr_guided.py", min=0),
)

PRESET_DECLARATIONS = tuple(
    Preset(name, {"baseline": p.baseline, **{k: v for k, v in p.settings.items()}},
           p.note or f"{p.baseline}, {'RealEstate10K' if name.endswith('re10k') else 'MegaDepth'} (Table S1)",
           "official config/*.json" if p.note else _S1)
    for name, p in PRESETS.items())

INPUTS = (
    Input("reference", "image", "reference image of the same scene, the image's size (matched by stem in folders)",
          required=True, aligned=True, source="paper §3.1"),
    Input("prompt", "text", "text prompt; none = the baseline's (empty; ip-adapter-plus: 'best quality, high "
          "quality')", source=_CODE),
    Input("negative_prompt", "text", "negative prompt; none = the baseline's ('monochrome, lowres, bad anatomy, "
          "worst quality, low quality')", source=_CODE),
)


def __getattr__(name: str) -> Any:  # PEP 562: the heavy pipeline module loads on first use
    if name in _PIPELINE_NAMES:
        from asuka.pipelines.corrfill import pipelines

        return getattr(pipelines, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _default_model():
    from asuka.models.tiny import default_tiny_inpaint_dir

    return default_tiny_inpaint_dir()


register_method("corrfill", build="asuka.pipelines.corrfill.runner:build", default_model=_default_model,
                description="CorrFill: correspondence-guided reference-based inpainting on Side-by-side, LeftRefill, "
                            "IP-Adapter-Plus or Paint-by-Example (default: the tiny offline SD pipeline)",
                options=OPTIONS, inputs=INPUTS, presets=PRESET_DECLARATIONS)

__all__ = ["make_config", *_PIPELINE_NAMES]

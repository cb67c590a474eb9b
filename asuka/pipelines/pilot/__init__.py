"""``pilot``: PILOT inpainting by latent optimisation on a text-to-image Stable Diffusion model (Pan et al., "Coherent
and Multi-modality Image Inpainting via Latent Space Optimization", arXiv 2407.08019 v2; official code
github.com/Lingzhi-Pan/PILOT), registered as an inference method. Torch-free: this module only declares.

Modules: :mod:`~asuka.pipelines.pilot.objective` (per-sample losses and masks, pure),
:mod:`~asuka.pipelines.pilot.schedule` (λ, step size, τ/K/γ plan, momentum, blend, pure),
:mod:`~asuka.pipelines.pilot.controls` (SBC and the semantic-term recorder on :mod:`asuka.attention`),
:mod:`~asuka.pipelines.pilot.pipeline` (``PilotInpaintPipeline``), :mod:`~asuka.pipelines.pilot.runner` (builder).
"""

from __future__ import annotations

from asuka.options import Input, Option, Preset, Weights
from asuka.pipelines._registry import register_method

_PAPER = "paper §5.1"
_CONFIGS = "official configs/*.yaml"
_CODE = "official pipeline/pipeline_pilot.py"

OPTIONS = (
    Option("num_inference_steps", "int", 200, "DDIM steps", _PAPER, min=1),
    Option("guidance_scale", "float", 7.5, "classifier-free guidance scale (<= 1: no guidance)", _PAPER, min=0),
    Option("op_interval", "int", 10, "tau: optimise the latent every tau-th step", _PAPER, min=1),
    Option("num_gradient_ops", "int", 10, "K: momentum-SGD steps per optimised step (0: no optimisation)", _PAPER,
           min=0),
    Option("gamma", "float", 1.0, "optimise while t >= (1 - gamma) T, blend the background below (1: no blend)",
           _PAPER, min=0, max=1),
    Option("lr", "float", 0.025, "latent step size (grown as lr * 1.002^(T - t) by lr_schedule exp)", _CONFIGS,
           min=0),
    Option("lr_schedule", "str", "exp", "step-size schedule over t", _CODE + " lr_scheduler",
           choices=("exp", "constant", "linear")),
    Option("lr_warmup", "float", 0.007, "step size at the first denoising step", _CONFIGS, min=0),
    Option("momentum", "float", 0.7, "heavy-ball momentum (buffer reset at every optimised step)", _CONFIGS,
           min=0, max=1),
    Option("coef", "float", 150.0, "lambda base of the semantic loss (times background cells / coef_area_norm)",
           _CONFIGS, min=0),
    Option("coef_schedule", "str", "linear", "lambda over t: linear from c at T-1 to 0.1c at 0.3T, or constant",
           _CODE + " coef_scheduler", choices=("linear", "constant")),
    Option("coef_area_norm", "float", 1499.0, "lambda area normalisation (code: std)", _CODE, min=0,
           min_exclusive=True),
    Option("sbc", "bool", True, "Semantic Boundary Control on all cross-attention layers", "paper §4.1.2"),
    Option("controlnet_conditioning_scale", "float", 1.0, "ControlNet residual scale", _CONFIGS, min=0),
    Option("adapter_conditioning_scale", "float", 1.0, "T2I-Adapter residual scale", _CODE, min=0),
    Option("ip_adapter_scale", "float", 0.6, "IP-Adapter image-branch scale", _CONFIGS + " (ipa_step100)", min=0),
    Option("lora_scale", "float", 1.0, "LoRA weight (when a LoRA is loaded)", "official run_example.py", min=0),
)

INPUTS = (
    Input("prompt", "text", "text prompt for the hole (the paper's COCO runs use the object class name)",
          default=""),
    Input("negative_prompt", "text", "negative prompt (needs guidance_scale > 1)"),
    Input("control_image", "image", "ControlNet / T2I-Adapter condition map at the image's size (needs the "
          "controlnet or t2i_adapter weights)", aligned=True),
    Input("ip_adapter_image", "image", "IP-Adapter reference image (needs the ip_adapter weights)"),
)

WEIGHTS = (
    Weights("controlnet", "ControlNetModel folder or hub id (e.g. lllyasviel/sd-controlnet-scribble); gradients "
            "flow through it", source="official run_example.py controlnet_id"),
    Weights("t2i_adapter", "T2IAdapter folder or hub id", source="official pipeline/pipeline_pilot.py (adapter)"),
    Weights("ip_adapter", "IP-Adapter weight file in a folder that also holds image_encoder/ (h94/IP-Adapter "
            "layout, e.g. models/ip-adapter_sd15.safetensors)", source="official run_example.py ipa_id"),
    Weights("lora", "LoRA weight file (or its folder), loaded with diffusers' load_lora_weights; weight: lora_scale",
            source="official run_example.py lora_id"),
)

QUICK = {"num_inference_steps": 2, "op_interval": 1, "num_gradient_ops": 1}
"""Every stage once (an optimised step with one gradient step, a guided step), for smoke tests and benchmarks."""

_STEP100 = {"num_inference_steps": 100, "op_interval": 10, "num_gradient_ops": 10, "coef": 150.0,
            "coef_schedule": "linear", "lr_schedule": "exp", "momentum": 0.7, "guidance_scale": 7.5}
PRESETS = (
    Preset("t2i_step100", {**_STEP100, "gamma": 1.0, "lr": 0.025, "lr_warmup": 0.007},
           "text-guided, 100 steps", "official configs/t2i_step100.yaml"),
    Preset("t2i_step200", {**_STEP100, "num_inference_steps": 200, "op_interval": 20, "num_gradient_ops": 20,
                           "gamma": 1.0, "lr": 0.025, "lr_warmup": 0.007},
           "text-guided, 200 steps", "official configs/t2i_step200.yaml"),
    Preset("controlnet_step100", {**_STEP100, "gamma": 0.8, "lr": 0.03, "lr_warmup": 0.01,
                                  "controlnet_conditioning_scale": 1.0},
           "with a ControlNet", "official configs/controlnet_step100.yaml"),
    Preset("ipa_step100", {**_STEP100, "gamma": 0.8, "lr": 0.03, "lr_warmup": 0.007, "ip_adapter_scale": 0.6},
           "with an IP-Adapter", "official configs/ipa_step100.yaml"),
    Preset("ipa_controlnet_step100", {**_STEP100, "gamma": 0.8, "lr": 0.025, "lr_warmup": 0.01,
                                      "ip_adapter_scale": 0.4, "controlnet_conditioning_scale": 0.8},
           "with an IP-Adapter and a ControlNet", "official configs/ipa_controlnet_step100.yaml"),
)


def _default_model():
    from asuka.pipelines.pilot.runner import default_tiny_pilot_dir

    return default_tiny_pilot_dir()


register_method("pilot", build="asuka.pipelines.pilot.runner:build_pilot", default_model=_default_model,
                description="PILOT: latent optimisation + semantic boundary control on a text-to-image SD model "
                            "(default: a tiny random offline model)",
                options=OPTIONS, inputs=INPUTS, presets=PRESETS, weights=WEIGHTS, quick=QUICK)

"""HarmonPaint's declared options, presets and inputs (torch-free), with the paper's values as defaults
(arXiv:2507.16732). No official code exists, so every detail the paper leaves open is an option; the defaults and
their sources:

* ``sams_layers``: "layers 2-6" read as 0-based self-attention layers in execution order (MasaCtrl's convention):
  ``down_blocks.1``, ``down_blocks.2`` and the mid block; the 1-based reading is ``1,2,3,4,5``.
* ``makvs_layers``: "the final 8 layers" = self-attention layers 8-15.
* ``division_eta``: the Efficient Division Strategy's eta (§IV-C): timesteps ``t >= eta * T`` are the structure
  phase (SAMS, steer loss), the others the style phase (MAKVS); exclusive unless ``sams_all_steps`` /
  ``makvs_all_steps`` (the paper "focuses on" one aspect per phase).
* ``lam``: 1.4 for stylised images, 0.8 for natural ones (§V-D; the ``natural`` preset); 0 switches MAKVS off.
* The steer loss's update rule, step size, iterations, token set and whether SAMS acts during its gradient pass are
  not stated; the defaults follow the Attend-and-Excite / Predicated-Diffusion code the loss comes from: one step
  ``z <- z - a_i grad`` per structure step with ``a_i = 20 sqrt(linspace(1, 0.5, steps)[i])``, all prompt tokens,
  maps at latent/4 and latent/2 (the paper's "resolutions 16 and 32" at 512 px: levels 2 and 1), SAMS on.
* ``mask_resize``: how the hole mask reaches each token grid (not stated): area fraction >= 0.5.
"""

from __future__ import annotations

from asuka.options import Input, MethodSpec, Option, Preset

SAMS_VARIANTS = ("obj_bg", "bg_bg", "obj_obj")
MAKVS_MODES = ("concat", "naive")
MASK_RESIZE_MODES = ("area", "nearest", "maxpool")
STEER_NORMALIZE = ("none", "ae")

_PAPER = "paper §V-A"
_SAMS = "paper §IV-A, Eqs. 4-7"
_MAKVS = "paper §IV-B, Eqs. 10-13"
_STEER = "paper §IV-A, Eqs. 8-9; step rule from the Attend-and-Excite / Predicated-Diffusion code"
_DIVISION = "paper §IV-C"
_NOT_STATED = "not stated in the paper"

SAMPLER_OPTIONS = (
    Option("num_inference_steps", "int", 50, "DDIM steps", _PAPER, min=1),
    Option("guidance_scale", "float", 7.5, "classifier-free guidance scale (<= 1: no guidance)", _PAPER, min=0),
)

HARMONPAINT_OPTIONS = (
    Option("use_sams", "bool", True, "SAMS: reweight encoder self-attention, suppressing object-background pairs",
           _SAMS),
    Option("use_steer", "bool", True, "attention steer loss: one latent gradient step per structure-phase step",
           _STEER),
    Option("use_makvs", "bool", True, "MAKVS: append mask-adjusted keys/values in decoder self-attention", _MAKVS),
    Option("tau", "float", 0.1, "SAMS soft-mask smoothing (Eq. 7; 0 = hard mask)", _SAMS + "; Fig. 9", min=0, max=1),
    Option("lam", "float", 1.4, "MAKVS strength on the appended keys (1.4 stylised, 0.8 natural; 0 = off)",
           "paper §V-A, §V-D; Fig. 8", min=0),
    Option("division_eta", "float", 0.6, "structure phase: t >= eta * T; style phase below", _DIVISION,
           min=0, max=1),
    Option("sams_layers", "int_list", (2, 3, 4, 5, 6), "self-attention layers (execution order, 0-15) with SAMS",
           "paper §V-A 'layers 2-6' (0-based)", min=-16, max=15),
    Option("makvs_layers", "int_list", tuple(range(8, 16)), "self-attention layers (execution order) with MAKVS",
           "paper §V-A 'final 8 layers'", min=-16, max=15),
    Option("sams_variant", "str", "obj_bg", "pairs SAMS suppresses (obj_bg = the paper's; bg_bg, obj_obj: Fig. 7)",
           _SAMS + "; Fig. 7", choices=SAMS_VARIANTS),
    Option("makvs_mode", "str", "concat", "concat = Eqs. 11-12; naive = Eq. 13 (keys replaced, Fig. 3)",
           _MAKVS + "; Fig. 3", choices=MAKVS_MODES),
    Option("mask_resize", "str", "area", "hole mask to token grids: area >= 0.5, nearest, or maxpool (any-covered)",
           _NOT_STATED, choices=MASK_RESIZE_MODES),
    Option("sams_all_steps", "bool", False, "SAMS on every step, not only in the structure phase", _DIVISION),
    Option("makvs_all_steps", "bool", False, "MAKVS on every step, not only in the style phase", _DIVISION),
    Option("steer_step_size", "float", 20.0, "steer step scale s (a_i = s sqrt(linspace(1, 0.5, steps)[i]))",
           _STEER, min=0),
    Option("steer_iterations", "int", 1, "steer gradient steps per structure-phase step", _STEER, min=1),
    Option("steer_levels", "int_list", (1, 2), "cross-attention levels the loss reads (1 = latent/2, 2 = latent/4)",
           "paper §IV-A 'resolutions 16 and 32'", choices=(0, 1, 2)),
    Option("steer_token_indices", "int_list", None, "prompt token slots to steer (none = every prompt token)",
           _NOT_STATED, min=0, max=76, nullable=True),
    Option("steer_normalize", "str", "none", "none = literal Eq. 9; ae = x100 re-softmax and geometric mean",
           "Attend-and-Excite / Predicated-Diffusion code", choices=STEER_NORMALIZE),
    Option("steer_with_sams", "bool", True, "SAMS also acts in the steer loss's gradient pass", _NOT_STATED),
    Option("diagnostics_dir", "str", None, "write self-attention PCA and cross-attention PNGs here (none = off)",
           "paper Figs. 2, 12, 13", nullable=True),
    Option("diagnostics_steps", "int_list", None, "steps to record (none = last structure step and last step)",
           "paper Figs. 2, 12, 13", min=0, nullable=True),
    Option("diagnostics_layers", "int_list", (4,), "self-attention layers whose PCA is written",
           "paper Fig. 2", min=-16, max=15),
)

OPTIONS = SAMPLER_OPTIONS + HARMONPAINT_OPTIONS

PRESETS = (
    Preset("stylised", {"lam": 1.4}, "stylised images (oil painting, sketch...): MAKVS lambda 1.4", _PAPER),
    Preset("natural", {"lam": 0.8}, "natural images (general inpainting): MAKVS lambda 0.8", "paper §V-D"),
)

INPUTS = (
    Input("prompt", "text", "text prompt (the paper uses the image's caption)", default=""),
    Input("negative_prompt", "text", "negative prompt (needs guidance_scale > 1)"),
)

PIPELINE_SPEC = MethodSpec(HARMONPAINT_OPTIONS)
"""The options :class:`~asuka.pipelines.harmonpaint.pipeline.HarmonPaintPipeline` takes as keywords."""

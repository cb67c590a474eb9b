"""CorrFill settings: every knob of the method, the eight parameter sets of the paper's Table S1 as named presets,
and the two behaviour profiles (torch-free).

Names follow the paper (CorrFill, Liu et al., WACV 2025, supplementary Table S1) with the official code's names in
brackets: ``step_masking`` = Step_a (``step_masking``), ``step_optimize`` = Step_o (``step_optimize``),
``mask_window`` = Win_a (``mask_window``; > 0: a token count, the same at every layer resolution; < 0: a ratio of
the half-image side, floored at half a token), ``smooth_window`` = Win_s, ``mask_boost`` = Str_a (v),
``str_optimize`` = Str_o. Constants not in the paper come from the official code ``khliu0000/CorrFill``
(``corrfill_module/corrfill.py``, ``cg_pipeline.py``, ``utils.py``, ``share.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from asuka.errors import InputError

BASELINES = ("side-by-side", "leftrefill", "ip-adapter-plus", "paint-by-example")

# Execution-order indices (down -> mid -> up) of the self-attention layers whose maps vote into the matching map.
DECODER_VOTE_LAYERS = tuple(range(7, 16))  # config/{sidebyside,leftrefill,ipadapter}_*.json "vote_blocks" [7, 15]
PAINT_BY_EXAMPLE_VOTE_LAYERS = tuple(range(10, 15))  # config/paintbyexample_*.json "vote_blocks" [10, 14]

PROFILES = ("reference_code", "paper_clean")
BANK_UPDATES = ("code_compat", "zero_pair", "off")  # "off", not "none": the CLI reads none as unset


@dataclass(frozen=True)
class CorrFillConfig:
    """All CorrFill settings. Defaults: the Side-by-side / RealEstate10K row of Table S1, profile ``reference_code``.

    Switches (paper Table 2 ablation order): ``enable_masking`` (attention masking, Eqs. 3-4), ``enable_filter``
    (dominant-token filter, Sec. 3.3), ``enable_smoothing`` (correspondence smoothing, Eq. 2), ``enable_latent_opt``
    (latent optimisation, Eq. 5). With masking and optimisation off CorrFill changes nothing.
    """

    step_masking: int = 50
    step_optimize: int = 50
    mask_window: float = 2.0
    smooth_window: float = 0.2
    mask_boost: float = 1.0
    str_optimize: float = 2.0
    enable_masking: bool = True
    enable_filter: bool = True
    enable_smoothing: bool = True
    enable_latent_opt: bool = True
    vote_layers: tuple[int, ...] = DECODER_VOTE_LAYERS
    # Constants of the official code.
    dominant_thresh: int = 4          # a reference token hit by more than 4 target tokens is dominant (paper: 4)
    min_valid: int = 4                # fewer valid correspondences: no masking in that layer call
    heatmap_radius: float = 0.05      # E(P): reference tokens within 0.05 (normalised) of P are positives
    base_lr: float = 0.03             # latent update 0.03 * rho * sigma_t * Str_o * g / std(g)
    loss_rescale: float = 1000.0      # gradient of 1000*S, divided by 1000 (fp16 underflow guard)
    adaptive_weight: bool = True      # rho_adapt: fraction of target tokens with a valid correspondence
    vote_in_grad_pass: bool = True    # the gradient pass votes into the matching map too
    # Behaviours where the paper and the code differ (see PROFILES).
    dominant_bank_update: str = "code_compat"
    mask_uncond_branch: bool = False
    # Memory: checkpoint the UNet's blocks in the gradient pass (diffusers' gradient checkpointing): autograd keeps
    # block inputs only and re-runs each block in backward -- one more forward of the conditional half per step.
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        for name in ("step_masking", "step_optimize", "dominant_thresh", "min_valid"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InputError(f"must be an integer >= 0, got {value!r}", f"options.{name}")
        if self.mask_window == 0:
            raise InputError("must be > 0 (tokens) or < 0 (ratio of the image side), got 0", "options.mask_window")
        for name in ("smooth_window", "heatmap_radius"):
            if not getattr(self, name) > 0:
                raise InputError(f"must be > 0, got {getattr(self, name)!r}", f"options.{name}")
        for name in ("mask_boost", "str_optimize", "base_lr", "loss_rescale"):
            if not getattr(self, name) >= 0:
                raise InputError(f"must be >= 0, got {getattr(self, name)!r}", f"options.{name}")
        if self.dominant_bank_update not in BANK_UPDATES:
            raise InputError(f"must be one of {', '.join(BANK_UPDATES)}, got {self.dominant_bank_update!r}",
                             "options.dominant_bank_update")
        layers = tuple(self.vote_layers)
        if not layers or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
            raise InputError(f"must be non-empty layer indices >= 0, got {self.vote_layers!r}",
                             "options.vote_layers")
        object.__setattr__(self, "vote_layers", tuple(sorted(set(layers))))

    @property
    def masking_steps(self) -> int:
        """Number of leading steps with attention masking (0 when masking is off)."""
        return self.step_masking if self.enable_masking else 0

    @property
    def optimize_steps(self) -> int:
        """Number of leading steps with latent optimisation (0 when it is off)."""
        return self.step_optimize if self.enable_latent_opt else 0

    @property
    def estimation_steps(self) -> int:
        """Leading steps whose passes must estimate correspondences: after them nothing uses the estimate."""
        return max(self.masking_steps, self.optimize_steps)


@dataclass(frozen=True)
class Preset:
    """One named parameter set: the baseline it belongs to and the settings it fixes."""

    baseline: str
    settings: dict = field(default_factory=dict)
    note: str = ""


def _table_s1(step_a: int, step_o: int, win_a: float, win_s: float, str_a: float, str_o: float,
              vote_layers: tuple[int, ...] = DECODER_VOTE_LAYERS) -> dict:
    return dict(step_masking=step_a, step_optimize=step_o, mask_window=win_a, smooth_window=win_s,
                mask_boost=str_a, str_optimize=str_o, vote_layers=vote_layers)


_PBE = PAINT_BY_EXAMPLE_VOTE_LAYERS

# Paper Table S1 ("(t)" = tokens -> positive window, "(i)" = ratio of the image side -> negative window), plus the two
# official config files that differ from it.
PRESETS: dict[str, Preset] = {
    "paint-by-example-re10k": Preset("paint-by-example", _table_s1(50, 50, 4, 0.4, 1, 2, _PBE)),
    "paint-by-example-megadepth": Preset("paint-by-example", _table_s1(25, 50, 4, 0.4, 1, 0.5, _PBE)),
    "ip-adapter-plus-re10k": Preset("ip-adapter-plus", _table_s1(25, 50, -0.3, 0.2, 1, 2)),
    "ip-adapter-plus-megadepth": Preset("ip-adapter-plus", _table_s1(25, 50, 5, 0.2, 1, 0.5)),
    "side-by-side-re10k": Preset("side-by-side", _table_s1(50, 50, 2, 0.2, 1, 2)),
    "side-by-side-megadepth": Preset("side-by-side", _table_s1(25, 50, 3, 0.2, 1, 0.5)),
    "leftrefill-re10k": Preset("leftrefill", _table_s1(5, 50, -0.3, 0.05, 1, 0.5)),
    "leftrefill-megadepth": Preset("leftrefill", _table_s1(5, 5, 2, 0.2, 0, 0.5)),
    "ip-adapter-plus-re10k-code": Preset(
        "ip-adapter-plus", _table_s1(25, 50, 13, 0.2, 1, 2),
        "config/ipadapter_realestate.json: Win_a 13 tokens (Table S1: 0.3 of the side)"),
    "leftrefill-megadepth-code": Preset(
        "leftrefill", _table_s1(15, 50, 2, 0.2, 0, 0.5),
        "config/leftrefill_megadepth.json: Step_a 15, Step_o 50 (Table S1: 5 and 5)"),
}

DEFAULT_PRESET = {baseline: f"{baseline}-re10k" for baseline in BASELINES}

# reference_code: the official code's behaviour (bank entries of dominant tokens zeroed at the code's indices
# C[P(t), P(P(t))]; masks on the conditional CFG branch only). paper_clean: the principled reading (zero the pair
# C[t, P(t)]; mask both CFG branches). Both keep the matching map in fp32 and a fresh state per image.
PROFILE_SETTINGS: dict[str, dict] = {
    "reference_code": dict(dominant_bank_update="code_compat", mask_uncond_branch=False),
    "paper_clean": dict(dominant_bank_update="zero_pair", mask_uncond_branch=True),
}


def make_config(baseline: str = "side-by-side", preset: str | None = None, profile: str = "reference_code",
                **overrides) -> CorrFillConfig:
    """The settings for ``baseline``: its preset (default ``<baseline>-re10k``), then ``profile``, then
    ``overrides`` (any :class:`CorrFillConfig` field)."""
    if baseline not in BASELINES:
        raise InputError(f"must be one of {', '.join(BASELINES)}, got {baseline!r}", "options.baseline")
    preset = preset or DEFAULT_PRESET[baseline]
    if preset not in PRESETS:
        raise InputError(f"must be one of {', '.join(PRESETS)}, got {preset!r}", "options.preset")
    if PRESETS[preset].baseline != baseline:
        raise InputError(f"preset {preset!r} is for baseline {PRESETS[preset].baseline!r}, not {baseline!r}; pick "
                         f"one of {', '.join(p for p, v in PRESETS.items() if v.baseline == baseline)}",
                         "options.preset")
    if profile not in PROFILES:
        raise InputError(f"must be one of {', '.join(PROFILES)}, got {profile!r}", "options.profile")
    known = {f.name for f in fields(CorrFillConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise InputError(f"unknown CorrFill setting(s): {', '.join(unknown)}", f"options.{unknown[0]}")
    return replace(CorrFillConfig(), **{**PRESETS[preset].settings, **PROFILE_SETTINGS[profile], **overrides})

"""HarmonPaint's options, with the paper's values as defaults (arXiv:2507.16732; §V-A and the ablations).

The paper leaves several details open; each is an option here with a documented default:

* ``sams_layers``: "layers 2-6" read as 0-based self-attention layers in execution order (MasaCtrl's convention):
  ``down_blocks.1``, ``down_blocks.2`` and the mid block; the 1-based reading is ``(1, 2, 3, 4, 5)``.
* ``makvs_layers``: "the final 8 layers" = self-attention layers 8-15.
* ``division_eta``: the Efficient Division Strategy's eta (0.6): timesteps ``t >= eta * T`` are the structure phase
  (SAMS, steer loss), the others the style phase (MAKVS); exclusive unless ``sams_all_steps`` / ``makvs_all_steps``.
* ``lam``: 1.4 for stylised images, 0.8 for natural ones (the ``natural`` preset); 0 switches MAKVS off.
* The steer loss's update rule, step size, iterations, token set and whether SAMS acts during its gradient pass are
  not given; the defaults follow the Attend-and-Excite / Predicated-Diffusion code the loss comes from: one step
  ``z <- z - a_i grad`` per structure step with ``a_i = 20 sqrt(linspace(1, 0.5, steps)[i])``, all prompt tokens,
  maps at latent/4 and latent/2 (the paper's "resolutions 16 and 32" at 512 px: levels 2 and 1), SAMS on.
* ``mask_resize``: how the hole mask reaches each token grid (not stated): area fraction >= 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from asuka.errors import InputError
from asuka.pipelines.harmonpaint.makvs import MAKVS_MODES
from asuka.pipelines.harmonpaint.masks import MASK_RESIZE_MODES
from asuka.pipelines.harmonpaint.sams import SAMS_VARIANTS
from asuka.pipelines.harmonpaint.steer import STEER_NORMALIZE

SELF_ATTENTION_LAYERS = 16  # SD-1.x / SD-2.x U-Nets


@dataclass(frozen=True)
class HarmonPaintConfig:
    """Every HarmonPaint switch and hyperparameter; see the module docstring for the sources."""

    use_sams: bool = True
    use_steer: bool = True
    use_makvs: bool = True
    tau: float = 0.1
    lam: float = 1.4
    division_eta: float = 0.6
    sams_layers: tuple[int, ...] = (2, 3, 4, 5, 6)
    makvs_layers: tuple[int, ...] = tuple(range(8, 16))
    sams_variant: str = "obj_bg"
    makvs_mode: str = "concat"
    mask_resize: str = "area"
    sams_all_steps: bool = False
    makvs_all_steps: bool = False
    steer_step_size: float = 20.0
    steer_iterations: int = 1
    steer_levels: tuple[int, ...] = (1, 2)
    steer_token_indices: tuple[int, ...] | None = None
    steer_normalize: str = "none"
    steer_with_sams: bool = True
    diagnostics_dir: str | Path | None = None
    diagnostics_steps: tuple[int, ...] | None = None
    diagnostics_layers: tuple[int, ...] = (4,)

    def __post_init__(self):
        for name in ("sams_layers", "makvs_layers", "steer_levels", "steer_token_indices", "diagnostics_steps",
                     "diagnostics_layers"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, int):
                    value = (value,)
                object.__setattr__(self, name, tuple(int(v) for v in value))
        _check_range("tau", self.tau, 0.0, 1.0)
        _check_range("lam", self.lam, 0.0, None)
        _check_range("division_eta", self.division_eta, 0.0, 1.0)
        _check_range("steer_step_size", self.steer_step_size, 0.0, None)
        if self.steer_iterations < 1:
            raise InputError(f"must be >= 1, got {self.steer_iterations}", "options.steer_iterations")
        for name, allowed in (("sams_variant", SAMS_VARIANTS), ("makvs_mode", MAKVS_MODES),
                              ("mask_resize", MASK_RESIZE_MODES), ("steer_normalize", STEER_NORMALIZE)):
            if getattr(self, name) not in allowed:
                raise InputError(f"must be one of {list(allowed)}, got {getattr(self, name)!r}", f"options.{name}")
        for name in ("sams_layers", "makvs_layers", "diagnostics_layers"):
            bad = [i for i in getattr(self, name) if not -SELF_ATTENTION_LAYERS <= i < SELF_ATTENTION_LAYERS]
            if bad:
                raise InputError(f"self-attention layer indices are 0-15 (execution order), got {bad}",
                                 f"options.{name}")
        bad = [level for level in self.steer_levels if not 0 <= level <= 2]
        if bad:
            raise InputError(f"cross-attention levels are 0 (latent), 1 (latent/2) or 2 (latent/4), got {bad}",
                             "options.steer_levels")

    @classmethod
    def from_options(cls, **options) -> "HarmonPaintConfig":
        """Build from keyword options; an unknown name is an :class:`InputError` naming the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise InputError(f"unknown HarmonPaint option(s) {unknown}; known: {sorted(known)}", "options")
        return cls(**options)


def _check_range(name: str, value: float, low: float, high: float | None) -> None:
    if value < low or (high is not None and value > high):
        rule = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise InputError(f"must be {rule}, got {value}", f"options.{name}")

"""Named evaluation protocols: every metric convention of one paper's tables, set at once.

A protocol fixes the metric list and each convention that changes the numbers — Inception backbone and its
preprocessing, PCA before the IDS SVM, SSIM on gray or RGB, the LPIPS backbone, Grad's score for a mask without an
edge — so that ``asuka evaluate --protocol asuka`` reproduces the columns of ASUKA's Table 1 with the released weights
and MISATO, and ``metrics.json`` names the protocol it used. Options set explicitly must agree with the protocol
(a conflict is an error, not a silent override). Conventions every protocol shares: metrics on the composite
(mask >= 0.5, known pixels from the ground truth), PSNR on [0, 1] with a 1e-7 floor on the MSE, KID subsets of
1,000 images clamped to the set size.

Torch-free: the CLI reads it while parsing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from asuka.errors import InputError

RESOLUTION = "resolution"  # a setting resolved to the evaluation resolution (ASUKA's PCA dimension)


@dataclass(frozen=True)
class Protocol:
    """A named set of :class:`asuka.evaluation.scoring.MetricConfig` settings and where they come from."""

    name: str
    description: str
    source: str
    settings: Mapping[str, Any] = field(default_factory=dict)


PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (
    Protocol("default", "asuka's defaults: TF-Inception FID/KID/IDS comparable with torch-fidelity, gray SSIM, "
                        "LPIPS-alex, Grad undefined (NaN) without a mask edge", "this package"),
    Protocol("asuka", "ASUKA's Table 1: torchvision Inception on 8-bit PIL images, U-/P-IDS after PCA to the "
                      "resolution (512 or 1024), gray SSIM, LPIPS-alex, Grad 0 without a mask edge",
             "ASUKA eval/cal_ids.py, cal_psnr_lpips_ssim.py, cal_grad.py (official repository)",
             {"metrics": ("psnr", "ssim", "lpips", "fid", "ids", "grad"), "lpips_net": "alex",
              "inception_variant": "torchvision", "inception_resize": "pil", "ids_pca_dim": RESOLUTION,
              "ssim_gray": True, "grad_empty_edge": "zero"}),
    Protocol("comod", "Co-Mod-GAN's FID, P-IDS and U-IDS: TF-Inception, linear SVM on the raw 2048-d features",
             "Co-Mod-GAN metrics/inception_discriminative_score.py (official repository)",
             {"metrics": ("fid", "ids"), "inception_variant": "fidelity", "inception_resize": "tensor",
              "ids_pca_dim": None}),
    Protocol("lama", "LaMa's evaluator: SSIM on RGB, LPIPS-vgg, TF-Inception FID",
             "LaMa saicinpainting/evaluation (official repository)",
             {"metrics": ("ssim", "lpips", "fid"), "lpips_net": "vgg", "ssim_gray": False,
              "inception_variant": "fidelity", "inception_resize": "tensor"}),
)}


def protocol_settings(name: str, *, resolution: int, explicit: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``MetricConfig`` keyword arguments of protocol ``name`` merged with the ``explicit`` ones (those a user
    set; ``None`` values count as unset). An explicit value that contradicts the protocol is an error naming it."""
    if name not in PROTOCOLS:
        raise InputError(f"unknown protocol {name!r}; choose from {', '.join(PROTOCOLS)}", "protocol")
    settings = {key: resolution if value == RESOLUTION else value for key, value in PROTOCOLS[name].settings.items()}
    given = {key: value for key, value in (explicit or {}).items() if value is not None}
    for key, value in given.items():
        wanted = settings.get(key, value)
        if key == "metrics":  # a subset of the protocol's metrics keeps its conventions
            if not set(value) <= set(wanted):
                raise InputError(f"protocol {name!r} computes {', '.join(wanted)}; {sorted(set(value) - set(wanted))} "
                                 f"are not part of it", key)
        elif value != wanted:
            raise InputError(f"protocol {name!r} sets it to {wanted!r}, not {value!r}; drop the option or choose "
                             f"another protocol", key)
    return {**settings, **given, "protocol": name}


__all__ = ["PROTOCOLS", "Protocol", "protocol_settings"]

"""FID and KID from Inception features, computed by torch-fidelity's own functions.

FID (Heusel et al. 2017): ``|mu_r - mu_f|² + Tr(S_r + S_f - 2 (S_r S_f)^½)`` with mean and covariance in
float64 (torch-fidelity would keep float32 features in float32). KID (Bińkowski et al. 2018): unbiased
MMD² with the cubic polynomial kernel, mean and std over ``subsets`` random subsets of ``subset_size``
(torch-fidelity defaults 100 × 1000, seed 2020); the subset size is clamped to the number of samples so
small sets still get a value — the report records the size used.
"""

from __future__ import annotations

import torch
import numpy as np
from torch_fidelity.metric_fid import fid_statistics_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric


def _features(x: torch.Tensor, name: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"{name} must be (N, D) features with N >= 2, got shape {tuple(x.shape)}.")
    return x.detach().cpu().double()


def gaussian_statistics(features: torch.Tensor) -> dict[str, np.ndarray]:
    """Mean and unbiased covariance (float64, covariance at least 2-D) of (N, D) features."""
    x = _features(features, "features").numpy()
    return {"mu": x.mean(axis=0), "sigma": np.atleast_2d(np.cov(x, rowvar=False))}


def fid_from_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted (in float64) to two feature sets (N, D)."""
    r, f = _features(real, "real"), _features(fake, "fake")
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"real and fake features differ in width: {r.shape[1]} vs {f.shape[1]}.")
    out = fid_statistics_to_metric(gaussian_statistics(r), gaussian_statistics(f), verbose=False)
    return float(out["frechet_inception_distance"])


def kid_from_features(real: torch.Tensor, fake: torch.Tensor, *, subsets: int = 100, subset_size: int = 1000,
                      seed: int = 2020) -> dict[str, float]:
    """KID mean/std (torch-fidelity's estimator); returns ``{"kid_mean", "kid_std", "kid_subset_size"}``."""
    r, f = _features(real, "real"), _features(fake, "fake")
    size = min(subset_size, r.shape[0], f.shape[0])
    out = kid_features_to_metric(r, f, kid_subsets=subsets, kid_subset_size=size, rng_seed=seed, verbose=False,
                                 kid_kernel="poly", kid_degree=3, kid_gamma=None, kid_coef0=1)
    return {"kid_mean": float(out["kernel_inception_distance_mean"]),
            "kid_std": float(out["kernel_inception_distance_std"]), "kid_subset_size": size}

"""Inpainting metrics: LPIPS, FID/KID, U-/P-IDS, PSNR/SSIM (whole image and region), Grad, CLIP score.

Per-image metrics take images (B,3,H,W) in [-1, 1] and return (B,) tensors; set-level metrics take
Inception features (N, 2048). Backbones never download unless ``allow_download=True`` is passed.
"""

from .clip_score import CLIPScore, save_tiny_clip
from .fid import fid_from_features, kid_from_features
from .grad import boundary_gradient
from .ids import ids_min_pairs, inception_discriminative_scores
from .inception import InceptionFeatures, save_random_inception_weights
from .lpips import LPIPS
from .pixel import mse, psnr, ssim
from .weights import MissingWeightsError

__all__ = [
    "CLIPScore", "InceptionFeatures", "LPIPS", "MissingWeightsError", "boundary_gradient", "fid_from_features",
    "ids_min_pairs", "inception_discriminative_scores", "kid_from_features", "mse", "psnr", "save_random_inception_weights",
    "save_tiny_clip", "ssim",
]

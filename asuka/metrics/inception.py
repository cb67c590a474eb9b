"""Inception-v3 pool features (2048-d) for FID, KID and U-/P-IDS, with explicit weights.

Two variants:

* ``"fidelity"`` (default): torch-fidelity's ``FeatureExtractorInceptionV3`` — the TF "2015-12-05" graph
  ported to PyTorch with TF1-compatible bilinear resizing to 299², fed uint8 images. Its numbers match
  torch-fidelity / pytorch-fid / torchmetrics(``antialias=False``) FID, i.e. LaMa, MAT, Co-Mod-GAN.
  Weights: ``weights-inception-2015-12-05-6726825d.pth`` from the torch-fidelity v0.2.0 GitHub release.
* ``"torchvision"``: torchvision ``inception_v3`` (ImageNet ``IMAGENET1K_V1``, ``fc = Identity``) with
  its own preprocessing (resize 342, centre crop 299, ImageNet normalisation), as ASUKA's
  ``eval/cal_ids.py`` (official repository) does. ``resize="pil"`` applies that preprocessing to 8-bit PIL
  images, as ASUKA's script loads them (its numbers); ``resize="tensor"`` (default) runs it batched on float
  tensors on the device — 0.09–0.35 % different features. Its FID values are *not* comparable with the
  standard tools; use it only to reproduce ASUKA's tables. Weights: ``inception_v3_google-0cc3c7bd.pth``.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from asuka.models.checkpoint import read_checkpoint
from asuka.tensors import to_uint8

from .weights import WeightSource, reading_weights, resolve_weights

FIDELITY_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                "weights-inception-2015-12-05-6726825d.pth")
TORCHVISION_URL = "https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth"
VARIANTS = {
    "fidelity": WeightSource("FID/KID/IDS Inception-v3 (torch-fidelity, TF 2015-12-05)", "inception_weights",
                             FIDELITY_URL),
    "torchvision": WeightSource("FID/KID/IDS Inception-v3 (torchvision IMAGENET1K_V1, ASUKA cal_ids.py)",
                                "inception_weights", TORCHVISION_URL),
}
FEATURE_DIM = 2048


def _torchvision_inception(weights: Path | None) -> nn.Module:
    import torchvision.models as tvm

    if weights is None:  # explicit --allow-download
        model = tvm.inception_v3(weights=tvm.Inception_V3_Weights.IMAGENET1K_V1)
    else:  # the IMAGENET1K_V1 builder sets transform_input=True; keep it for identical features
        model = tvm.inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=False)
        model.load_state_dict(read_checkpoint(weights, key="state_dict"), strict=True)
    model.fc = nn.Identity()
    return model


class InceptionFeatures(nn.Module):
    """``forward(images) -> (B, 2048)`` float32 pool features for images (B,3,H,W) in [-1, 1]."""

    def __init__(self, weights: str | Path | None = None, *, variant: str = "fidelity",
                 allow_download: bool = False, resize: str = "tensor") -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}.")
        if resize not in ("tensor", "pil"):
            raise ValueError(f"resize must be 'tensor' or 'pil', got {resize!r}.")
        self.resize = resize
        path = resolve_weights(weights, VARIANTS[variant], allow_download=allow_download)
        self.variant = variant
        if variant == "fidelity":
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

            with tempfile.TemporaryDirectory(prefix="asuka-inception-") as tmp:
                local = None
                if path is not None:
                    # torch-fidelity unpickles its file with weights_only=False: it only ever gets a copy that we
                    # wrote from the tensors read with weights_only=True (no check-then-load race on the user's file)
                    local = str(Path(tmp) / "inception.pth")
                    with reading_weights("inception_weights"):
                        torch.save(read_checkpoint(path, key="state_dict"), local)
                with warnings.catch_warnings(), reading_weights("inception_weights"):
                    warnings.simplefilter("ignore")
                    try:
                        self.model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                                 feature_extractor_weights_path=local)
                    except RuntimeError as error:  # load_state_dict: missing / unexpected / mis-shaped tensors
                        raise ValueError(f"{str(path)!r} does not fit the torch-fidelity Inception-v3: "
                                         f"{str(error).splitlines()[-1].strip()}") from error
        else:
            from torchvision.models import Inception_V3_Weights

            with reading_weights("inception_weights"):
                self.model = _torchvision_inception(path)
            self.preprocess = Inception_V3_Weights.IMAGENET1K_V1.transforms()
        self.requires_grad_(False).eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B,3,H,W) in [-1,1], got shape {tuple(images.shape)}.")
        if self.variant == "fidelity":
            return self.model(to_uint8(images))[0]
        if self.resize == "pil":
            from PIL import Image

            pixels = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()
            batch = torch.stack([self.preprocess(Image.fromarray(p)) for p in pixels]).to(images.device)
        else:
            batch = self.preprocess(((images.float() + 1.0) / 2.0).clamp(0.0, 1.0))
        return self.model(batch).float()


def save_random_inception_weights(path: str | Path, *, variant: str = "fidelity", seed: int = 0) -> Path:
    """Write randomly initialised Inception-v3 weights in ``variant``'s layout (tests and benchmarks only)."""
    import torchvision.models as tvm

    from asuka.models.seeding import seeded

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}.")
    with seeded(seed):
        if variant == "fidelity":  # torch-fidelity's module names equal torchvision's; its fc has 1008 classes
            model = tvm.inception_v3(weights=None, aux_logits=False, init_weights=True, num_classes=1008)
        else:
            model = tvm.inception_v3(weights=None, aux_logits=True, init_weights=True)
        # calibrate the batch-norm statistics on random inputs so features stay O(1) instead of exploding
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = None
        aux, model.AuxLogits = model.AuxLogits, None  # the aux head (unused for features) needs 299² inputs
        model.train()
        with torch.no_grad():
            model(torch.rand(2, 3, 160, 160) * 2 - 1)
        model.AuxLogits = aux
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path

"""LPIPS (Zhang et al. 2018) through the reference ``lpips`` package, with explicit backbone weights.

The linear heads (``lpips/weights/v0.1/{alex,vgg,squeeze}.pth``) ship inside the ``lpips`` wheel; the
ImageNet backbone is a torchvision model that ``lpips`` would download. Here it is loaded from
``backbone_weights`` (a torchvision state dict, e.g. ``alexnet-owt-7be5be79.pth``) or downloaded only with
``allow_download=True``. Backbones: ``alex`` (default; ASUKA ``cal_psnr_lpips_ssim.py`` and MAT), ``vgg``
(LaMa), ``squeeze`` (BrushNet) — always report the backbone with the number (:attr:`LPIPS.name`).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from asuka.models.checkpoint import read_checkpoint

from .weights import WeightSource, reading_weights, resolve_weights

BACKBONES = {
    # lpips name: (torchvision builder, torchvision weights enum name, file name of the torchvision release)
    "alex": ("alexnet", "AlexNet_Weights", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
    "vgg": ("vgg16", "VGG16_Weights", "https://download.pytorch.org/models/vgg16-397923af.pth"),
    "squeeze": ("squeezenet1_1", "SqueezeNet1_1_Weights",
                "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth"),
}


def _source(net: str) -> WeightSource:
    return WeightSource(f"LPIPS-{net} (torchvision {BACKBONES[net][0]} ImageNet backbone)", "lpips_weights",
                        BACKBONES[net][2])


def _backbone_state(net: str, weights: Path | None) -> dict[str, torch.Tensor]:
    """The torchvision ``features.*`` tensors of the backbone (downloaded only when ``weights`` is None)."""
    if weights is None:  # explicit --allow-download
        import torchvision.models as tvm

        builder, enum_name, _ = BACKBONES[net]
        return getattr(tvm, builder)(weights=getattr(tvm, enum_name).IMAGENET1K_V1).state_dict()
    return read_checkpoint(weights, key="state_dict")


def _load_slices(slices: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``features.<i>.*`` into lpips' slices, whose children keep torchvision's layer index ``<i>``."""
    for block in slices.children():
        for idx, layer in block.named_children():
            expected = layer.state_dict().keys()
            if not expected:
                continue
            missing = [f"features.{idx}.{k}" for k in expected if f"features.{idx}.{k}" not in state]
            if missing:
                raise KeyError(f"{source} is not a torchvision {slices.__class__.__name__} state dict: "
                               f"missing {missing}.")
            layer.load_state_dict({k: state[f"features.{idx}.{k}"] for k in expected})


def _load_heads(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load LPIPS' linear heads (``lin<i>.model.1.weight``) strictly: every key present with the right shape, and
    nothing else in the file."""
    expected = {k: v.shape for k, v in model.state_dict().items()  # lins.<i> aliases lin<i>
                if k.startswith("lin") and not k.startswith("lins.")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k]))
    if missing or unexpected or wrong:
        raise ValueError(f"linear_weights {source!r} are not LPIPS v0.1 heads for this backbone: missing {missing}, "
                         f"unexpected {unexpected}, wrong shape {wrong}.")
    model.load_state_dict(state, strict=False)


class LPIPS(nn.Module):
    """Per-image LPIPS distance for images in [-1, 1]; ``forward(pred, target) -> (B,)``."""

    def __init__(self, net: str = "alex", backbone_weights: str | Path | None = None, *,
                 linear_weights: str | Path | None = None, allow_download: bool = False) -> None:
        super().__init__()
        if net not in BACKBONES:
            raise ValueError(f"net must be one of {sorted(BACKBONES)}, got {net!r}.")
        path = resolve_weights(backbone_weights, _source(net), allow_download=allow_download)
        import lpips as lpips_lib

        if linear_weights is not None and not Path(linear_weights).is_file():
            raise FileNotFoundError(f"linear_weights: no such file {str(linear_weights)!r} (LPIPS v0.1 heads).")
        self.net_name = net
        # pnet_rand=True: build the backbone without torchvision's download; pretrained=False: lpips would read its
        # heads with torch.load under torch's default for weights_only and load them with strict=False. The heads
        # (bundled or given) are read with weights_only=True and loaded strictly by _load_heads.
        with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=False`
            warnings.simplefilter("ignore", UserWarning)
            self.model = lpips_lib.LPIPS(pretrained=False, net=net, pnet_rand=True, verbose=False)
        heads = Path(lpips_lib.__file__).parent / "weights" / "v0.1" / f"{net}.pth" if linear_weights is None \
            else Path(linear_weights)
        with reading_weights("linear_weights"):
            _load_heads(self.model, read_checkpoint(heads), str(heads))
        with reading_weights("lpips_weights"):
            _load_slices(self.model.net, _backbone_state(net, path), repr(str(path)))
        self.requires_grad_(False).eval()

    @property
    def name(self) -> str:
        """Metric name including the backbone, e.g. ``lpips_alex``."""
        return f"lpips_{self.net_name}"

    @torch.no_grad()
    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.shape != target.shape or pred.ndim != 4 or pred.shape[1] != 3:
            raise ValueError(f"pred and target must both be (B,3,H,W) in [-1,1], got {tuple(pred.shape)} "
                             f"and {tuple(target.shape)}.")
        return self.model(pred.float(), target.float()).flatten()

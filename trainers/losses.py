"""Loss pieces of the decoder stage: LDM's ``LPIPSWithDiscriminator`` recipe, split into pure functions.

Asymmetric VQGAN (buxiangzhiren/Asymmetric_VQGAN ``ldm/modules/losses``), which ASUKA follows (its authors' answer in Yikai-Wang/asuka-misato issue #16):

* reconstruction ``rec = |x - x̂| + perceptual_weight · LPIPS(x, x̂)`` per pixel; ``nll = Σ rec / B`` (LDM sums over
  pixels and averages over the batch; its learned ``logvar`` sits in no optimizer and stays 0, so it is omitted);
* ``kl = Σ KL(q(z|x) ‖ N(0, I)) / B`` with weight 1e-6 (with a frozen encoder it carries no gradient; it is logged);
* generator adversarial term ``g = -mean(D(x̂))`` weighted by the adaptive weight
  ``λ = ‖∇_L nll‖ / (‖∇_L g‖ + 1e-4)`` clamped to [0, 1e4], times ``disc_weight`` (0.8), with ``L`` the last
  decoder layer (``decoder.conv_out.weight``; Esser et al., taming-transformers Eq. 7);
* discriminator hinge loss ``½ (mean(relu(1 - D(x))) + mean(relu(1 + D(x̂))))``;
* ``NLayerDiscriminator``: pix2pix PatchGAN (3 layers, 64 filters, BatchNorm, LeakyReLU 0.2), initialised
  N(0, 0.02) for convs and N(1, 0.02) for BatchNorm scales, as in taming/LDM.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["NLayerDiscriminator", "PerceptualLoss", "adaptive_weight", "hinge_d_loss", "kl_loss", "nll_loss"]


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix; taming ``NLayerDiscriminator`` with ``use_actnorm=False``)."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        if n_layers < 1 or ndf < 1:
            raise ValueError(f"n_layers and ndf must be >= 1, got n_layers={n_layers}, ndf={ndf}")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False), nn.BatchNorm2d(ndf * mult),
                       nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


class PerceptualLoss(nn.Module):
    """Differentiable LPIPS (``lpips`` package) with a frozen backbone loaded from a local file; (B,1,1,1) output.

    ``backbone_weights``: a torchvision state dict of the backbone (``vgg16-397923af.pth`` for ``net="vgg"``, LDM's
    choice). ``linear_weights``: LPIPS v0.1 heads (default: the copy shipped inside the ``lpips`` wheel).
    ``random_backbone=True`` keeps a randomly initialised backbone (tests and CPU demos only; nothing downloads).
    """

    def __init__(self, net: str = "vgg", backbone_weights: str | Path | None = None,
                 linear_weights: str | Path | None = None, random_backbone: bool = False) -> None:
        super().__init__()
        if random_backbone:
            import lpips

            if linear_weights is not None and not Path(linear_weights).is_file():
                raise FileNotFoundError(f"linear_weights: no such file {str(linear_weights)!r}")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                self.model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False,
                                         model_path=None if linear_weights is None else str(linear_weights))
        else:
            from asuka.metrics.lpips import LPIPS

            self.model = LPIPS(net, backbone_weights, linear_weights=linear_weights).model
        self.model.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "PerceptualLoss":
        return super().train(False)  # always eval: LPIPS has dropout in its heads

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.model(pred.float(), target.float())


def nll_loss(pred: torch.Tensor, target: torch.Tensor, perceptual: torch.Tensor | None,
             perceptual_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(nll, l1, lpips)``: LDM's ``Σ(|x-x̂| + w·LPIPS)/B`` plus the batch means of its two parts (for logging)."""
    l1 = (target.float() - pred.float()).abs()
    rec = l1 if perceptual is None else l1 + perceptual_weight * perceptual
    lpips_mean = perceptual.mean() if perceptual is not None else torch.zeros((), device=pred.device)
    return rec.sum() / pred.shape[0], l1.mean(), lpips_mean


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``Σ KL(N(mean, exp(logvar)) ‖ N(0, I)) / B`` (LDM's ``DiagonalGaussianDistribution.kl`` summed, batch mean).

    ``logvar`` is clamped to [-30, 20] as diffusers' and LDM's distributions do.
    """
    logvar = logvar.float().clamp(-30.0, 20.0)
    mean = mean.float()
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum() / mean.shape[0]


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """``½ (mean(relu(1 - D(x))) + mean(relu(1 + D(x̂))))``."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    disc_weight: float = 0.8, max_weight: float = 1e4) -> torch.Tensor:
    """``disc_weight · clamp(‖∇_L nll‖ / (‖∇_L g‖ + 1e-4), 0, 1e4)``, detached (taming Eq. 7)."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = nll_grad.norm() / (g_grad.norm() + 1e-4)
    return (weight.clamp(0.0, max_weight) * disc_weight).detach()

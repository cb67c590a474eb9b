"""Decoder stage: losses against hand formulas, ColorJitter against torchvision, the training step, export."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from lightning.pytorch import Trainer

from trainers.color_augment import OPS, color_jitter, sample_params
from trainers.decoder import DecoderModule
from trainers.losses import NLayerDiscriminator, PerceptualLoss, adaptive_weight, hinge_d_loss, kl_loss, nll_loss

SIZE = 32


# ---------------------------------------------------------------------------------------------- color jitter
def test_color_jitter_matches_torchvision_per_sample():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(6, 3, 16, 16, generator=g) * 2 - 1
    params = sample_params(6, brightness=0.15, contrast=0.2, saturation=0.1, hue=0.03, generator=g)
    out = color_jitter(image, params)
    ops = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast,
           "saturation": TF.adjust_saturation, "hue": TF.adjust_hue}
    for i in range(6):
        x = (image[i] + 1) / 2
        for k in params.order[i].tolist():
            x = ops[OPS[k]](x, float(getattr(params, OPS[k])[i]))
        torch.testing.assert_close(out[i], x * 2 - 1, atol=1e-5, rtol=0)
    assert len({tuple(o) for o in params.order.tolist()}) > 1  # orders differ between samples
    assert params.brightness.unique().numel() == 6
    assert 0.85 <= params.brightness.min() and params.brightness.max() <= 1.15
    assert 0.8 <= params.contrast.min() and params.contrast.max() <= 1.2
    assert 0.9 <= params.saturation.min() and params.saturation.max() <= 1.1
    assert params.hue.abs().max() <= 0.03


def test_color_jitter_seeded_and_validated():
    def draw(seed):
        return sample_params(3, brightness=0.15, contrast=0.2, saturation=0.1, hue=0.03,
                             generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(1).order, draw(1).order) and torch.equal(draw(1).hue, draw(1).hue)
    with pytest.raises(ValueError, match="hue"):
        sample_params(1, brightness=0, contrast=0, saturation=0, hue=0.7)
    with pytest.raises(ValueError, match="image must be"):
        color_jitter(torch.zeros(1, 1, 4, 4), draw(0))


# ---------------------------------------------------------------------------------------------- losses
def test_loss_formulas_match_hand_computation():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 3, 8, 8, generator=g), torch.rand(2, 3, 8, 8, generator=g)
    p = torch.tensor([0.5, 0.25]).view(2, 1, 1, 1)
    nll, l1, lp = nll_loss(x, y, p, perceptual_weight=2.0)
    hand = sum((x[b] - y[b]).abs().sum() + 2.0 * p[b].item() * 3 * 64 for b in range(2)) / 2
    torch.testing.assert_close(nll, hand)
    torch.testing.assert_close(l1, (x - y).abs().mean())
    torch.testing.assert_close(lp, p.mean())

    mean, logvar = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    posterior = DiagonalGaussianDistribution(torch.cat([mean, logvar], 1))
    torch.testing.assert_close(kl_loss(mean, logvar), posterior.kl().sum() / 2)

    real, fake = torch.tensor([0.5, 2.0, -1.0]), torch.tensor([-2.0, 0.0, 0.5])
    expected = 0.5 * ((0.5 + 0 + 2.0) / 3 + (0 + 1.0 + 1.5) / 3)
    assert math.isclose(float(hinge_d_loss(real, fake)), expected, rel_tol=1e-6)


def test_adaptive_weight_is_gradient_norm_ratio():
    last = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    nll = (3 * last).sum()  # gradient (3, 3): norm 3√2
    g = (last ** 2).sum()  # gradient (2, 4): norm √20
    weight = adaptive_weight(nll, g, last, disc_weight=0.8)
    assert math.isclose(float(weight), 0.8 * 3 * math.sqrt(2) / (math.sqrt(20) + 1e-4), rel_tol=1e-6)
    assert not weight.requires_grad
    huge = adaptive_weight(nll, 0 * g, last, disc_weight=1.0)
    assert float(huge) == 1e4  # clamped


def test_patchgan_layout_and_init():
    d = NLayerDiscriminator()
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in d.modules()) == 3
    assert d(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 30, 30)  # pix2pix 70x70 PatchGAN
    assert abs(float(convs[1].weight.detach().std()) - 0.02) < 0.002


def test_perceptual_loss_is_differentiable_and_frozen():
    loss = PerceptualLoss("alex", random_backbone=True)
    x = torch.rand(2, 3, SIZE, SIZE, requires_grad=True)
    value = loss(x, torch.rand(2, 3, SIZE, SIZE))
    assert value.shape == (2, 1, 1, 1)
    value.sum().backward()
    assert x.grad.abs().sum() > 0 and not any(p.requires_grad for p in loss.parameters())
    assert not loss.train().training  # stays in eval mode (dropout in the heads)
    with pytest.raises(Exception, match="lpips"):
        PerceptualLoss("alex")  # no local backbone file and no random backbone: a clear error, no download


# ---------------------------------------------------------------------------------------------- module
def _module(tiny_inpaint_dir, **overrides) -> DecoderModule:
    args = dict(vae=str(tiny_inpaint_dir), perceptual_net="alex", lpips_random_backbone=True, disc_channels=8,
                lr=1e-3)
    args.update(overrides)
    module = DecoderModule(**args)
    module.load_pretrained()
    return module


def _batches(n: int, nan_at: int | None = None):
    g = torch.Generator().manual_seed(0)
    batches = []
    for i in range(n):
        image = torch.rand(2, 3, SIZE, SIZE, generator=g) * 2 - 1
        if i == nan_at:
            image[0, 0, 0, 0] = float("nan")
        mask = torch.zeros(2, 1, SIZE, SIZE)
        mask[:, :, 8:20, 4:24] = 1
        batches.append({"image": image, "mask": mask, "masked_image": image * (1 - mask), "key": ["a", "b"],
                        "aug_image": image.flip(-1), "aug_image_present": torch.tensor([True, False])})
    return batches


def _fit(module: DecoderModule, batches: list, tmp_path) -> Trainer:
    trainer = Trainer(max_steps=2 * len(batches), accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return trainer


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_prepare_latent_aug_color_and_full_hole(tiny_inpaint_dir):
    module = _module(tiny_inpaint_dir, latent_aug_prob=1.0, color_jitter=None, full_hole_prob=0.0)
    batch = _batches(1)[0]
    inputs = module.prepare(batch, torch.Generator().manual_seed(0))
    assert torch.equal(inputs["encoder_input"][0], batch["aug_image"][0])  # present: the augmented copy
    assert torch.equal(inputs["encoder_input"][1], batch["image"][1])  # absent: its own image
    module = _module(tiny_inpaint_dir, latent_aug_prob=0.0, full_hole_prob=1.0)
    inputs = module.prepare(batch, torch.Generator().manual_seed(0))
    assert torch.all(inputs["mask"] == 1)
    assert not torch.equal(inputs["encoder_input"], batch["image"])  # jittered
    assert torch.equal(inputs["image"], batch["image"])  # condition and target stay un-augmented
    with pytest.raises(ValueError, match="full_hole_prob"):
        _module(tiny_inpaint_dir, full_hole_prob=1.5)


@pytest.mark.slow
def test_training_updates_only_decoder_and_discriminator_after_start(tiny_inpaint_dir, tmp_path):
    module = _module(tiny_inpaint_dir, disc_start=2)
    encoder, decoder, disc = _snapshot(module.model.encoder), _snapshot(module.model.decoder), _snapshot(
        module.discriminator)
    quant, post = _snapshot(module.model.quant_conv), _snapshot(module.model.post_quant_conv)
    trainer = _fit(module, _batches(2), tmp_path)  # iterations 0, 1: before disc_start
    assert trainer.global_step == 4  # two optimiser steps per iteration
    assert all(torch.equal(v, module.model.encoder.state_dict()[k]) for k, v in encoder.items())
    assert all(torch.equal(v, module.model.quant_conv.state_dict()[k]) for k, v in quant.items())
    assert all(torch.equal(v, module.model.post_quant_conv.state_dict()[k]) for k, v in post.items())
    assert any(not torch.equal(v, module.model.decoder.state_dict()[k]) for k, v in decoder.items())
    assert all(torch.equal(v, module.discriminator.state_dict()[k]) for k, v in disc.items() if "running" not in k
               and "num_batches" not in k)
    module = _module(tiny_inpaint_dir, disc_start=0)
    disc = _snapshot(module.discriminator)
    _fit(module, _batches(1), tmp_path)
    assert not torch.equal(disc["main.0.weight"], module.discriminator.main[0].weight)
    keys = module.state_dict().keys()  # frozen parts stay out of checkpoints
    assert not any(k.startswith(("model.encoder.", "model.quant_conv.", "model.post_quant_conv.", "perceptual.",
                                 "plain_")) for k in keys)
    assert any(k.startswith("model.decoder.condition_encoder.") for k in keys)


def test_nonfinite_step_skips_both_optimizers(tiny_inpaint_dir, tmp_path):
    module = _module(tiny_inpaint_dir, disc_start=0, full_hole_prob=0.0, latent_aug_prob=0.0)
    decoder, disc = _snapshot(module.model.decoder), _snapshot(module.discriminator)
    _fit(module, _batches(1, nan_at=0), tmp_path)
    assert all(torch.equal(v, module.model.decoder.state_dict()[k]) for k, v in decoder.items())
    assert all(torch.equal(v, module.discriminator.state_dict()[k]) for k, v in disc.items()
               if "running" not in k and "num_batches" not in k)
    assert int(module._nonfinite_total) == 1


@pytest.mark.slow
def test_fit_export_and_drop_in_pipeline(tiny_inpaint_dir, tmp_path, monkeypatch):
    """``python -m trainers.fit`` on the tiny config, export, and use as ``vae=`` in diffusers' pipeline."""
    from pathlib import Path

    from diffusers import StableDiffusionInpaintPipeline
    from PIL import Image

    from asuka.models.decoder import HarmonizingDecoderKL
    from trainers.export import export_checkpoint
    from trainers.fit import main

    config = Path(__file__).resolve().parent.parent / "configs" / "tiny" / "decoder.yaml"
    monkeypatch.chdir(tmp_path)
    main(["--config", str(config), "--data.init_args.train_shards", "null", "--data.init_args.val_shards", "null",
          "--model.init_args.vae", str(tiny_inpaint_dir), "--trainer.max_steps", "4", "--trainer.val_check_interval",
          "2", "--model.init_args.disc_start", "1", "--data.init_args.resolution", "32"])
    ckpt = tmp_path / "checkpoints" / "tiny-decoder" / "ckpt" / "last.ckpt"
    out = export_checkpoint(ckpt, tmp_path / "exported")
    decoder = HarmonizingDecoderKL.from_pretrained(out)
    pipe = StableDiffusionInpaintPipeline.from_pretrained(tiny_inpaint_dir, vae=decoder, safety_checker=None,
                                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3)).astype(np.uint8)
    hole = np.zeros((64, 64), np.uint8)
    hole[16:48, 16:48] = 255
    result = pipe("x", image=Image.fromarray(rgb), mask_image=Image.fromarray(hole), height=64, width=64,
                  num_inference_steps=2, guidance_scale=1.0, output_type="np").images
    assert result.shape == (1, 64, 64, 3) and np.isfinite(result).all()

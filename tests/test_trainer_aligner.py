"""Aligner training: p schedule, reconstructed-prior swap, the ε-loss against a hand-built reference, gradients through
the frozen (checkpointed) UNet, and a few real training steps with checkpoints and export."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from asuka.models.aligner import PriorAligner
from trainers.aligner import AlignerModule
from trainers.alignment import reconstructed_prior_probability, swap_to_reconstructed
from trainers.export import export_checkpoint
from trainer_support import PhotoDataModule

TINY_ALIGNER = dict(in_dim=32, cross_attention_dim=32, head_dim=16, num_blocks=2)


def _module(mae_dir, sd_dir, **kwargs) -> AlignerModule:
    module = AlignerModule(mae=str(mae_dir), sd_inpaint=str(sd_dir), aligner=TINY_ALIGNER, frozen_dtype="float32",
                           **kwargs)
    module.load_pretrained()
    return module


def _batch(size: int = 64, n: int = 2):
    data = PhotoDataModule(batch_size=n, size=size)
    return next(iter(data.train_dataloader()))


def test_p_schedule_is_linear_then_flat():
    assert reconstructed_prior_probability(0) == 1.0
    assert math.isclose(reconstructed_prior_probability(1000), 0.55)
    assert math.isclose(reconstructed_prior_probability(1999), 1.0 - 0.9 * 1999 / 2000)
    assert reconstructed_prior_probability(2000) == 0.1
    assert reconstructed_prior_probability(10**6) == 0.1
    assert reconstructed_prior_probability(5, start=0.5, end=0.5, decay_steps=0) == 0.5
    with pytest.raises(ValueError, match="decay_steps"):
        reconstructed_prior_probability(0, decay_steps=-1)
    with pytest.raises(ValueError, match="probabilities"):
        reconstructed_prior_probability(0, start=1.5)


def test_swap_to_reconstructed_per_sample():
    mask = torch.ones(4000, 1, 2, 2)
    g = torch.Generator().manual_seed(0)
    assert torch.count_nonzero(swap_to_reconstructed(mask, 1.0, g)) == 0
    assert torch.equal(swap_to_reconstructed(mask, 0.0, g), mask)
    half = swap_to_reconstructed(mask, 0.3, g)
    per_sample = half.flatten(1).amax(1)
    assert set(per_sample.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(half, per_sample.view(-1, 1, 1, 1).expand_as(mask))  # whole samples are swapped
    assert abs((1 - per_sample).mean().item() - 0.3) < 0.03


def test_zeroed_mask_gives_the_mae_reconstructed_prior(mae_dir, tiny_inpaint_dir):
    module = _module(mae_dir, tiny_inpaint_dir)
    batch = _batch()
    with torch.no_grad():
        ref = module.aligner(module.mae.reconstructed_prior(batch["image"]).features)
        ours = module.condition(batch["image"], torch.zeros_like(batch["mask"]))
        masked = module.condition(batch["image"], batch["mask"])
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    assert not torch.allclose(masked, ref)


def _reference_loss(module: AlignerModule, image, mask, seed: int) -> torch.Tensor:
    """ε-MSE with the DDPM forward process written out: ᾱ_t from SD's scaled-linear betas, UNet input order
    [z_t, mask↓ (nearest), masked-image latent]; random draws in the module's order."""
    g = torch.Generator().manual_seed(seed)
    vae, unet = module.vae, module.unet
    s = vae.config.scaling_factor
    with torch.no_grad():
        z0 = vae.encode(image).latent_dist.sample(g) * s
        zm = vae.encode(image * (1 - mask)).latent_dist.sample(g) * s
        eps = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, 1000, (image.shape[0],), generator=g)
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        abar = torch.cumprod(1 - betas, 0)[t].float().view(-1, 1, 1, 1)
        zt = abar.sqrt() * z0 + (1 - abar).sqrt() * eps
        m = mask[:, :, ::8, ::8]  # nearest downsampling by 8 picks the top-left pixel of each 8x8 cell
        cond = module.aligner(module.mae.prior(image, mask, return_image=False).features)
        pred = unet(torch.cat([zt, m, zm], 1), t, encoder_hidden_states=cond).sample
    return F.mse_loss(pred, eps)


def test_diffusion_loss_matches_hand_built_reference(mae_dir, tiny_inpaint_dir):
    module = _module(mae_dir, tiny_inpaint_dir)
    batch = _batch()
    with torch.no_grad():
        ours = module.diffusion_loss(batch["image"], batch["mask"], batch["mask"], torch.Generator().manual_seed(7))
    ref = _reference_loss(module, batch["image"], batch["mask"], 7)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)


def test_gradients_reach_only_the_aligner_through_the_checkpointed_unet(mae_dir, tiny_inpaint_dir):
    batch = _batch()
    grads, weights = {}, None
    for checkpointing in (False, True):
        module = _module(mae_dir, tiny_inpaint_dir, gradient_checkpointing=checkpointing).train()
        weights = weights or module.aligner.state_dict()
        module.aligner.load_state_dict(weights)
        assert module.unet.is_gradient_checkpointing == checkpointing
        assert not module.unet.training and not module.mae.training and module.aligner.training
        loss = module.diffusion_loss(batch["image"], batch["mask"], batch["mask"], torch.Generator().manual_seed(3))
        loss.backward()
        assert all(p.grad is None for part in (module.unet, module.vae, module.mae) for p in part.parameters())
        grads[checkpointing] = [p.grad.clone() for p in module.aligner.parameters()]
    assert all(torch.count_nonzero(g) > 0 for g in grads[True][:2])
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_mismatched_parts_are_named(mae_dir, tiny_inpaint_dir, tmp_path):
    with pytest.raises(ValueError, match="in_dim: 32"):
        AlignerModule(mae=str(mae_dir), sd_inpaint=str(tiny_inpaint_dir),
                      aligner=dict(TINY_ALIGNER, in_dim=512)).load_pretrained()
    with pytest.raises(ValueError, match="cross_attention_dim"):
        AlignerModule(mae=str(mae_dir), sd_inpaint=str(tiny_inpaint_dir),
                      aligner=dict(TINY_ALIGNER, cross_attention_dim=64)).load_pretrained()
    with pytest.raises(FileNotFoundError, match="mae="):
        AlignerModule(mae=str(tmp_path), sd_inpaint=str(tiny_inpaint_dir), aligner=TINY_ALIGNER).load_pretrained()
    with pytest.raises(FileNotFoundError, match="sd_inpaint: "):
        AlignerModule(mae=str(mae_dir), sd_inpaint=str(tmp_path), aligner=TINY_ALIGNER).load_pretrained()


def test_a_few_training_steps_checkpoint_only_the_aligner_and_export(mae_dir, tiny_inpaint_dir, tmp_path):
    module = AlignerModule(mae=str(mae_dir), sd_inpaint=str(tiny_inpaint_dir), aligner=TINY_ALIGNER,
                           frozen_dtype="float32", lr=1e-3, p_decay_steps=2, val_sampling_steps=2)
    reference = _module(mae_dir, tiny_inpaint_dir)  # the same frozen weights, loaded independently
    initial = {k: v.clone() for k, v in module.aligner.state_dict().items()}
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=3)
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1, val_check_interval=3,
                      check_val_every_n_epoch=None, default_root_dir=tmp_path, callbacks=[checkpoint])
    trainer.fit(module, datamodule=PhotoDataModule(batch_size=2, size=64, train_samples=6, val_samples=2))
    assert trainer.global_step == 3
    assert math.isclose(trainer.callback_metrics["train/p_reconstructed"].item(), 0.1, rel_tol=1e-6)

    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert set(saved["state_dict"]) == {f"aligner.{k}" for k in initial}
    for name in ("mae", "unet", "vae"):
        trained, frozen = getattr(module, name).state_dict(), getattr(reference, name).state_dict()
        assert all(torch.equal(trained[k], frozen[k]) for k in frozen), f"{name} changed during training"
    assert any(not torch.equal(module.aligner.state_dict()[k], v) for k, v in initial.items())

    exported = export_checkpoint(tmp_path / "ckpt" / "last.ckpt", tmp_path / "export")
    aligner = PriorAligner.from_pretrained(exported)
    for k, v in module.aligner.state_dict().items():
        torch.testing.assert_close(aligner.state_dict()[k], v, rtol=0, atol=0)


def test_log_images_samples_asuka_inpaintings(mae_dir, tiny_inpaint_dir):
    module = _module(mae_dir, tiny_inpaint_dir, val_sampling_steps=2)
    batch = _batch()
    with torch.no_grad():
        columns = module.log_images(batch)
    assert list(columns) == ["input", "masked", "mae_prior", "asuka"]
    sample, image, mask = columns["asuka"], batch["image"], batch["mask"]
    assert sample.shape == image.shape and sample.min() >= -1 and sample.max() <= 1
    known = mask.expand_as(image) < 0.5
    assert torch.allclose(sample[known], image[known], atol=1e-5)  # paste-back of the known pixels

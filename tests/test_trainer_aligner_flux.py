"""FLUX alignment-head training: the flow-matching loss against a hand-built reference, empty-condition dropout, the
reconstructed-prior swap, gradients through the frozen FLUX.1-Fill transformer, and real steps with export."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import FluxFillPipeline
from lightning.pytorch import Trainer

from asuka.models.flux_aligner import FluxPriorAligner
from trainers.aligner_flux import FluxAlignerModule, drop_to_null, flow_matching_sigmas
from trainers.export import export_checkpoint
from trainer_support import PhotoDataModule

TINY_HEADS = dict(in_dim=32, pooled_dim=64, text_dim=128, null_tokens=256, num_blocks=1, head_dim=64)


@pytest.fixture(scope="module")
def module(mae_dir, tiny_flux_fill_dir) -> FluxAlignerModule:
    module = FluxAlignerModule(mae=str(mae_dir), flux_fill=str(tiny_flux_fill_dir), aligner=TINY_HEADS,
                               frozen_dtype="float32", gradient_checkpointing=True)
    module.load_pretrained()
    return module


def _batch(n: int = 2, size: int = 32):
    return next(iter(PhotoDataModule(batch_size=n, size=size).train_dataloader()))


def test_sigmas_follow_flux_shift_and_drop_replaces_whole_samples():
    g = torch.Generator().manual_seed(0)
    plain = flow_matching_sigmas(4000, g, torch.device("cpu"), sampling="uniform", mu=None)
    g = torch.Generator().manual_seed(0)
    shifted = flow_matching_sigmas(4000, g, torch.device("cpu"), sampling="uniform", mu=1.15)
    expected = math.exp(1.15) / (math.exp(1.15) + (1 / plain - 1))  # the scheduler's exponential time_shift
    torch.testing.assert_close(shifted, expected)
    assert 0.45 < plain.mean() < 0.55 and shifted.mean() > plain.mean()
    cond, null = torch.randn(3, 5, 4), torch.randn(1, 5, 4)
    out = drop_to_null(cond, null, torch.tensor([True, False, True]))
    assert torch.equal(out[0], null[0]) and torch.equal(out[1], cond[1]) and torch.equal(out[2], null[0])


def test_nulls_come_from_the_folder_text_encoders(module, tiny_flux_fill_dir):
    fill = FluxFillPipeline.from_pretrained(tiny_flux_fill_dir, transformer=None, vae=None)
    text, pooled, _ = fill.encode_prompt("", None, device="cpu", max_sequence_length=256)
    torch.testing.assert_close(module.aligner.null_text, text)
    torch.testing.assert_close(module.aligner.null_pooled, pooled)


def test_loss_equals_hand_built_rectified_flow_reference(module):
    batch = _batch()
    image, mask = batch["image"], batch["mask"]
    keep = torch.zeros(2, dtype=torch.bool)
    loss = module.flow_matching_loss(image, mask, mask, keep, torch.Generator().manual_seed(3))

    # Reference: the same draws in the same order, written with diffusers' FluxFillPipeline helpers.
    g = torch.Generator().manual_seed(3)
    vae, tr = module.vae, module.transformer
    with torch.no_grad():
        z = (vae.encode(image).latent_dist.sample(g) - vae.config.shift_factor) * vae.config.scaling_factor
        x0 = FluxFillPipeline._pack_latents(z, 2, 16, 4, 4)
        zm = (vae.encode(image * (1 - mask)).latent_dist.sample(g) - vae.config.shift_factor) * vae.config.scaling_factor
        m = mask[:, 0].view(2, 4, 8, 4, 8).permute(0, 2, 4, 1, 3).reshape(2, 64, 4, 4)  # 8x8 pixel unshuffle
        cond = torch.cat([FluxFillPipeline._pack_latents(zm, 2, 16, 4, 4), FluxFillPipeline._pack_latents(m, 2, 64, 4, 4)], -1)
        eps = torch.randn(x0.shape, generator=g)
        mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (4 - 256)  # calculate_shift for 4 image tokens
        sigma = torch.sigmoid(torch.randn(2, generator=g))
        sigma = math.exp(mu) / (math.exp(mu) + (1 / sigma - 1))
        features = module.mae.prior(image, mask, return_image=False).features
        text = module.aligner.t5(features)
        pooled = module.aligner.clip(features).mean(1)
        s = sigma.view(-1, 1, 1)
        pred = tr(hidden_states=torch.cat([(1 - s) * x0 + s * eps, cond], 2), timestep=sigma,
                  guidance=torch.full((2,), 30.0), pooled_projections=pooled, encoder_hidden_states=text,
                  txt_ids=torch.zeros(256, 3), img_ids=FluxFillPipeline._prepare_latent_image_ids(2, 2, 2, "cpu", torch.float32),
                  return_dict=False)[0]
    torch.testing.assert_close(loss.detach(), F.mse_loss(pred, eps - x0), rtol=1e-5, atol=1e-6)


def test_gradients_reach_only_the_heads_and_dropped_samples_train_nothing(module):
    batch = _batch()
    image, mask = batch["image"], batch["mask"]
    module.aligner.zero_grad(set_to_none=True)
    module.flow_matching_loss(image, mask, mask, torch.zeros(2, dtype=torch.bool), torch.Generator().manual_seed(0)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (module.aligner.clip.proj_in.weight,
                                                                        module.aligner.t5.proj_in.weight))
    assert all(p.grad is None for p in module.transformer.parameters())
    module.aligner.zero_grad(set_to_none=True)
    loss = module.flow_matching_loss(image, mask, mask, torch.ones(2, dtype=torch.bool), torch.Generator().manual_seed(0))
    loss.backward()  # every sample on the null embeddings: the heads get exactly zero gradient
    assert all(p.grad is None or not p.grad.any() for p in module.aligner.parameters())


def test_training_steps_checkpoint_and_export(mae_dir, tiny_flux_fill_dir, tmp_path):
    module = FluxAlignerModule(mae=str(mae_dir), flux_fill=str(tiny_flux_fill_dir), aligner=TINY_HEADS,
                               frozen_dtype="float32", lr=1e-3, p_decay_steps=2, val_sampling_steps=1)
    trainer = Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
                      enable_checkpointing=False)
    trainer.fit(module, datamodule=PhotoDataModule(batch_size=2, size=32, train_samples=4))
    assert not any(k.startswith(("mae.", "transformer.", "vae.")) for k in module.state_dict())
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    out = export_checkpoint(tmp_path / "last.ckpt", tmp_path / "export")
    exported = FluxPriorAligner.from_pretrained(out)
    for name, tensor in module.aligner.state_dict().items():
        assert torch.equal(exported.state_dict()[name], tensor), name
    assert exported.null_text.abs().sum() > 0  # the nulls travel with the heads

"""Shared training infrastructure: frozen parts out of checkpoints, export, non-finite step skipping, image grids."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trainers.base import NonFiniteLossError, StageModule, adamw
from trainers.callbacks import image_grid
from trainers.ema import EMA
from trainers.export import export_checkpoint, load_stage_module
from trainers.mae import MAEModule
from trainer_support import TINY_MAE, PhotoDataModule



class EncoderDecoder(ModelMixin, ConfigMixin):
    """A throwaway exportable model with a part that stays frozen in training (like the decoder's VAE encoder)."""

    @register_to_config
    def __init__(self, width: int = 8):
        super().__init__()
        self.encoder = nn.Linear(width, width)
        self.decoder = nn.Linear(width, width)


class FrozenEncoderModule(StageModule):
    """Trains ``net.decoder``; ``net.encoder`` and ``critic`` are frozen and come from ``load_pretrained``."""

    def __init__(self, width: int = 8, max_consecutive_nonfinite: int = 20):
        super().__init__(max_consecutive_nonfinite=max_consecutive_nonfinite)
        self.save_hyperparameters()
        self.net = EncoderDecoder(width)
        self.critic = nn.Linear(width, 1)
        self.net.encoder.requires_grad_(False)
        self.critic.requires_grad_(False)

    def load_pretrained(self) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1234)  # stands in for reading pretrained weights
            self.net.encoder.reset_parameters()
            self.critic.reset_parameters()

    def exportable(self) -> EncoderDecoder:
        return self.net

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return F.mse_loss(self.net.decoder(self.net.encoder(x)), x) + self.critic(x).mean().detach()

    def configure_optimizers(self):
        return adamw([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def _vector_loader(n=16, width=8, batch_size=4):
    return DataLoader(TensorDataset(torch.randn(n, width, generator=torch.Generator().manual_seed(0))), batch_size)


def _trainer(tmp_path, max_steps, callbacks=(), **kwargs):
    return Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path, callbacks=list(callbacks),
        **kwargs,
    )


def test_frozen_parts_stay_out_of_checkpoints_and_export_restores_them(tmp_path):
    module = FrozenEncoderModule()
    assert module.frozen_module_names() == ["net.encoder", "critic"]
    assert sorted(module.state_dict()) == ["net.decoder.bias", "net.decoder.weight"]
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_last=True, save_top_k=-1)
    trainer = _trainer(tmp_path, 4, [ckpt_cb, EMA(decay=0.5)])
    trainer.fit(module, _vector_loader())
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert sorted(checkpoint["state_dict"]) == ["net.decoder.bias", "net.decoder.weight"]
    assert checkpoint["asuka"]["module_class"].endswith("FrozenEncoderModule")

    out = export_checkpoint(tmp_path / "ckpt" / "last.ckpt", tmp_path / "export")
    exported = EncoderDecoder.from_pretrained(out)
    ema = checkpoint["callbacks"]["EMA"]["ema_shadow"]
    assert torch.equal(exported.decoder.weight, ema["net.decoder.weight"])  # EMA weights are the exported ones
    assert not torch.equal(ema["net.decoder.weight"], checkpoint["state_dict"]["net.decoder.weight"])
    assert torch.equal(exported.encoder.weight, module.net.encoder.weight)  # frozen part from load_pretrained
    raw = load_stage_module(tmp_path / "ckpt" / "last.ckpt", use_ema=False)
    assert torch.equal(raw.net.decoder.weight, checkpoint["state_dict"]["net.decoder.weight"])


def test_loading_a_mismatched_checkpoint_names_the_keys():
    module = FrozenEncoderModule()
    state = dict(module.state_dict())
    state["net.extra.weight"] = torch.zeros(1)
    del state["net.decoder.bias"]
    with pytest.raises(KeyError, match=r"missing keys \[net\.decoder\.bias\].*unexpected keys \[net\.extra\.weight\]"):
        module.on_load_checkpoint({"state_dict": state})


def test_export_rejects_a_file_that_is_not_a_stage_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="--ckpt"):
        export_checkpoint(tmp_path / "missing.ckpt", tmp_path / "out")
    torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match="StageModule"):
        export_checkpoint(tmp_path / "plain.ckpt", tmp_path / "out")


def test_optimizers_without_found_inf_support_are_rejected(tmp_path):
    class PlainAdam(FrozenEncoderModule):
        def configure_optimizers(self):
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)

    with pytest.raises(TypeError, match="trainers.base.adamw"):
        _trainer(tmp_path, 1).fit(PlainAdam(), _vector_loader())


# ---------------------------------------------------------------------------------------------- non-finite steps
class NaNMAE(MAEModule):
    """MAEModule whose loss is multiplied by NaN at the given optimizer steps (injected divergence)."""

    def __init__(self, nan_steps: tuple[int, ...] = (), nan_from: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.nan_steps, self.nan_from = set(nan_steps), nan_from

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.global_step in self.nan_steps or (self.nan_from is not None and self.global_step >= self.nan_from):
            loss = loss * float("nan")
        return loss


class WeightTrace(Callback):
    """Flattened trainable weights and AdamW step counts after every optimizer step."""

    def __init__(self):
        self.weights, self.adam_steps = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append(torch.cat([p.detach().flatten() for p in pl_module.parameters() if p.requires_grad]))
        state = trainer.optimizers[0].state
        self.adam_steps.append(max(float(s["step"]) for s in state.values()) if state else 0.0)


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    module = NaNMAE(nan_steps=(2, 3), model=TINY_MAE, lr=1e-3)
    trace = WeightTrace()
    trainer = _trainer(tmp_path, 6, [trace], log_every_n_steps=1, limit_val_batches=0)
    initial = torch.cat([p.detach().flatten().clone() for p in module.parameters() if p.requires_grad])
    trainer.fit(module, datamodule=PhotoDataModule(batch_size=2, size=32, train_samples=12))
    w = trace.weights
    assert not torch.equal(w[0], initial) and not torch.equal(w[1], w[0])
    assert torch.equal(w[2], w[1]) and torch.equal(w[3], w[1])  # steps 2 and 3 (NaN loss) left the weights alone
    assert not torch.equal(w[4], w[3]) and torch.isfinite(w[5]).all()
    assert trace.adam_steps == [1.0, 2.0, 2.0, 2.0, 3.0, 4.0]  # AdamW's bias-correction step skipped too
    assert trainer.callback_metrics["train/skipped_steps"] == 2
    assert trainer.global_step == 6


def test_too_many_consecutive_nonfinite_steps_stop_with_a_checkpoint(tmp_path):
    module = NaNMAE(nan_from=2, max_consecutive_nonfinite=3, model=TINY_MAE, lr=1e-3)
    trace = WeightTrace()
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=100)
    trainer = _trainer(tmp_path, 20, [trace, ckpt_cb], log_every_n_steps=1, limit_val_batches=0)
    with pytest.raises(NonFiniteLossError, match="3 consecutive optimizer steps .* --ckpt_path"):
        trainer.fit(module, datamodule=PhotoDataModule(batch_size=2, size=32, train_samples=40))
    saved = list((tmp_path / "ckpt").glob("nonfinite-step=*.ckpt"))
    assert [p.name for p in saved] == ["nonfinite-step=5.ckpt"]
    restored = load_stage_module(saved[0], use_ema=False)
    flat = torch.cat([p.detach().flatten() for p in restored.parameters() if p.requires_grad])
    assert torch.equal(flat, trace.weights[1])  # the last finite weights (after step 2 of 5)


# ---------------------------------------------------------------------------------------------- image grid
def test_image_grid_rows_are_samples_and_columns_are_entries():
    a = torch.full((2, 3, 4, 4), -1.0)
    b = torch.ones(2, 1, 4, 4)
    grid = image_grid({"a": a, "b": b})
    assert grid.shape == (3, 2 * 4 + 3 * 2, 2 * 4 + 3 * 2)  # 2 rows x 2 columns with 2-px padding
    assert grid[:, 2:6, 2:6].eq(0).all() and grid[:, 2:6, 8:12].eq(1).all()
    with pytest.raises(ValueError, match="share batch"):
        image_grid({"a": a, "b": torch.ones(1, 3, 4, 4)})


def test_mae_module_log_images_columns():
    module = MAEModule(model=TINY_MAE)
    batch = next(iter(PhotoDataModule(batch_size=2, size=48).val_dataloader()))
    with torch.no_grad():
        columns = module.log_images(batch)
    assert list(columns) == ["input", "masked", "prediction", "composite"]
    mask = batch["mask"]
    assert all(c.shape == (2, 3, 48, 48) for c in columns.values())
    assert torch.equal(columns["composite"] * (1 - mask), batch["image"] * (1 - mask))
    assert torch.equal(columns["composite"] * mask, columns["prediction"] * mask)


# ---------------------------------------------------------------------------------------------- MAE module options
def test_mae_init_from_a_folder_or_a_mae_far_pth(tmp_path):
    source = MAEModule(model=TINY_MAE).model
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.5)
    source.save_pretrained(tmp_path / "folder")
    torch.save({"model": source.state_dict(), "epoch": 300}, tmp_path / "mae_far.pth")
    for path in (tmp_path / "folder", tmp_path / "mae_far.pth"):
        module = MAEModule(model=TINY_MAE, init_from=str(path))
        module.setup("fit")
        for (name, a), b in zip(source.state_dict().items(), module.model.state_dict().values()):
            assert torch.equal(a, b), (path, name)
    with pytest.raises(FileNotFoundError, match="init_from"):
        MAEModule(model=TINY_MAE, init_from=str(tmp_path / "nothing.pth")).setup("fit")
    with pytest.raises(ValueError, match="does not fit"):
        MAEModule(model=dict(TINY_MAE, embed_dim=32), init_from=str(tmp_path / "folder")).setup("fit")


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    batch = next(iter(PhotoDataModule(batch_size=2, size=32).train_dataloader()))
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        module = MAEModule(model=TINY_MAE, gradient_checkpointing=checkpointing)
        x, m = module._inputs(batch)
        loss = module.model.forward_train(x, m, 0.75, generator=torch.Generator().manual_seed(0))["loss"]
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in module.model.parameters() if p.grad is not None]))
    assert torch.allclose(results[0][0], results[1][0])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(results[0][1], results[1][1]))


def test_bf16_mixed_training_steps_run_with_fp32_master_weights(tmp_path):
    module = MAEModule(model=TINY_MAE, lr=1e-3)
    trainer = _trainer(tmp_path, 2, precision="bf16-mixed", limit_val_batches=0, log_every_n_steps=1)
    trainer.fit(module, datamodule=PhotoDataModule(batch_size=2, size=32, train_samples=4))
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train/loss"])
    assert trainer.callback_metrics["train/skipped_steps"] == 0
    assert all(p.dtype == torch.float32 for p in module.parameters())


def test_bad_mae_module_arguments():
    with pytest.raises(ValueError, match="mask_ratio"):
        MAEModule(model=TINY_MAE, mask_ratio=1.0)
    with pytest.raises(ValueError, match="init_format"):
        MAEModule(model=TINY_MAE, init_format="timm")
    with pytest.raises(ValueError, match="max_consecutive_nonfinite"):
        MAEModule(model=TINY_MAE, max_consecutive_nonfinite=0)

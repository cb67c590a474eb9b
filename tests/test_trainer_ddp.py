"""DDP on CPU: two gloo processes (``ddp_spawn``) stay in step — identical weights on both ranks after N steps,
including a step whose loss is NaN on one rank only (both ranks must skip it together)."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from trainers.mae import MAEModule
from trainer_support import TINY_MAE, PhotoDataModule



class OneRankNaNMAE(MAEModule):
    """Rank 1's loss is NaN at optimizer step 1: the all-reduced gradients are then non-finite on every rank."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if (self.global_rank, self.global_step) == (1, 1) else loss


class SaveRankWeights(Callback):
    """Every rank writes its flattened weights and the effective batch size it computed."""

    def __init__(self, folder):
        self.folder = str(folder)

    def on_train_end(self, trainer, pl_module):
        weights = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        torch.save({"weights": weights, "effective_batch": pl_module.effective_batch_size(),
                    "skipped": int(pl_module._nonfinite_total),
                    "lr": trainer.optimizers[0].param_groups[0]["initial_lr"]},
                   f"{self.folder}/rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_two_cpu_processes_stay_in_step(tmp_path):
    module = OneRankNaNMAE(model=TINY_MAE, base_lr=0.05, warmup_steps=1)
    initial = torch.cat([p.detach().flatten().clone() for p in module.parameters()])
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=4, accumulate_grad_batches=2, logger=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        default_root_dir=tmp_path, callbacks=[SaveRankWeights(tmp_path)], enable_checkpointing=False,
    )
    trainer.fit(module, datamodule=PhotoDataModule(batch_size=2, size=32, train_samples=32))
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert rank0["effective_batch"] == rank1["effective_batch"] == 2 * 2 * 2  # batch x devices x accumulation
    assert rank0["lr"] == pytest.approx(0.05 * 8 / 256)
    assert not torch.equal(rank0["weights"], initial)  # it trained
    assert torch.equal(rank0["weights"], rank1["weights"])  # ...and both ranks hold the same weights
    assert rank0["skipped"] == rank1["skipped"] == 1  # the one-rank NaN step was skipped on both

"""Resume: 2N uninterrupted steps == N steps, a crash, and N steps resumed with ``ckpt_path="last"``.

CPU, deterministic data (tests/trainer_support.py), the MAE stage with its warm-up + cosine schedule, AdamW state,
EMA and masking-noise generator: the per-step losses after resuming must equal the uninterrupted run's exactly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from trainers.ema import EMA
from trainers.mae import MAEModule
from trainer_support import TINY_MAE, PhotoDataModule, mae_fit_config



class LossRecorder(Callback):
    def __init__(self):
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(outputs["loss"])


class Crash(Exception):
    pass


class CrashAt(Callback):
    """Dies when optimizer step ``step`` begins: after the step-``step`` checkpoint, like a killed process."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Crash


def _run(tmp_path, max_steps, every, *extra, ckpt_path=None):
    seed_everything(0)
    recorder = LossRecorder()
    ema = EMA(decay=0.9)
    trainer = Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=tmp_path,
        callbacks=[recorder, ema, ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=every,
                                                  save_last=True, save_top_k=-1), *extra],
    )
    module = MAEModule(model=TINY_MAE, base_lr=0.02, warmup_steps=2, min_lr=1e-4)
    data = PhotoDataModule(batch_size=4, size=32, train_samples=12)  # 3 batches per epoch
    try:
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    except Crash:
        pass
    return recorder.losses, module, ema


def test_resume_reproduces_the_uninterrupted_losses(tmp_path):
    n = 3  # one epoch of this map-style loader (the streaming datamodule resumes mid-epoch: test_reliability_training)
    full, full_module, full_ema = _run(tmp_path / "full", 2 * n, n)
    first, _, _ = _run(tmp_path / "resumed", 2 * n, n, CrashAt(n))
    assert sorted(first) == list(range(1, n + 1))
    second, resumed_module, resumed_ema = _run(tmp_path / "resumed", 2 * n, n, ckpt_path="last")
    assert sorted(second) == list(range(n + 1, 2 * n + 1))
    assert [first[s] for s in range(1, n + 1)] == [full[s] for s in range(1, n + 1)]
    assert [second[s] for s in range(n + 1, 2 * n + 1)] == [full[s] for s in range(n + 1, 2 * n + 1)]
    for a, b in zip(full_module.parameters(), resumed_module.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(full_ema.state_dict()["ema_shadow"].values(), resumed_ema.state_dict()["ema_shadow"].values()):
        assert torch.equal(a, b)


def test_ema_added_on_resume_starts_from_the_restored_weights(tmp_path):
    seed_everything(0)
    module = MAEModule(model=TINY_MAE, lr=1e-2)
    data = PhotoDataModule(batch_size=4, size=32, train_samples=8)
    first = Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False, limit_val_batches=0,
                    callbacks=[ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_last=True)])
    first.fit(module, datamodule=data)
    trained = {n: p.detach().clone() for n, p in module.named_parameters()}

    ema = EMA(decay=0.999999)  # so close to 1 that the shadow barely moves from its start
    resumed_module = MAEModule(model=TINY_MAE, lr=1e-2)
    second = Trainer(accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False, limit_val_batches=0,
                     callbacks=[ema, ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_last=True)])
    second.fit(resumed_module, datamodule=data, ckpt_path=str(tmp_path / "last.ckpt"))
    for name, shadow in ema.state_dict()["ema_shadow"].items():
        assert torch.allclose(shadow, trained[name], atol=1e-5), name


@pytest.mark.slow
def test_cli_resume_after_sigkill_reproduces_the_losses(tmp_path):
    """The same through ``python -m trainers.fit`` processes: one killed with SIGKILL, one resumed with --ckpt_path."""
    n = 3
    support = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(support), os.environ.get("PYTHONPATH", "")])}

    def fit(run: str, *callbacks: dict, ckpt_path: str | None = None) -> subprocess.CompletedProcess:
        folder = tmp_path / run
        data = {"class_path": "trainer_support.PhotoDataModule",
                "init_args": {"batch_size": 4, "size": 32, "train_samples": 12}}
        log = {"class_path": "trainer_support.LossLog", "init_args": {"path": str(tmp_path / f"{run}.txt")}}
        config = mae_fit_config(folder, max_steps=2 * n, every=n, data=data, callbacks=[log, *callbacks])
        path = tmp_path / f"{run}-{'resume' if ckpt_path else 'start'}.yaml"
        path.write_text(yaml.safe_dump(config))
        command = [sys.executable, "-m", "trainers.fit", "--config", str(path)]
        if ckpt_path:
            command += ["--ckpt_path", ckpt_path]
        return subprocess.run(command, cwd=support.parent, env=env, capture_output=True, text=True, timeout=600)

    def losses(run: str) -> dict[int, str]:
        return dict(line.split() for line in (tmp_path / f"{run}.txt").read_text().splitlines())

    assert fit("full").returncode == 0
    killed = fit("killed", {"class_path": "trainer_support.KillAt", "init_args": {"step": n}})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = fit("killed", ckpt_path="last")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    full, interrupted = losses("full"), losses("killed")
    assert sorted(map(int, interrupted)) == list(range(1, 2 * n + 1))
    assert interrupted == full  # same loss at every step, to the last bit (repr of the float)

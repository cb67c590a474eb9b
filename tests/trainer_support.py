"""Deterministic map-style inpainting data for the trainer tests (real scikit-image photographs, ASUKA masks).

Every sample is a pure function of its index, so runs that restart the data loader (resume, DDP) see the same
batches as an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningDataModule
from torch.utils.data import DataLoader, Dataset

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "immunohistochemistry")
TINY_MAE = dict(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, decoder_embed_dim=16, decoder_depth=2,
                decoder_num_heads=2, mlp_ratio=2.0, feature_layer=1)
"""``MAEModule(model=...)`` of the trainer tests: a 32² MAE with 16-d tokens."""


def mae_fit_config(folder: Path, *, max_steps: int, every: int, data: dict[str, Any], callbacks=()) -> dict:
    """A ``python -m trainers.fit`` config training :data:`TINY_MAE` on the CPU into ``folder``: a checkpoint every
    ``every`` steps (all kept, and ``last.ckpt``), EMA 0.9, then ``callbacks``; ``data`` is the data module's
    ``{"class_path": ..., "init_args": ...}``."""
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": max_steps, "logger": False, "limit_val_batches": 0,
            "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(folder),
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(folder / "ckpt"), "every_n_train_steps": every, "save_last": True,
                               "save_top_k": -1}},
                {"class_path": "trainers.ema.EMA", "init_args": {"decay": 0.9}},
                *callbacks,
            ],
        },
        "model": {"class_path": "trainers.mae.MAEModule",
                  "init_args": {"model": TINY_MAE, "base_lr": 0.02, "warmup_steps": 2, "min_lr": 1e-4}},
        "data": data,
    }


def _photos() -> list[np.ndarray]:
    from skimage import data

    photos = []
    for name in PHOTOS:
        image = getattr(data, name)()
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=-1)
        photos.append(image[..., :3])
    return photos


class PhotoCrops(Dataset):
    def __init__(self, length: int, size: int, seed: int) -> None:
        from asuka.masks import get_mask_generator

        self.length, self.size, self.seed = length, size, seed
        self.photos = _photos()
        self.masks = get_mask_generator("asuka_train")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, index])
        photo = self.photos[index % len(self.photos)]
        h, w = photo.shape[:2]
        side = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = torch.from_numpy(np.ascontiguousarray(photo[top : top + side, left : left + side])).permute(2, 0, 1)
        image = torch.nn.functional.interpolate(
            crop[None].float() / 127.5 - 1, size=(self.size, self.size), mode="area"
        )[0]
        mask = torch.from_numpy(self.masks(self.size, self.size, rng))[None]
        return {"image": image, "mask": mask, "masked_image": image * (1 - mask), "key": f"{self.seed}-{index}"}


class PhotoDataModule(LightningDataModule):
    """``batch_size`` per device; ``train_samples`` per epoch (no shuffling); fixed validation cases."""

    def __init__(self, batch_size: int = 4, size: int = 64, train_samples: int = 16, val_samples: int = 4) -> None:
        super().__init__()
        self.batch_size, self.size = batch_size, size
        self.train_samples, self.val_samples = train_samples, val_samples

    def train_dataloader(self) -> DataLoader:
        return DataLoader(PhotoCrops(self.train_samples, self.size, seed=0), batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(PhotoCrops(self.val_samples, self.size, seed=1), batch_size=self.batch_size)


class LossLog(Callback):
    """Appends ``step loss`` (repr of the float) to ``path`` after every optimizer step, flushed at once."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with open(self.path, "a") as handle:
            handle.write(f"{trainer.global_step} {float(outputs['loss'])!r}\n")


class KillAt(Callback):
    """SIGKILLs its own process when optimizer step ``step`` begins (after the step-``step`` checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class BatchLog(Callback):
    """Appends ``step loss keys image-crc mask-crc`` after every optimizer step (what the step trained on and what
    it logged), flushed at once."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import zlib

        image = zlib.crc32(batch["image"].detach().cpu().numpy().tobytes())
        mask = zlib.crc32(batch["mask"].detach().cpu().numpy().tobytes())
        with open(self.path, "a") as handle:
            handle.write(f"{trainer.global_step} {float(outputs['loss'])!r} {','.join(batch['key'])} {image} {mask}\n")

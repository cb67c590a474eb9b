"""Stage-agnostic Lightning callbacks: image grids on the validation cases and training throughput."""

from __future__ import annotations

import time
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torchvision.utils import make_grid

from trainers.base import StageModule

__all__ = ["ImageLogger", "SpeedMonitor", "image_grid"]


def image_grid(columns: dict[str, torch.Tensor]) -> torch.Tensor:
    """One row per sample, one column per entry (in dict order): a (3,H',W') float grid in [0,1].

    Every column is (B,3,H,W) in [-1,1] with the same B, H, W; single-channel columns (masks) are repeated to RGB.
    """
    if not columns:
        raise ValueError("columns must name at least one image column")
    tensors = []
    for name, value in columns.items():
        if not isinstance(value, torch.Tensor) or value.ndim != 4 or value.shape[1] not in (1, 3):
            raise ValueError(f"column {name!r} must be a (B,1|3,H,W) tensor, got {getattr(value, 'shape', value)!r}")
        tensors.append(value.detach().float().cpu().expand(-1, 3, -1, -1))
    shapes = {(t.shape[0], *t.shape[2:]) for t in tensors}
    if len(shapes) != 1:
        raise ValueError(f"columns must share batch and spatial size, got {sorted(shapes)}")
    rows = torch.stack(tensors, dim=1).flatten(0, 1)  # sample-major: s0c0, s0c1, ..., s1c0, ...
    return make_grid(((rows + 1) / 2).clamp(0, 1), nrow=len(tensors), padding=2, pad_value=1.0)


def logged_step(trainer: Trainer) -> int:
    """The step ``self.log`` scalars are written at: Lightning counts it in training batches that stepped, which
    differs from ``global_step`` (optimiser steps) when a stage steps two optimisers per iteration (the decoder).
    Images logged at this step line up with the scalars in TensorBoard."""
    loop = getattr(trainer.fit_loop, "epoch_loop", None)
    return int(getattr(loop, "_batches_that_stepped", trainer.global_step))


class ImageLogger(Callback):
    """Logs ``pl_module.log_images(batch)`` on the first validation batches as one TensorBoard grid.

    The validation set holds fixed cases (same images and masks every time), so successive grids show progress.
    Rank zero only; other loggers than TensorBoard are ignored.
    """

    def __init__(self, max_images: int = 8, tag: str = "val/images") -> None:
        if max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {max_images}")
        self.max_images, self.tag = max_images, tag
        self._columns: dict[str, list[torch.Tensor]] = {}
        self._count = 0

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._columns, self._count = {}, 0

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not trainer.is_global_zero or self._count >= self.max_images:
            return
        with torch.no_grad():
            columns = pl_module.log_images(batch)
        take = None
        for name, value in columns.items():
            take = min(value.shape[0], self.max_images - self._count) if take is None else take
            self._columns.setdefault(name, []).append(value[:take].detach().float().cpu())
        self._count += take or 0

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero or not self._columns:
            return
        grid = image_grid({name: torch.cat(parts) for name, parts in self._columns.items()})
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(f"{self.tag}/{' | '.join(self._columns)}", grid, logged_step(trainer))
        self._columns, self._count = {}, 0


class SpeedMonitor(Callback):
    """Logs ``train/samples_per_sec`` (all ranks together) averaged over each ``log_every_n_steps`` window.

    Timing uses the host clock without device synchronisation: over a window the host waits for the device anyway
    (logging reads values back), so the rate matches the device's.
    """

    def __init__(self) -> None:
        self._start: float | None = None
        self._samples = 0
        self._logged_step = -1

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._start is None:
            self._start, self._samples = time.perf_counter(), 0

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._samples += getattr(pl_module, "batch_size_of", StageModule.batch_size_of)(batch)
        step = trainer.global_step
        if step == self._logged_step or step % max(1, trainer.log_every_n_steps) != 0 or self._start is None:
            return
        now = time.perf_counter()
        rate = self._samples * trainer.world_size / max(now - self._start, 1e-9)
        pl_module.log("train/samples_per_sec", rate, on_step=True, on_epoch=False)
        self._start, self._samples, self._logged_step = now, 0, step


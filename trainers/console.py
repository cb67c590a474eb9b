"""What ``python -m trainers.*`` prints: one screen a person can act on.

* :func:`quiet_lightning` (installed by ``python -m trainers.*`` and by every stage module, whose frozen parts are in
  eval mode on purpose) drops messages nobody running these commands can act on: Lightning's product tips, its own
  deprecation warnings from ``torch.utils._pytree``, the "modules in eval mode" warning (the frozen UNet, VAE, MAE and
  LPIPS are in eval mode on purpose), the manual-optimisation note of ``ModelCheckpoint`` (the decoder's two
  optimisers step once per iteration each, which our ``max_steps`` already counts), the TPU line and the
  ``limit_val_batches`` echo. Every other message and warning is kept.
* :class:`StepProgressBar`: step-based runs (``max_steps`` set, ``max_epochs`` not) show one bar over the whole run
  (``Training: step i/max_steps``, resumed runs start where they stopped) instead of Lightning's ``Epoch 3/-2``.
* :func:`parameter_summary`: the one line that replaces Lightning's model-summary table (whose FLOPs column is always
  0 without an example input).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info

_SILENT_LOG_PREFIXES = ("💡 Tip:", "TPU available:", "`Trainer(limit_val_batches=")
_SILENT_WARNINGS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"Found \d+ module\(s\) in eval mode at the start of training",
    r"ModelCheckpoint\(.*\) is being used with manual optimization",
    r"The `srun` command is available on your system but is not used",
    r"LightningCLI's args parameter is intended to run from within Python",  # fit passes the demo config that way
    r"Checkpoint directory .* exists and is not empty",  # resuming into the run's folder; fresh runs are refused there
)


class _DropMessages(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(_SILENT_LOG_PREFIXES)


def quiet_lightning() -> None:
    """Install the filters (idempotent; process-wide, as Lightning's own logging configuration is)."""
    drop = _DropMessages()
    for name in ("lightning.pytorch", "lightning.fabric", "lightning.fabric.utilities.rank_zero",
                 "lightning.pytorch.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(drop)
        for handler in logger.handlers:
            if not any(isinstance(f, _DropMessages) for f in handler.filters):
                handler.addFilter(drop)
    for pattern in _SILENT_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def parameter_summary(module: LightningModule) -> str:
    """``"<Stage>: 12.3 M trainable, 860 M frozen parameters"`` (frozen parts are not in checkpoints)."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    return f"{type(module).__name__}: {_count(trainable)} trainable, {_count(frozen)} frozen parameters"


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return str(n)


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar; for step-based runs one bar over ``global_step`` of ``max_steps`` for the whole run."""

    @staticmethod
    def _step_based(trainer: Trainer) -> bool:
        return trainer.max_steps > 0 and trainer.max_epochs in (None, -1)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        rank_zero_info(parameter_summary(pl_module))
        super().on_train_start(trainer, pl_module)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._step_based(trainer):
            super().on_train_epoch_start(trainer, pl_module)
            return
        bar = self.train_progress_bar
        if bar.total != trainer.max_steps:
            bar.reset(total=trainer.max_steps)
            bar.n = bar.last_print_n = trainer.global_step
        bar.set_description("Training: step")

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._step_based(trainer):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        bar = self.train_progress_bar
        if trainer.global_step - bar.n >= self.refresh_rate or trainer.global_step >= trainer.max_steps:
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._step_based(trainer):
            super().on_train_epoch_end(trainer, pl_module)


__all__ = ["StepProgressBar", "parameter_summary", "quiet_lightning"]

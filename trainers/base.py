"""Shared LightningModule base for every training stage (MAE, aligner, decoder).

Contract for a stage module (subclass :class:`StageModule`):

* ``__init__`` takes plain, YAML-friendly arguments, calls ``super().__init__(max_consecutive_nonfinite=...)`` and
  ``self.save_hyperparameters()``, and builds the **trainable** model(s) with their architecture (no weight loading).
* :meth:`load_pretrained` loads pretrained / frozen weights (``init_from`` paths, a frozen UNet or VAE, ...). The base
  calls it from ``setup("fit")``, i.e. *before* Lightning restores a checkpoint, so a resumed run overwrites the trainable
  weights and keeps the frozen ones; export calls it only when the checkpoint lacks weights of the exported model.
* Frozen parts: any submodule whose parameters all have ``requires_grad=False`` is left out of ``state_dict()`` and so
  out of every Lightning checkpoint (the "partial checkpoint" recipe of Lightning's docs: ``strict_loading=False`` plus a
  filtered ``state_dict``). Loading checks the keys itself: a checkpoint must hold exactly the non-frozen keys.
* :meth:`exportable` returns the diffusers ``ModelMixin`` that ``python -m trainers.export`` writes with
  ``save_pretrained`` (EMA weights substituted when the :class:`trainers.ema.EMA` callback was used).
* :meth:`log_images` returns ``{column name: (B,3,H,W) in [-1,1]}`` for :class:`trainers.callbacks.ImageLogger`.
* ``configure_optimizers`` builds its optimizers with :func:`adamw` (fused AdamW). The base skips optimizer steps whose
  gradients are not finite **without a host sync**: ``on_before_optimizer_step`` computes the gradient norm (logged as
  ``train/grad_norm``) and hands ``found_inf = ~isfinite(norm)`` to the fused kernel — the mechanism
  ``torch.amp.GradScaler`` uses — which then leaves weights, moments and step counts untouched (multi-optimizer stages
  reuse :meth:`StageModule.nonfinite_flag` for one joint decision). Under DDP the check runs
  on all-reduced gradients, so every rank skips the same steps. Skips are counted on the device
  (``train/skipped_steps``); the host reads the consecutive-skip counter only every ``trainer.log_every_n_steps``
  steps (when Lightning synchronises for logging anyway), so a diverged run stops at most that many steps after
  ``max_consecutive_nonfinite`` with a checkpoint of the last finite weights and :class:`NonFiniteLossError`.
  Trade-off: the learning-rate scheduler still advances on a skipped step (as with GradScaler). With
  ``precision="16-mixed"`` Lightning's GradScaler runs the hook on unscaled gradients and then sets ``found_inf``
  itself (same decision).
* Randomness: stages with a ``seed`` hyper-parameter draw per-step noise from :meth:`StageModule.step_generator`
  (seeded by seed, optimizer step, micro-batch and rank: resumable, distinct per rank) and fixed validation draws
  from :meth:`StageModule.validation_generator`.
* Subclasses overriding ``on_before_optimizer_step`` / ``on_train_batch_end`` / ``setup`` call ``super()``.
* Data: a datamodule attribute ``skipped_samples`` (host int, e.g. ``InpaintingDataModule``) is logged as
  ``data/skipped_samples``.
* Per-device batch size: the datamodule exposes ``batch_size``; :meth:`effective_batch_size` multiplies it by the
  world size (devices × nodes) and ``accumulate_grad_batches``, for the linear learning-rate scaling rule.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch.optim.lr_scheduler import LambdaLR

from trainers.checks import check_positive_ints
from trainers.console import quiet_lightning
from trainers.schedules import effective_batch_size, warmup_cosine_factor

__all__ = [
    "CHECKPOINT_KEY", "NonFiniteLossError", "StageModule", "adamw", "checkpoint_folder", "warmup_cosine_scheduler",
]

CHECKPOINT_KEY = "asuka"  # extra checkpoint entry: {"module_class": "pkg.mod.Class"} for trainers.export


class NonFiniteLossError(RuntimeError):
    """Raised when too many consecutive optimizer steps had a non-finite loss or gradient."""


def adamw(
    param_groups: Iterable[Any], *, lr: float, betas: tuple[float, float] = (0.9, 0.95), weight_decay: float = 0.0
) -> torch.optim.AdamW:
    """Fused AdamW, the optimizer :class:`StageModule` expects (its ``found_inf`` input skips non-finite steps).

    ``weight_decay`` is the default for groups that do not set their own (see ``param_groups_weight_decay``).
    """
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, weight_decay=weight_decay, fused=True)


def warmup_cosine_scheduler(
    optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int, min_factor: float = 0.0
) -> dict[str, Any]:
    """Lightning scheduler config stepping :func:`~trainers.schedules.warmup_cosine_factor` every optimizer step."""
    warmup_cosine_factor(0, warmup_steps=warmup_steps, total_steps=total_steps, min_factor=min_factor)  # validates
    schedule = _WarmupCosine(warmup_steps, total_steps, min_factor)
    return {"scheduler": LambdaLR(optimizer, schedule), "interval": "step", "frequency": 1, "name": "lr"}


class _WarmupCosine:
    """Picklable LR-lambda (LambdaLR saves callable objects' ``__dict__`` in checkpoints)."""

    def __init__(self, warmup_steps: int, total_steps: int, min_factor: float) -> None:
        self.warmup_steps, self.total_steps, self.min_factor = warmup_steps, total_steps, min_factor

    def __call__(self, step: int) -> float:
        return warmup_cosine_factor(
            step, warmup_steps=self.warmup_steps, total_steps=self.total_steps, min_factor=self.min_factor
        )


class StageModule(LightningModule):
    """Base of the stage modules; see the module docstring for the contract."""

    def __init__(self, *, max_consecutive_nonfinite: int = 20, compile: bool = False) -> None:
        super().__init__()
        quiet_lightning()  # frozen parts are in eval mode on purpose: Lightning's note about it is not actionable
        check_positive_ints(max_consecutive_nonfinite=max_consecutive_nonfinite)
        self.max_consecutive_nonfinite = max_consecutive_nonfinite
        self.compile_modules = compile  # torch.compile the compiled_parts() in setup('fit'), after loading
        self.strict_loading = False  # frozen parts are absent from checkpoints; on_load_checkpoint checks the rest
        self._nonfinite_run: torch.Tensor | None = None  # consecutive skipped steps (device)
        self._nonfinite_total: torch.Tensor | None = None  # skipped steps since the process started (device)
        self._last_nonfinite_check = -1
        self._generator: torch.Generator | None = None  # reused by seeded_generator (one per device)

    # ------------------------------------------------------------------ stage hooks
    def exportable(self) -> torch.nn.Module:
        """The diffusers ``ModelMixin`` (a submodule of this module) that export writes with ``save_pretrained``."""
        raise NotImplementedError(f"{type(self).__name__} must implement exportable()")

    def load_pretrained(self) -> None:
        """Load pretrained / frozen weights (called from ``setup('fit')`` and by export when needed)."""

    def log_images(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Image columns ``{name: (B,3,H,W) in [-1,1]}`` for the image-grid logger."""
        raise NotImplementedError(f"{type(self).__name__} must implement log_images(batch) to use ImageLogger")

    @staticmethod
    def input_columns(batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The grid columns every stage starts with: ``input`` and ``masked`` (the batch's ``masked_image``, else
        ``image * (1 - mask)``)."""
        image, masked = batch["image"], batch.get("masked_image")
        return {"input": image, "masked": image * (1 - batch["mask"]) if masked is None else masked}

    def compiled_parts(self) -> list[torch.nn.Module]:
        """The modules ``compile=True`` compiles in place (``nn.Module.compile``: parameter names, checkpoints and
        exports are unchanged): the ones the training step calls through ``__call__`` and that cost the most.
        Default: the exportable module."""
        return [self.exportable()]

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.load_pretrained()
            if self.compile_modules:
                for module in self.compiled_parts():
                    if getattr(module, "_compiled_call_impl", None) is None:
                        module.compile()

    # ------------------------------------------------------------------ randomness
    def seeded_generator(self, seed: int) -> torch.Generator:
        """This module's device generator (allocated once per device), re-seeded with ``seed % 2**63``."""
        if self._generator is None or self._generator.device != self.device:
            self._generator = torch.Generator(device=self.device)
        return self._generator.manual_seed(seed % 2**63)

    def step_generator(self, batch_idx: int) -> torch.Generator:
        """Generator seeded by (``hparams.seed``, optimizer step, micro-batch, rank).

        A resumed run draws exactly what an uninterrupted one would, and every rank draws differently.
        """
        trainer = self.trainer
        accumulate = trainer.accumulate_grad_batches
        micro = self.global_step * accumulate + batch_idx % accumulate
        return self.seeded_generator((self.hparams.seed * 1_000_003 + micro) * trainer.world_size + trainer.global_rank)

    def validation_generator(self, batch_idx: int) -> torch.Generator:
        """A fresh generator seeded by ``hparams.seed + batch_idx``: the same draws for each fixed validation case."""
        return torch.Generator(device=self.device).manual_seed(self.hparams.seed + batch_idx)

    # ------------------------------------------------------------------ batch size and learning-rate scaling
    def per_device_batch_size(self) -> int:
        datamodule = getattr(self.trainer, "datamodule", None)
        size = getattr(datamodule, "batch_size", None)
        if not isinstance(size, int):
            raise ValueError(
                "the learning rate scales with the effective batch size, so the datamodule must expose an integer "
                f"`batch_size` (per device); got {type(datamodule).__name__} with batch_size={size!r}"
            )
        return size

    def effective_batch_size(self) -> int:
        """Per-device batch × devices × nodes × gradient accumulation, read from the trainer."""
        trainer = self.trainer
        return effective_batch_size(self.per_device_batch_size(), trainer.world_size, trainer.accumulate_grad_batches)

    def total_training_steps(self) -> int:
        """Optimizer steps of the whole run (``trainer.max_steps``, else Lightning's estimate)."""
        steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(steps) or steps < 1:
            raise ValueError("the learning-rate schedule needs a finite run length: set trainer.max_steps")
        return int(steps)

    @staticmethod
    def batch_size_of(batch: Any) -> int:
        """Number of samples in a batch: the leading size of its first tensor."""
        values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else [batch]
        for value in values:
            if isinstance(value, torch.Tensor):
                return int(value.shape[0])
        raise TypeError(f"cannot tell the batch size of a {type(batch).__name__} without tensors")

    # ------------------------------------------------------------------ checkpoints: frozen parts stay out
    def frozen_module_names(self) -> list[str]:
        """Names of the maximal submodules that have parameters and none of them trainable."""
        names: list[str] = []
        for name, module in self.named_modules():
            if not name or any(name.startswith(f"{frozen}.") for frozen in names):
                continue
            params = list(module.parameters())
            if params and not any(p.requires_grad for p in params):
                names.append(name)
        return names

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        frozen = tuple(f"{prefix}{name}." for name in self.frozen_module_names())
        if frozen:
            for key in [key for key in state if key.startswith(frozen)]:
                del state[key]
        return state

    def check_state_keys(self, keys: Iterable[str], *, source: str) -> None:
        """Raise ``KeyError`` naming missing/unexpected keys unless ``keys`` are exactly the non-frozen state keys."""
        expected, found = set(self.state_dict().keys()), set(keys)
        missing, unexpected = sorted(expected - found), sorted(found - expected)
        if missing or unexpected:
            raise KeyError(
                f"{source} does not match {type(self).__name__}: missing keys {_names(missing)}, "
                f"unexpected keys {_names(unexpected)} (was it written by another stage or configuration?)"
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {"module_class": f"{type(self).__module__}.{type(self).__qualname__}"}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_state_keys(checkpoint["state_dict"].keys(), source="checkpoint")

    # ------------------------------------------------------------------ non-finite steps
    def on_fit_start(self) -> None:
        for optimizer in self.trainer.optimizers:
            if not getattr(optimizer, "_step_supports_amp_scaling", False):
                raise TypeError(
                    f"{type(self).__name__} uses {type(optimizer).__name__} without found_inf support; build "
                    "optimizers with trainers.base.adamw (fused AdamW) so non-finite steps are skipped on the device"
                )

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            optimizer.found_inf = self.nonfinite_flag(grads)  # read by the fused AdamW kernel: no update when 1

    def nonfinite_flag(self, grads: list[torch.Tensor], losses: torch.Tensor | None = None) -> torch.Tensor:
        """``found_inf`` (float 0-d tensor, 1 = skip) for one optimizer step, without a host sync.

        Logs the gradient norm of ``grads`` as ``train/grad_norm`` and updates the skip counters. ``losses``
        (optional) are also checked: stages with several optimizers (GAN) pass every loss of the iteration and
        all gradients, then hand the same flag to each optimizer so they skip together.
        """
        norm = torch.linalg.vector_norm(torch.stack([n.float() for n in torch._foreach_norm(grads)]))
        bad = ~torch.isfinite(norm)
        if losses is not None:
            bad = bad | ~torch.isfinite(losses).all()
        if self._nonfinite_run is None or self._nonfinite_run.device != norm.device:
            self._nonfinite_run = torch.zeros((), dtype=torch.int64, device=norm.device)
            self._nonfinite_total = torch.zeros((), dtype=torch.int64, device=norm.device)
        self._nonfinite_run = torch.where(bad, self._nonfinite_run + 1, 0)
        self._nonfinite_total = self._nonfinite_total + bad
        if self.logs_this_step:
            self.log("train/grad_norm", norm, on_step=True, on_epoch=False)
            self.log("train/skipped_steps", self._nonfinite_total.float(), on_step=True, on_epoch=False)
        return bad.float()

    @property
    def logs_this_step(self) -> bool:
        """Whether Lightning writes logs after this training step (every ``log_every_n_steps``).

        ``self.log`` costs a few hundred microseconds of host time per call, so per-step diagnostics are only
        logged on the steps that reach the logger.
        """
        connector = getattr(self.trainer, "_logger_connector", None)
        return bool(getattr(connector, "should_update_logs", True))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        skipped = getattr(self.trainer.datamodule, "skipped_samples", None)  # host int kept by the datamodule
        if skipped is not None and self.logs_this_step:
            self.log("data/skipped_samples", float(skipped), on_step=True, on_epoch=False)
        step = self.trainer.global_step
        if self._nonfinite_run is None or step == self._last_nonfinite_check:
            return
        if step % max(1, self.trainer.log_every_n_steps) != 0:
            return
        self._last_nonfinite_check = step
        run = int(self._nonfinite_run)  # the only host read, every log_every_n_steps steps
        if run >= self.max_consecutive_nonfinite:
            path = str(checkpoint_folder(self.trainer) / f"nonfinite-step={step}.ckpt")
            self.trainer.save_checkpoint(path)
            raise NonFiniteLossError(
                f"{run} consecutive optimizer steps had a non-finite loss or gradient (limit "
                f"max_consecutive_nonfinite={self.max_consecutive_nonfinite}); stopped at step {step}. Skipped steps "
                f"left the weights at the last finite step; they are saved in {path}. Lower the learning rate or "
                f"check the data, then resume with --ckpt_path {path}"
            )


def checkpoint_folder(trainer: Trainer) -> Path:
    """Where the run's checkpoints go: the ``ModelCheckpoint`` folder, else ``trainer.default_root_dir``."""
    return Path(getattr(trainer.checkpoint_callback, "dirpath", None) or trainer.default_root_dir)


def _names(keys: list[str], limit: int = 20) -> str:
    if not keys:
        return "[]"
    shown = ", ".join(keys[:limit])
    return f"[{shown}{f', ... ({len(keys) - limit} more)' if len(keys) > limit else ''}]"

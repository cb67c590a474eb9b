"""Exponential moving average of the *trainable* parameters, exported in place of the raw weights.

Why not Lightning's ``EMAWeightAveraging`` (2.6): it deep-copies and averages the whole LightningModule, frozen parts
included (the aligner's frozen SD UNet, VAE and MAE would be duplicated and averaged every step), and its checkpoint
swap writes averaged weights into ``state_dict``. This callback keeps fp32 shadows of the parameters with
``requires_grad=True`` only, updates them with one ``torch._foreach_lerp_`` per step (no host sync), swaps them in for
validation (so image grids show the EMA model) and stores them in the callback's checkpoint state, where
``trainers.export`` finds them. A run resumed from a checkpoint without EMA state starts the EMA from the restored
weights. Not for sharded strategies (FSDP/DeepSpeed ZeRO-3): parameters must be whole on every rank. ``ema = decay·ema + (1-decay)·θ``; before ``start_step`` the shadow copies the weights.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

__all__ = ["EMA", "EMA_STATE_KEY", "find_ema_state"]

EMA_STATE_KEY = "ema_shadow"  # {parameter name: tensor} inside the callback's checkpoint state


class EMA(Callback):
    """EMA of trainable parameters. ``decay`` per optimizer step, updated every ``every_n_steps`` from ``start_step``."""

    def __init__(self, decay: float = 0.9999, start_step: int = 0, every_n_steps: int = 1) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {decay}")
        if start_step < 0 or every_n_steps < 1:
            raise ValueError(f"need start_step >= 0 and every_n_steps >= 1, got {start_step}, {every_n_steps}")
        self.decay, self.start_step, self.every_n_steps = decay, start_step, every_n_steps
        self._names: list[str] = []
        self._params: list[torch.nn.Parameter] = []
        self._shadow: list[torch.Tensor] = []
        self._pending: dict[str, torch.Tensor] | None = None
        self._last_step = 0

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        named = [(name, p) for name, p in pl_module.named_parameters() if p.requires_grad]
        self._names = [name for name, _ in named]
        self._params = [p for _, p in named]

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # After checkpoint restoration and device placement: start from the restored EMA state when there is one,
        # else from the current (possibly restored) weights.
        pending, self._pending = self._pending, None
        with torch.no_grad():
            if pending is None:
                self._shadow = [p.detach().float().clone() for p in self._params]
            else:
                self._shadow = [pending[name].to(device=p.device, dtype=torch.float32) for name, p in
                                zip(self._names, self._params)]

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_step or step % self.every_n_steps != 0:
            return
        self._last_step = step
        current = [p.detach().float() for p in self._params]
        if step <= self.start_step:
            torch._foreach_copy_(self._shadow, current)
        else:
            torch._foreach_lerp_(self._shadow, current, 1.0 - self.decay)

    def _swap(self) -> None:
        with torch.no_grad():
            for shadow, param in zip(self._shadow, self._params):
                held = param.detach().clone()
                param.copy_(shadow)
                shadow.copy_(held)

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._shadow:
            self._swap()

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._shadow:
            self._swap()

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self._last_step, EMA_STATE_KEY: dict(zip(self._names, self._shadow))}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        shadow = state_dict[EMA_STATE_KEY]
        missing = sorted(set(self._names) - set(shadow))
        unexpected = sorted(set(shadow) - set(self._names))
        if missing or unexpected:
            raise KeyError(f"EMA state does not match the trainable parameters: missing {missing}, unexpected {unexpected}")
        self._last_step = state_dict["last_step"]
        if self._shadow:  # strategies that restore after setup (restore_checkpoint_after_setup) come here late
            with torch.no_grad():
                for name, tensor in zip(self._names, self._shadow):
                    tensor.copy_(shadow[name])
        else:
            self._pending = shadow  # applied in on_fit_start

def find_ema_state(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The EMA shadow weights stored in a Lightning checkpoint by :class:`EMA`, or ``None``."""
    for state in checkpoint.get("callbacks", {}).values():
        if isinstance(state, dict) and EMA_STATE_KEY in state:
            return state[EMA_STATE_KEY]
    return None

"""Gradient checkpointing of one sub-module, the diffusers way (``enable_gradient_checkpointing()``)."""

from __future__ import annotations

import torch
from torch import nn


def run_module(owner: nn.Module, module: nn.Module, *args):
    """``module(*args)``, recomputed in the backward pass when ``owner`` has gradient checkpointing on (diffusers'
    ``enable_gradient_checkpointing`` sets ``gradient_checkpointing`` and ``_gradient_checkpointing_func``) and
    gradients are being recorded."""
    if owner.gradient_checkpointing and torch.is_grad_enabled():
        return owner._gradient_checkpointing_func(module, *args)
    return module(*args)

"""A ready-made reading control: keep the maps of every call, in call order."""

from __future__ import annotations

from typing import Callable

import torch

from asuka.attention.control import AttentionCall, AttentionControl, CallState, Read
from asuka.attention.layers import AttentionLayer


class AttentionStore(AttentionControl):
    """Stores the maps described by ``read`` for every active call (RASG logits, steer-loss probs, ...).

    ``when(layer, state)`` gates storing (default: always). ``maps`` and ``layers`` are parallel lists in
    call order; :meth:`clear` empties them - call it before every UNet call whose maps you want, so no
    graph outlives its step. With ``read.grad`` the maps keep their autograd graph. Under UNet gradient
    checkpointing (diffusers recomputes blocks in backward when grad is enabled) processors run again
    during backward: run that backward inside ``controller.replaying()`` so the store does not receive those calls.
    """

    def __init__(self, read: Read, when: Callable[[AttentionLayer, CallState], bool] | None = None):
        self.read = read
        self.when = when
        self.maps: list[torch.Tensor] = []
        self.layers: list[AttentionLayer] = []

    def active(self, layer: AttentionLayer, state: CallState) -> bool:
        return self.when is None or self.when(layer, state)

    def on_read(self, call: AttentionCall, maps: torch.Tensor) -> None:
        self.maps.append(maps)
        self.layers.append(call.layer)

    def clear(self) -> None:
        self.maps.clear()
        self.layers.clear()

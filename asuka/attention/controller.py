"""Install controls on selected layers of one UNet, as a context manager that restores exactly.

::

    controller = AttentionController(unet)
    cross = controller.layers.select(kind="cross", levels=2)
    store = controller.add(AttentionStore(Read("scores", batch="cond", heads="each", grad=True)), cross)
    with controller:                       # installs; restores every processor on exit or exception
        controller.state.cfg = True
        controller.state.timestep = int(t)
        eps = unet(torch.cat([z, z]), t, encoder_hidden_states=emb).sample

All state lives on the controller (``controller.state``, a :class:`CallState`) and on the controls;
nothing is global, so two pipelines in one process never interfere. Nesting works: a controller
entered while another one is installed on the same UNet adds its controls to the same layers and
gives the outer ones back on exit (exit in reverse order of entry).
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Iterable, Iterator, TypeVar

from torch import nn

from asuka.attention.control import AttentionControl, CallState
from asuka.attention.layers import AttentionLayer, LayerTable
from asuka.attention.processor import ControlEntry, ControlledAttnProcessor

C = TypeVar("C", bound=AttentionControl)


class AttentionController:
    """Controls for one UNet: which control goes on which layer, the per-call state, install/restore."""

    def __init__(self, unet: nn.Module):
        self.unet = unet
        self.layers = LayerTable(unet)
        self.state = CallState()
        self._plan: dict[int, list[AttentionControl]] = {}
        self._installed: list[tuple[nn.Module, object, ControlledAttnProcessor]] | None = None
        self._hooks: list = []

    @property
    def installed(self) -> bool:
        return self._installed is not None

    def add(self, control: C, layers: AttentionLayer | Iterable[AttentionLayer]) -> C:
        """Put ``control`` on ``layers`` (one layer, a selection, any iterable); returns the control."""
        if self.installed:
            raise RuntimeError("add controls before entering the controller's context")
        if isinstance(layers, AttentionLayer):
            layers = [layers]
        for layer in layers:
            if layer.index >= len(self.layers) or self.layers[layer.index].module is not layer.module:
                raise ValueError(f"{layer!r} is not a layer of this controller's UNet")
            self._plan.setdefault(layer.index, []).append(control)
        return control

    @contextmanager
    def replaying(self) -> Iterator[None]:
        """Wrap the backward (``torch.autograd.grad`` / ``loss.backward()``) of a UNet with gradient checkpointing:
        autograd re-runs the checkpointed layers inside it, and their reads are not delivered again, so every read
        reaches its control once per forward call (a store or a vote does not count a layer twice). Everything else
        runs as in the forward, so the recomputation equals it."""
        previous, self.state.replaying = self.state.replaying, True
        try:
            yield
        finally:
            self.state.replaying = previous

    def __enter__(self) -> "AttentionController":
        if self.installed:
            raise RuntimeError("this controller is already installed; create a second controller to nest")
        self._installed = []
        try:
            self._hooks.append(self.unet.register_forward_pre_hook(self._record_input, with_kwargs=True))
            for index in sorted(self._plan):
                self._install_layer(self.layers[index], self._plan[index])
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _install_layer(self, layer: AttentionLayer, controls: list[AttentionControl]) -> None:
        attn = layer.module
        current = attn.processor
        entries = tuple(ControlEntry(control, self.state) for control in controls)
        if isinstance(current, ControlledAttnProcessor):  # nested: add to the outer controller's controls
            processor = ControlledAttnProcessor(layer, current.original, current.entries + entries)
        else:
            processor = ControlledAttnProcessor(layer, current, entries)
        attn.set_processor(processor)
        self._installed.append((attn, current, processor))
        if any(control.needs_block_input for control in controls):
            self._hooks.append(layer.transformer_block.register_forward_pre_hook(
                _block_input_recorder(layer), with_kwargs=True))

    def _restore(self) -> None:
        installed, self._installed = self._installed or [], None
        hooks, self._hooks = self._hooks, []
        for hook in hooks:
            hook.remove()
        out_of_order = []
        for attn, previous, processor in reversed(installed):
            if attn.processor is not processor:
                out_of_order.append(processor.layer.name)
            attn.set_processor(previous)
        if out_of_order:
            raise RuntimeError(f"attention processors of {out_of_order[:3]} were replaced inside the controller's "
                               "context (a nested controller exited late, or set_attn_processor was called); "
                               "the processors from before the context are restored")

    def _record_input(self, module, args, kwargs) -> None:
        sample = args[0] if args else kwargs["sample"]
        self.state.latent_size = (sample.shape[-2], sample.shape[-1])
        self.state.batch_size = sample.shape[0]


def _block_input_recorder(layer: AttentionLayer):
    """Forward pre-hook on a transformer block: hands its inputs to the layer's controlled processor."""
    names = list(inspect.signature(layer.transformer_block.forward).parameters)
    # positions found once here: Signature.bind_partial at call time is a torch.compile graph break (dynamo cannot
    # trace inspect's mappingproxy use), which made dynamo skip the whole UNet frame

    def argument(args, kwargs, name):
        if name in kwargs:
            return kwargs[name]
        index = names.index(name) if name in names else len(args)
        return args[index] if index < len(args) else None

    def record(block, args, kwargs):
        processor = layer.module.processor
        if isinstance(processor, ControlledAttnProcessor):
            processor.block_input = argument(args, kwargs, "hidden_states")
            processor.block_encoder_hidden_states = argument(args, kwargs, "encoder_hidden_states")

    return record

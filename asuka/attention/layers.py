"""The attention layers of a ``UNet2DConditionModel`` in execution order, and selections of them.

``unet.attn_processors`` lists layers in *registration* order: ``UNet2DConditionModel.__init__``
creates ``down_blocks`` and ``up_blocks`` before ``mid_block``, so the mid block comes last. The
training-free methods number layers in *forward* order (down -> mid -> up; MasaCtrl's convention,
used by HarmonPaint's "self-attention layers 2-6", CorrFill's vote layers 7-15 and PILOT's
``attn_loss_bank[2:13]``). :class:`LayerTable` gives that order, each layer's place in the UNet, its
resolution level and token grid, and selections by kind, level, execution index and name.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

from diffusers.models.attention_processor import Attention
from torch import nn

KINDS = ("self", "cross")


@dataclass(frozen=True, eq=False)
class AttentionLayer:
    """One attention module of the UNet.

    ``index`` counts every attention layer in execution order; ``kind_index`` counts only layers of
    the same ``kind`` ("self" or "cross"), which is the numbering the papers use (SD-1.5: self 0-15,
    cross 0-15). ``place`` is "down", "mid" or "up"; ``block``, ``attention`` and ``transformer``
    are the indices in ``down_blocks[block].attentions[attention].transformer_blocks[transformer]``
    (``block`` is 0 for the mid block). ``level`` is the resolution level: 0 at the latent
    resolution, 1 at latent/2, 2 at latent/4, 3 at latent/8. ``transformer_block`` is the module
    around the layer (e.g. a ``BasicTransformerBlock``), ``module`` the ``Attention`` itself.
    """

    index: int
    kind_index: int
    name: str
    kind: str
    place: str
    block: int
    attention: int
    transformer: int
    level: int
    module: Attention
    transformer_block: nn.Module

    def grid(self, latent_size: tuple[int, int]) -> tuple[int, int]:
        """Token grid (h, w) of this layer for a latent of ``latent_size`` (h, w), non-square included.

        Each downsampler of SD's UNet is a stride-2 3x3 convolution with padding 1, so a level halves
        the size rounding up; the up path restores exactly the sizes of the down path.
        """
        return grid_at_level(latent_size, self.level)

    def __repr__(self) -> str:
        return f"AttentionLayer({self.index}: {self.name}, {self.kind} #{self.kind_index}, level {self.level})"


def grid_at_level(latent_size: tuple[int, int], level: int) -> tuple[int, int]:
    """(h, w) after ``level`` stride-2 downsamplings of a (h, w) latent (ceil division each time)."""
    h, w = latent_size
    for _ in range(level):
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w


def _block_levels(unet: nn.Module) -> list[tuple[str, int, nn.Module, int]]:
    """(place, block index, block, level) in forward order: down blocks, the mid block, up blocks."""
    out, level = [], 0
    for i, block in enumerate(unet.down_blocks):
        out.append(("down", i, block, level))
        if getattr(block, "downsamplers", None) is not None:
            level += 1
    if getattr(unet, "mid_block", None) is not None:
        out.append(("mid", 0, unet.mid_block, level))
    for i, block in enumerate(unet.up_blocks):
        out.append(("up", i, block, level))
        if getattr(block, "upsamplers", None) is not None:
            level -= 1
    return out


def blocks_after(unet: nn.Module, layer: AttentionLayer) -> list[nn.Module]:
    """The UNet's top-level blocks (down, mid, up) that run after the one holding ``layer``, in forward order: the
    part of the forward whose output no quantity read at ``layer`` depends on."""
    order = _block_levels(unet)
    position = next(i for i, (place, index, _, _) in enumerate(order) if (place, index) == (layer.place, layer.block))
    return [block for _, _, block, _ in order[position + 1:]]


def _indices_after(name: str, word: str) -> int:
    parts = name.split(".")
    return int(parts[parts.index(word) + 1]) if word in parts else 0


def _parent(root: nn.Module, name: str) -> nn.Module:
    parent_name = name.rsplit(".", 1)[0] if "." in name else ""
    return root.get_submodule(parent_name) if parent_name else root


class LayerTable(Sequence[AttentionLayer]):
    """Attention layers in execution order; also the result type of every selection.

    Only the layers of the denoising path (down, mid and up blocks) are listed: ``Attention`` modules
    elsewhere, such as IP-Adapter-Plus's image resampler under ``encoder_hid_proj``, are not image
    attention layers and are left out.

    Build it from a UNet (``LayerTable(unet)``); it reads module structure only, so it works on the
    meta device. Select with :meth:`select` (all criteria are combined with "and").
    """

    def __init__(self, unet_or_layers: nn.Module | Iterable[AttentionLayer]):
        if isinstance(unet_or_layers, nn.Module):
            self._layers = tuple(_collect(unet_or_layers))
        else:
            self._layers = tuple(unet_or_layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return LayerTable(self._layers[i])
        return self._layers[i]

    def __iter__(self) -> Iterator[AttentionLayer]:
        return iter(self._layers)

    def __repr__(self) -> str:
        return "LayerTable([\n" + "".join(f"  {layer!r},\n" for layer in self._layers) + "])"

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self._layers]

    def by_name(self, name: str) -> AttentionLayer:
        """The layer with module name ``name`` (a trailing ``.processor`` is accepted)."""
        name = name.removesuffix(".processor")
        for layer in self._layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no attention layer named {name!r}")

    def select(
        self,
        kind: str | None = None,
        levels: int | Iterable[int] | None = None,
        indices: int | Iterable[int] | None = None,
        names: str | Iterable[str] | None = None,
        places: str | Iterable[str] | None = None,
        exclude_levels: int | Iterable[int] | None = None,
    ) -> "LayerTable":
        """Layers matching every given criterion, in execution order.

        kind: "self" or "cross". levels / exclude_levels: resolution levels (0 = latent/1, 1 = /2,
        2 = /4, 3 = /8). indices: execution indices *within the selected kind* when ``kind`` is given
        (``kind_index``, e.g. HarmonPaint's self-attention layers ``range(2, 7)``), else over all
        layers; negative indices count from the end (``range(-8, 0)`` = the last 8). names:
        ``fnmatch`` patterns on the module name (e.g. ``"up_blocks.*"``). places: "down", "mid", "up".
        """
        if kind is not None and kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        layers = [layer for layer in self._layers if kind is None or layer.kind == kind]
        if indices is not None:
            wanted = {indices} if isinstance(indices, int) else set(indices)
            n = len(layers)
            bad = [i for i in wanted if not -n <= i < n]
            if bad:
                raise ValueError(f"indices {sorted(bad)} out of range for {n} {kind or 'attention'} layers")
            wanted = {i % n for i in wanted}
            layers = [layer for pos, layer in enumerate(layers) if pos in wanted]
        if levels is not None:
            keep = {levels} if isinstance(levels, int) else set(levels)
            layers = [layer for layer in layers if layer.level in keep]
        if exclude_levels is not None:
            drop = {exclude_levels} if isinstance(exclude_levels, int) else set(exclude_levels)
            layers = [layer for layer in layers if layer.level not in drop]
        if places is not None:
            keep_places = {places} if isinstance(places, str) else set(places)
            layers = [layer for layer in layers if layer.place in keep_places]
        if names is not None:
            patterns = [names] if isinstance(names, str) else list(names)
            layers = [layer for layer in layers if any(fnmatch.fnmatchcase(layer.name, p) for p in patterns)]
        return LayerTable(layers)


def _collect(unet: nn.Module) -> list[AttentionLayer]:
    names_of = {id(module): name for name, module in unet.named_modules()}
    layers: list[AttentionLayer] = []
    counts = {kind: 0 for kind in KINDS}
    for place, block_index, block, level in _block_levels(unet):
        for module in block.modules():
            if not isinstance(module, Attention):
                continue
            name = names_of[id(module)]
            kind = "cross" if module.is_cross_attention else "self"
            layers.append(AttentionLayer(
                index=len(layers),
                kind_index=counts[kind],
                name=name,
                kind=kind,
                place=place,
                block=block_index,
                attention=_indices_after(name, "attentions"),
                transformer=_indices_after(name, "transformer_blocks"),
                level=level,
                module=module,
                transformer_block=_parent(unet, name),
            ))
            counts[kind] += 1
    return layers

"""One attention-control mechanism for the training-free methods (HD-Painter, PILOT, CorrFill, HarmonPaint).

- :class:`LayerTable` / :class:`AttentionLayer`: every attention layer of a UNet in execution order,
  with kind, place, level, token grid and transformer block; selections.
- :class:`AttentionController`: puts controls on selected layers, carries the per-call
  :class:`CallState`, installs as a context manager and restores exactly.
- :class:`AttentionControl`: the hooks a control overrides (reads, additive / multiplicative score
  edits, post-softmax weights and edits, key/value extension); :class:`AttentionCall` is what they see.
- :class:`AttentionStore`, :class:`TokenMasks`: a ready-made reading control and per-grid masks.
"""

from asuka.attention.control import AttentionCall, AttentionControl, CallState, Read, RowBias
from asuka.attention.controller import AttentionController
from asuka.attention.functional import weighted_sdpa
from asuka.attention.layers import AttentionLayer, LayerTable, blocks_after, grid_at_level
from asuka.attention.masks import TokenMasks, resize_nearest
from asuka.attention.processor import ControlledAttnProcessor, is_ip_adapter
from asuka.attention.store import AttentionStore

__all__ = [
    "AttentionCall",
    "AttentionControl",
    "AttentionController",
    "AttentionLayer",
    "AttentionStore",
    "CallState",
    "ControlledAttnProcessor",
    "LayerTable",
    "Read",
    "RowBias",
    "TokenMasks",
    "blocks_after",
    "grid_at_level",
    "is_ip_adapter",
    "resize_nearest",
    "weighted_sdpa",
]

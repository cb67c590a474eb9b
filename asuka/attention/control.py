"""What a control is: the hooks a method overrides, and the per-call information they receive.

A control is an :class:`AttentionControl` subclass that overrides only the hooks it needs. The
controlled processor asks every control installed on a layer, at every call of that layer:

1. :meth:`~AttentionControl.active` ``(layer, state)`` (a plain Python bool: a timestep, phase or
   flag test, never a tensor test). When no control of a layer is active, the layer runs the processor it had before
   (diffusers' own SDPA processor, an IP-Adapter processor, ...), untouched.
2. :meth:`~AttentionControl.keys_values` - extend or replace keys and values (HarmonPaint's MAKVS).
3. :meth:`~AttentionControl.score_bias` - an additive pre-softmax edit (−inf masks or finite
   strengths). Stays on SDPA. :meth:`~AttentionControl.row_bias` - the same on some query rows and
   samples only (:class:`RowBias`; CorrFill's attention masking of target rows in the cond half).
4. :meth:`~AttentionControl.score_factor` - a multiplicative pre-softmax edit (PAIntA). Dense.
5. :meth:`~AttentionControl.prob_weight` - a post-softmax weighting without renormalisation given in
   low-rank form ``W = Σ_r rows_r cols_rᵀ`` (HarmonPaint's SAMS, PILOT's SBC). Stays on SDPA.
6. :meth:`~AttentionControl.edit_probs` - any post-softmax edit on the dense probabilities. Dense.
7. reads (``read = Read(...)`` and :meth:`~AttentionControl.on_read`) - receive the layer's raw
   scores or probabilities (before any edit of this layer), detached or with autograd, for the
   conditional CFG half or the whole batch, per head or head-mean, optionally for some query rows
   (:meth:`~AttentionControl.read_rows`) and keys (:meth:`~AttentionControl.read_keys`).

Hooks return ``None`` for "no edit". The order of edits is fixed: keys/values, then
``scores = (q kᵀ·scale) ⊙ factor + bias + attention_mask (+ row bias)``, softmax, then weights and prob edits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from asuka.attention.layers import AttentionLayer

if TYPE_CHECKING:
    from asuka.attention.functional import LowRankWeight


@dataclass
class CallState:
    """Per-UNet-call state shared by every control of one controller; the pipeline sets it.

    timestep / step / phase: set before each UNet call (Python values, used by ``active`` gates).
    cfg: the batch is ``[uncond, cond]`` halves (classifier-free guidance); "cond" reads and
    per-sample masks use it. latent_size / batch_size: recorded automatically from the UNet input
    at each call (shapes only; no host sync). replaying: see below.
    """

    timestep: float | int | None = None
    step: int | None = None
    phase: str = "main"
    cfg: bool = False
    latent_size: tuple[int, int] | None = None
    batch_size: int | None = None
    replaying: bool = False
    """True while autograd re-runs checkpointed layers inside a backward (:meth:`AttentionController.replaying`):
    reads are computed as in the forward (checkpointing checks that the recomputation saves the same tensors) but not
    delivered again (the forward delivered them); edits apply as in the forward."""


@dataclass(frozen=True)
class Read:
    """What a reading control receives in :meth:`AttentionControl.on_read`.

    what: "scores" (pre-softmax ``q kᵀ·scale + attention_mask``, float32) or "probs" (their softmax).
    batch: "cond" (second CFG half when ``state.cfg``, else the whole batch) or "all".
    heads: "each" -> (B', H, Nq', Nk'); "mean" -> (B', Nq', Nk') (computed in tiles of one head and a few
    rows, so no (B, H, Nq, Nk) tensor is formed, with or without a gradient: the probabilities' backward is
    hand-written and recomputes each tile, :func:`asuka.attention.functional.head_mean_probs`).
    grad: keep the autograd graph (under ``torch.enable_grad()``); else computed under no_grad.
    """

    what: Literal["scores", "probs"] = "probs"
    batch: Literal["cond", "all"] = "cond"
    heads: Literal["each", "mean"] = "mean"
    grad: bool = False

    def __post_init__(self):
        if self.what not in ("scores", "probs"):
            raise ValueError(f"Read.what must be 'scores' or 'probs', got {self.what!r}")
        if self.batch not in ("cond", "all"):
            raise ValueError(f"Read.batch must be 'cond' or 'all', got {self.batch!r}")
        if self.heads not in ("each", "mean"):
            raise ValueError(f"Read.heads must be 'each' or 'mean', got {self.heads!r}")


@dataclass(frozen=True)
class RowBias:
    """An additive pre-softmax term for some query rows of some samples only (returned by ``row_bias``).

    rows: 1-D index tensor over Nq. bias: broadcastable to (B_sel, H|1, len(rows), Nk). batch: the
    samples it applies to (e.g. ``call.cond``); None = all. Only those rows are recomputed with it, so
    no (B, 1, N, N) tensor is ever built (CorrFill masks target-query rows of the cond half).
    """

    rows: torch.Tensor
    bias: torch.Tensor
    batch: slice | None = None

    def batch_slice(self, batch_size: int) -> slice:
        start, stop, step = (self.batch or slice(None)).indices(batch_size)
        if step != 1:
            raise ValueError("RowBias.batch must be a contiguous slice")
        return slice(start, stop)


class AttentionCall:
    """Everything a control may look at during one call of one layer.

    layer: the :class:`AttentionLayer`. state: the controller's :class:`CallState`.
    query / key / value: (B, H, N, d) after projection (key/value as edited by earlier controls).
    attention_mask: the layer's own mask as (B, H, 1|Nq, Nk) or None. grid: (h, w) token grid of
    the queries. batch_size, heads, tokens (Nq), scale. block_input / block_encoder_hidden_states:
    the transformer block's inputs, for controls with ``needs_block_input = True``.
    attn: the diffusers ``Attention`` module. ``original_output()``: what the layer's previous
    processor returns for this call (computed once, on demand; PAIntA's vanilla ``Y``).
    """

    __slots__ = ("layer", "state", "attn", "query", "key", "value", "attention_mask", "hidden_states",
                 "encoder_hidden_states", "grid", "block_input", "block_encoder_hidden_states", "_original",
                 "_original_output")

    def __init__(self, layer: AttentionLayer, state: CallState, attn, hidden_states, encoder_hidden_states,
                 query, key, value, attention_mask, grid, block_input, block_encoder_hidden_states, original):
        self.layer = layer
        self.state = state
        self.attn = attn
        self.hidden_states = hidden_states
        self.encoder_hidden_states = encoder_hidden_states
        self.query = query
        self.key = key
        self.value = value
        self.attention_mask = attention_mask
        self.grid = grid
        self.block_input = block_input
        self.block_encoder_hidden_states = block_encoder_hidden_states
        self._original = original
        self._original_output = None

    @property
    def batch_size(self) -> int:
        return self.query.shape[0]

    @property
    def heads(self) -> int:
        return self.query.shape[1]

    @property
    def tokens(self) -> int:
        return self.query.shape[2]

    @property
    def scale(self) -> float:
        return self.attn.scale

    @property
    def cond(self) -> slice:
        """Batch slice of the conditional samples: the second half under CFG, else everything."""
        return cond_slice(self.batch_size, self.state.cfg)

    def original_output(self) -> torch.Tensor:
        """Output of the layer's previous processor for this call (cached)."""
        if self._original_output is None:
            self._original_output = self._original()
        return self._original_output


def cond_slice(batch_size: int, cfg: bool) -> slice:
    if not cfg:
        return slice(0, batch_size)
    if batch_size % 2:
        raise ValueError(f"state.cfg is True but the UNet batch has odd size {batch_size}; "
                         "set controller.state.cfg = False for unguided calls")
    return slice(batch_size // 2, batch_size)


class AttentionControl:
    """Base class of every control. Override only the hooks you need (see the module docstring).

    Attributes: ``read`` (a :class:`Read` or None; looked up at every call, so it may be a property
    that changes with the phase) and ``needs_block_input`` (read at installation: the processor then
    receives the transformer block's inputs through a forward pre-hook installed only on the layers
    of this control).
    """

    read: Read | None = None
    needs_block_input: bool = False

    def active(self, layer: AttentionLayer, state: CallState) -> bool:
        """Whether this control acts on this call of ``layer`` (Python values only; never test tensors here)."""
        return True

    def keys_values(self, call: AttentionCall, key: torch.Tensor, value: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Return new (key, value) of shape (B, H, Nk', d) to extend or replace them, or None."""
        return None

    def score_bias(self, call: AttentionCall) -> torch.Tensor | None:
        """Additive pre-softmax term broadcastable to (B, H, Nq, Nk), or None."""
        return None

    def row_bias(self, call: AttentionCall) -> RowBias | None:
        """Additive pre-softmax term on some query rows (and samples) only; SDPA reruns just those rows."""
        return None

    def score_factor(self, call: AttentionCall) -> torch.Tensor | None:
        """Multiplicative factor on ``q kᵀ·scale`` broadcastable to (B, H, Nq, Nk), or None. Dense."""
        return None

    def prob_weight(self, call: AttentionCall) -> "LowRankWeight | None":
        """Post-softmax weight ``W = rows @ colsᵀ`` as (rows (B|1, H|1, Nq, R), cols (B|1, H|1, Nk, R))."""
        return None

    def edit_probs(self, call: AttentionCall, probs: torch.Tensor) -> torch.Tensor:
        """Edit dense probabilities (B, H, Nq, Nk). Overriding this makes the layer dense when active."""
        return probs

    def read_rows(self, call: AttentionCall) -> torch.Tensor | None:
        """Query rows to read (a 1-D index tensor over Nq), or None for all rows."""
        return None

    def read_keys(self, call: AttentionCall) -> torch.Tensor | None:
        """Keys to read (a 1-D index tensor over Nk), or None for all. The softmax still runs over every key: only
        the returned columns are limited (a head-mean read then never forms the other columns' probabilities)."""
        return None

    def on_read(self, call: AttentionCall, maps: torch.Tensor) -> None:
        """Receive the maps described by ``read``."""

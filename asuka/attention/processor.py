"""The one attention processor that runs controls on a layer (installed by :class:`AttentionController`).

When none of its controls is active for a call, it calls the processor the layer had before (the
"original": diffusers' SDPA processor, an IP-Adapter processor, whatever the user set), so the layer
is exactly what it was. Otherwise it recomputes the layer as diffusers' ``AttnProcessor2_0`` does,
with the controls' edits, on SDPA unless a dense edit is requested; an IP-Adapter original keeps its
image branch (its trained ``to_k_ip`` / ``to_v_ip`` weights are used, unmasked, as diffusers does).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from diffusers.image_processor import IPAdapterMaskProcessor
from torch import nn

from asuka.attention.control import AttentionCall, AttentionControl, CallState, RowBias
from asuka.attention.functional import (
    attention_scores,
    combine_low_rank,
    dense_low_rank,
    head_mean_probs,
    merge_heads,
    split_heads,
    weighted_sdpa,
)
from asuka.attention.layers import AttentionLayer

READ_TILE_ELEMENTS = 1 << 24  # head-mean reads on an accelerator: scores per tile (64 MiB in float32)
READ_TILE_ELEMENTS_CPU = 1 << 21  # on CPU: 8 MiB in float32, within the last-level cache
_HOOKS = ("keys_values", "score_bias", "row_bias", "score_factor", "prob_weight", "edit_probs")


def _overrides(control: AttentionControl, hook: str) -> bool:
    return getattr(type(control), hook) is not getattr(AttentionControl, hook)


@dataclass(frozen=True)
class ControlEntry:
    """A control on a layer, the state of the controller that installed it, and the hooks it overrides."""

    control: AttentionControl
    state: CallState
    hooks: frozenset[str] = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "hooks", frozenset(h for h in _HOOKS if _overrides(self.control, h)))


def is_ip_adapter(processor) -> bool:
    """Whether ``processor`` is one of diffusers' IP-Adapter processors (decoupled image cross-attention)."""
    return all(hasattr(processor, name) for name in ("to_k_ip", "to_v_ip", "num_tokens", "scale"))


def _accepted_kwargs(processor) -> set[str] | None:
    """Keyword names the processor's ``__call__`` declares (None: it takes ``**kwargs``)."""
    params = inspect.signature(processor.__call__).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


class ControlledAttnProcessor(nn.Module):
    """Runs the controls of one layer; delegates to ``original`` when none is active.

    It is an ``nn.Module`` so that an original that holds weights (IP-Adapter) stays registered
    under the attention module while installed (``unet.to(...)`` and offloading still reach it).
    """

    def __init__(self, layer: AttentionLayer, original, entries: tuple[ControlEntry, ...]):
        super().__init__()
        self.layer = layer
        self.original = original
        self.entries = tuple(entries)
        self.needs_block_input = any(e.control.needs_block_input for e in self.entries)
        self.ip_adapter = original if is_ip_adapter(original) else None
        self._original_kwargs = _accepted_kwargs(original)
        self.block_input = None
        self.block_encoder_hidden_states = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 ip_adapter_masks=None, **kwargs):
        # ``__call__`` itself (not ``forward``): diffusers' Attention.forward passes on only the keyword
        # arguments named in ``inspect.signature(processor.__call__)`` (e.g. ``ip_adapter_masks``)
        try:
            active = [e for e in self.entries if e.control.active(self.layer, e.state)]
            if not active:
                return self._run_original(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                                          ip_adapter_masks, kwargs)
            return self._run_controlled(active, attn, hidden_states, encoder_hidden_states, attention_mask,
                                        temb, ip_adapter_masks, kwargs)
        finally:
            # never keep a block input (and its graph) beyond the call that used it
            self.block_input = None
            self.block_encoder_hidden_states = None

    def _run_original(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb, ip_adapter_masks,
                      kwargs):
        extra = dict(kwargs)
        if temb is not None:
            extra["temb"] = temb
        if ip_adapter_masks is not None:
            extra["ip_adapter_masks"] = ip_adapter_masks
        if self._original_kwargs is not None:
            extra = {k: v for k, v in extra.items() if k in self._original_kwargs}
        return self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                             attention_mask=attention_mask, **extra)

    def _run_controlled(self, active, attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                        ip_adapter_masks, kwargs):
        raw = (hidden_states, encoder_hidden_states, attention_mask)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        ip_hidden_states = None
        if self.ip_adapter is not None and encoder_hidden_states is not None:
            if isinstance(encoder_hidden_states, tuple):
                encoder_hidden_states, ip_hidden_states = encoder_hidden_states
            else:  # diffusers' deprecated layout: image tokens appended to the text tokens
                end = encoder_hidden_states.shape[1] - self.ip_adapter.num_tokens[0]
                encoder_hidden_states, ip_hidden_states = (encoder_hidden_states[:, :end],
                                                           [encoder_hidden_states[:, end:]])

        batch_size = hidden_states.shape[0]
        key_length = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape[1]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, key_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        context = hidden_states
        if encoder_hidden_states is not None:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
        query = split_heads(attn.to_q(hidden_states), attn.heads)
        key = split_heads(attn.to_k(context), attn.heads)
        value = split_heads(attn.to_v(context), attn.heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        state = active[0].state
        grid = self.layer.grid(state.latent_size) if state.latent_size is not None else None

        def original():
            return self._run_original(attn, *raw, temb, ip_adapter_masks, kwargs)

        call = AttentionCall(self.layer, state, attn, hidden_states, encoder_hidden_states, query, key, value,
                             attention_mask, grid, self.block_input, self.block_encoder_hidden_states, original)

        for entry in active:
            read = entry.control.read
            if read is not None and not (entry.state.replaying and not read.grad):
                call.state = entry.state
                maps = _read_maps(entry.control, call, query, key, attention_mask)
                if not entry.state.replaying:  # re-run in a backward: a read with a graph is computed again
                    entry.control.on_read(call, maps)  # (checkpointing checks the same tensors are saved), not delivered

        for entry in active:  # keys and values first, so every later hook sees the final key count
            if "keys_values" in entry.hooks:
                call.state = entry.state
                edited = entry.control.keys_values(call, call.key, call.value)
                if edited is not None:
                    call.key, call.value = edited
        factor = bias = row_bias = None
        weights, prob_editors = [], []
        for entry in active:
            call.state = entry.state
            control = entry.control
            if "score_factor" in entry.hooks:
                f = control.score_factor(call)
                if f is not None:
                    factor = f if factor is None else factor * f
            if "score_bias" in entry.hooks:
                b = control.score_bias(call)
                if b is not None:
                    bias = b if bias is None else bias + b
            if "row_bias" in entry.hooks:
                rb = control.row_bias(call)
                if rb is not None:
                    if row_bias is not None:
                        raise ValueError(f"two controls returned a row_bias on {self.layer.name} in one call; "
                                         "combine them into one control")
                    row_bias = rb
            if "prob_weight" in entry.hooks:
                w = control.prob_weight(call)
                if w is not None:
                    weights.append(w)
            if "edit_probs" in entry.hooks:
                prob_editors.append(entry)

        key, value = call.key, call.value
        mask = _extend_mask(attention_mask, key.shape[2])
        if mask is not None:
            bias = mask if bias is None else bias + mask
        weight = combine_low_rank(weights) if weights else None

        if factor is not None or prob_editors:
            scores = attention_scores(query, key, attn.scale, factor=factor, bias=bias)
            if row_bias is not None:
                scores = _add_row_bias(scores, row_bias)
            probs = scores.softmax(-1)
            for entry in prob_editors:
                call.state = entry.state
                probs = entry.control.edit_probs(call, probs)
            if weight is not None:
                probs = probs * dense_low_rank(weight).to(probs.dtype)
            out = torch.matmul(probs.to(value.dtype), value)
        else:
            out = weighted_sdpa(query, key, value, weight, bias, _sdpa_scale(attn, query))
            if row_bias is not None:
                out = _rerun_rows(out, row_bias, query, key, value, weight, bias, _sdpa_scale(attn, query))

        hidden_states = merge_heads(out).to(query.dtype)
        if ip_hidden_states is not None:
            hidden_states = _add_ip_adapter(self.ip_adapter, attn, query, hidden_states, ip_hidden_states,
                                            ip_adapter_masks)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _sdpa_scale(attn, query: torch.Tensor) -> float | None:
    """None when the layer uses SDPA's default 1/sqrt(d) (bit-identical to diffusers' processors)."""
    return None if attn.scale == query.shape[-1] ** -0.5 else attn.scale


def _rows_of(t: torch.Tensor | None, batch: slice, rows: torch.Tensor) -> torch.Tensor | None:
    """``t[batch][:, :, rows]`` for a tensor that may broadcast (size 1) over batch or rows."""
    if t is None:
        return None
    if t.ndim < 4:
        t = t.reshape((1,) * (4 - t.ndim) + tuple(t.shape))
    if t.shape[0] != 1:
        t = t[batch]
    return t if t.shape[2] == 1 else t.index_select(2, rows)


def _put_rows(full: torch.Tensor, batch: slice, rows: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """Out of place: ``full`` with ``full[batch][:, :, rows]`` replaced by ``part`` (autograd-safe)."""
    middle = full[batch].index_copy(2, rows, part)
    return torch.cat([full[: batch.start], middle, full[batch.stop:]])


def _add_row_bias(scores: torch.Tensor, row_bias: RowBias) -> torch.Tensor:
    batch = row_bias.batch_slice(scores.shape[0])
    part = scores[batch].index_select(2, row_bias.rows) + row_bias.bias.to(scores.dtype)
    return _put_rows(scores, batch, row_bias.rows, part)


def _rerun_rows(out, row_bias: RowBias, query, key, value, weight, bias, scale) -> torch.Tensor:
    """SDPA again on the biased rows only (with every other edit), written into ``out``."""
    batch = row_bias.batch_slice(query.shape[0])
    rows = row_bias.rows
    row_weight = None
    if weight is not None:
        row_weight = (_rows_of(weight[0], batch, rows), weight[1] if weight[1].shape[0] == 1 else weight[1][batch])
    extra = row_bias.bias if bias is None else _rows_of(bias, batch, rows) + row_bias.bias
    part = weighted_sdpa(query[batch].index_select(2, rows), key[batch], value[batch], row_weight, extra, scale)
    return _put_rows(out, batch, rows, part)


def _extend_mask(mask: torch.Tensor | None, key_length: int) -> torch.Tensor | None:
    """The layer's own mask for ``key_length`` keys: appended keys get 0 (controls append, never prepend)."""
    if mask is None or mask.shape[-1] == key_length:
        return mask
    if mask.shape[-1] > key_length:
        raise ValueError(f"a control removed keys ({mask.shape[-1]} -> {key_length}) on a layer with an "
                         "attention mask; replace keys with the same count or append")
    return torch.nn.functional.pad(mask, (0, key_length - mask.shape[-1]))


def _read_maps(control: AttentionControl, call: AttentionCall, query, key, mask) -> torch.Tensor:
    """Raw (unedited) scores or probabilities as described by ``control.read``, for the rows and keys it asks."""
    spec = control.read
    batch = call.cond if spec.batch == "cond" else slice(0, call.batch_size)
    q, k = query[batch], key[batch]
    m = mask[batch] if mask is not None else None
    rows, keys = control.read_rows(call), control.read_keys(call)
    if rows is not None:
        q = q.index_select(2, rows)
        if m is not None and m.shape[2] != 1:
            m = m.index_select(2, rows)
    with torch.set_grad_enabled(spec.grad and torch.is_grad_enabled()):
        if spec.heads == "mean" and spec.what == "probs":
            return head_mean_probs(q, k, call.scale, m, keys, read_tile_elements(q.device))
        if spec.heads == "each":
            maps = attention_scores(q, k, call.scale, bias=m)
            maps = maps if spec.what == "scores" else maps.softmax(-1)
        else:  # head-mean scores: linear in q and k, so autograd keeps only q and k; one chunk of heads at a time
            per_head = max(1, q.shape[0] * q.shape[2] * k.shape[2])
            step = max(1, min(q.shape[1], read_tile_elements(q.device) // per_head))
            maps = sum(attention_scores(q[:, h:h + step], k[:, h:h + step], call.scale,
                                        bias=None if m is None else m[:, h:h + step] if m.shape[1] > 1 else m).sum(1)
                       for h in range(0, q.shape[1], step)) / q.shape[1]
        return maps if keys is None else maps.index_select(-1, keys)


def read_tile_elements(device: torch.device) -> int:
    """Scores per tile of a head-mean read: cache-sized on CPU (the tile's softmax passes then stay in cache), large
    on accelerators (fewer kernel launches)."""
    return READ_TILE_ELEMENTS_CPU if device.type == "cpu" else READ_TILE_ELEMENTS


def _add_ip_adapter(ip, attn, query, hidden_states, ip_hidden_states, ip_adapter_masks):
    """diffusers' IP-Adapter image branch (``IPAdapterAttnProcessor2_0``) added to ``hidden_states``."""
    batch_size, heads, _, head_dim = query.shape
    if ip_adapter_masks is not None:
        if not isinstance(ip_adapter_masks, list):
            ip_adapter_masks = list(ip_adapter_masks.unsqueeze(1))
        if not len(ip_adapter_masks) == len(ip.scale) == len(ip_hidden_states):
            raise ValueError(f"ip_adapter_masks has {len(ip_adapter_masks)} entries for {len(ip.scale)} IP-Adapters "
                             f"and {len(ip_hidden_states)} image embeddings; give one mask per IP-Adapter")
    else:
        ip_adapter_masks = [None] * len(ip.scale)
    for states, scale, to_k_ip, to_v_ip, mask in zip(ip_hidden_states, ip.scale, ip.to_k_ip, ip.to_v_ip,
                                                     ip_adapter_masks):
        if (all(s == 0 for s in scale) if isinstance(scale, list) else scale == 0):
            continue
        if mask is None:
            images = [(states, scale, None)]
        else:
            scales = scale if isinstance(scale, list) else [scale] * mask.shape[1]
            images = [(states[:, i], scales[i], mask[:, i]) for i in range(mask.shape[1])]
        for image_states, image_scale, image_mask in images:
            # image states may be (B, tokens, C) or (B, images, tokens, C): flatten tokens as diffusers does
            ip_key = to_k_ip(image_states).view(batch_size, -1, heads, head_dim).transpose(1, 2)
            ip_value = to_v_ip(image_states).view(batch_size, -1, heads, head_dim).transpose(1, 2)
            out = torch.nn.functional.scaled_dot_product_attention(query, ip_key, ip_value)
            out = merge_heads(out).to(query.dtype)
            if image_mask is not None:
                down = IPAdapterMaskProcessor.downsample(image_mask, batch_size, out.shape[1], out.shape[2])
                out = out * down.to(dtype=query.dtype, device=query.device)
            hidden_states = hidden_states + image_scale * out
    return hidden_states

"""The attention-control mechanism (asuka.attention) on the tiny SD-layout UNet, float32.

References are written out densely here: ``softmax(Q Kᵀ · scale)`` per head with the edit applied.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from asuka.attention import (
    AttentionControl,
    AttentionController,
    AttentionStore,
    ControlledAttnProcessor,
    LayerTable,
    Read,
    RowBias,
    TokenMasks,
)
from asuka.models.tiny import tiny_unet

LATENT = (8, 12)  # non-square: grids (8,12), (4,6), (2,3), (1,2)


@pytest.fixture(scope="module")
def unet():
    return tiny_unet(in_channels=4).requires_grad_(False)


def _inputs(batch=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, *LATENT, generator=g, dtype=dtype)
    text = torch.randn(batch, 7, 32, generator=g, dtype=dtype)
    return sample, text


def _run(unet, sample, text, t=500):
    return unet(sample, t, encoder_hidden_states=text).sample


def _processors(unet):
    return {name: proc for name, proc in unet.attn_processors.items()}


def _hole_masks(batch=2):
    """Per-sample latent masks (B, 1, h, w), 1 = hole, different for each sample."""
    masks = torch.zeros(batch, 1, *LATENT)
    masks[0, :, 2:6, 3:9] = 1
    masks[1, :, :, :4] = 1
    return masks[:batch]


# --------------------------------------------------------------------------------------------- layer table
def test_table_is_execution_order_recorded_by_hooks(unet):
    table = LayerTable(unet)
    order = []
    handles = [layer.module.register_forward_pre_hook(lambda m, a, name=layer.name: order.append(name))
               for layer in table]
    try:
        _run(unet, *_inputs(batch=1))
    finally:
        for h in handles:
            h.remove()
    assert order == table.names
    assert table.names != [k.removesuffix(".processor") for k in unet.attn_processors]  # dict order is not it


def test_table_places_levels_grids_and_selections(unet):
    table = LayerTable(unet)
    assert len(table.select(kind="self")) == 16 and len(table.select(kind="cross")) == 16
    assert len(table.select(kind="cross", exclude_levels=0)) == 11
    mid = table.by_name("mid_block.attentions.0.transformer_blocks.0.attn1.processor")
    assert (mid.place, mid.block, mid.level, mid.kind_index, mid.grid(LATENT)) == ("mid", 0, 3, 6, (1, 2))
    up = table.by_name("up_blocks.2.attentions.1.transformer_blocks.0.attn2")
    assert (up.place, up.block, up.attention, up.transformer, up.level, up.grid(LATENT)) == ("up", 2, 1, 0, 1, (4, 6))
    assert up.transformer_block is unet.get_submodule("up_blocks.2.attentions.1.transformer_blocks.0")
    sams = table.select(kind="self", indices=range(2, 7))
    assert [layer.kind_index for layer in sams] == [2, 3, 4, 5, 6]
    assert [layer.kind_index for layer in table.select(kind="self", indices=range(-8, 0))] == list(range(8, 16))
    assert table.select(kind="cross", levels=2).names == [
        "down_blocks.2.attentions.0.transformer_blocks.0.attn2", "down_blocks.2.attentions.1.transformer_blocks.0.attn2",
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2", "up_blocks.1.attentions.1.transformer_blocks.0.attn2",
        "up_blocks.1.attentions.2.transformer_blocks.0.attn2"]
    assert len(table.select(names="up_blocks.3.*", kind="self")) == 3
    assert len(table.select(places="mid")) == 2
    with pytest.raises(ValueError, match="out of range"):
        table.select(kind="self", indices=[16])
    with pytest.raises(ValueError, match="kind"):
        table.select(kind="selff")


# ------------------------------------------------------------------------------------------ install/restore
class Gate(AttentionControl):
    """Active only in phase "on"; edits nothing unless given hooks by subclasses."""

    def active(self, layer, state):
        return state.phase == "on"


class AddBias(Gate):
    def __init__(self, bias_fn):
        self.bias_fn = bias_fn

    def score_bias(self, call):
        return self.bias_fn(call)


def test_nothing_installed_and_inactive_controls_are_bit_exact(unet):
    sample, text = _inputs()
    plain = _run(unet, sample, text)
    controller = AttentionController(unet)
    controller.add(AddBias(lambda call: torch.zeros(())), controller.layers)
    store = controller.add(AttentionStore(Read("probs"), when=lambda layer, state: state.phase == "on"),
                           controller.layers)
    with controller:
        controller.state.phase = "off"
        assert torch.equal(_run(unet, sample, text), plain)
        assert store.maps == []
    assert torch.equal(_run(unet, sample, text), plain)


class NoEdit(AttentionControl):
    """Active, overrides every SDPA-path hook, edits nothing."""

    def keys_values(self, call, key, value):
        return None

    def score_bias(self, call):
        return None

    def row_bias(self, call):
        return None

    def prob_weight(self, call):
        return None


def test_read_only_and_identity_controls_keep_output_bit_exact(unet):
    sample, text = _inputs()
    plain = _run(unet, sample, text)
    controller = AttentionController(unet)
    controller.add(NoEdit(), controller.layers)
    store = controller.add(AttentionStore(Read("scores", batch="all", heads="each")), controller.layers)
    with controller:
        assert torch.equal(_run(unet, sample, text), plain)
    assert len(store.maps) == 32


def test_installed_exactly_on_selected_layers_and_restored_after_exception(unet):
    before = _processors(unet)
    controller = AttentionController(unet)
    chosen = controller.layers.select(kind="self", levels=1)
    controller.add(Gate(), chosen)
    with pytest.raises(KeyError):
        with controller:
            now = _processors(unet)
            for name, proc in now.items():
                if name.removesuffix(".processor") in chosen.names:
                    assert isinstance(proc, ControlledAttnProcessor) and proc.original is before[name]
                else:
                    assert proc is before[name]
            raise KeyError("boom")
    after = _processors(unet)
    assert all(after[name] is before[name] for name in before)
    assert not controller.installed


def test_user_processors_are_kept_and_nesting_restores(unet):
    table = LayerTable(unet)
    layer = table.select(kind="self")[3]
    user = AttnProcessor()  # something the user set
    layer.module.set_processor(user)
    try:
        before = _processors(unet)
        outer = AttentionController(unet)
        outer_store = outer.add(AttentionStore(Read("probs")), layer)
        inner = AttentionController(unet)
        inner_store = inner.add(AttentionStore(Read("scores")), layer)
        sample, text = _inputs(batch=2)
        with outer:
            outer_proc = layer.module.processor
            with inner:
                merged = layer.module.processor
                assert merged.original is user and len(merged.entries) == 2
                _run(unet, sample, text)
            assert layer.module.processor is outer_proc
        assert len(outer_store.maps) == 1 and len(inner_store.maps) == 1
        after = _processors(unet)
        assert all(after[name] is before[name] for name in before)
    finally:
        layer.module.set_processor(AttnProcessor2_0())


def test_controller_refuses_foreign_layers_and_double_entry(unet):
    other = tiny_unet(in_channels=4, seed=1)
    controller = AttentionController(unet)
    with pytest.raises(ValueError, match="not a layer"):
        controller.add(Gate(), LayerTable(other)[0])
    with controller:
        with pytest.raises(RuntimeError, match="already installed"):
            controller.__enter__()
        with pytest.raises(RuntimeError, match="before entering"):
            controller.add(Gate(), controller.layers[0])


# -------------------------------------------------------------------------------------- dense references
def _capture(unet, layer, controls, sample, text, cfg=True):
    """Run the UNet with ``controls`` on ``layer``; return (layer input, encoder states, layer output)."""
    seen = {}

    def hook(module, args, kwargs, output):
        seen["x"] = args[0] if args else kwargs["hidden_states"]
        seen["ctx"] = kwargs.get("encoder_hidden_states")
        seen["out"] = output

    controller = AttentionController(unet)
    for control in controls:
        controller.add(control, layer)
    handle = layer.module.register_forward_hook(hook, with_kwargs=True)
    try:
        with controller:
            controller.state.cfg = cfg
            controller.state.phase = "on"
            _run(unet, sample, text)
    finally:
        handle.remove()
    return seen["x"], seen["ctx"], seen["out"]


def _qkv(attn, x, ctx):
    ctx = x if ctx is None else ctx
    heads = attn.heads

    def split(t):
        b, n, c = t.shape
        return t.view(b, n, heads, c // heads).transpose(1, 2)

    return split(attn.to_q(x)), split(attn.to_k(ctx)), split(attn.to_v(ctx))


def _finish(attn, o):
    b, h, n, d = o.shape
    return attn.to_out[0](o.transpose(1, 2).reshape(b, n, h * d))


def _dense(attn, x, ctx, factor=None, bias=None, weight=None, k_extra=None, v_extra=None):
    """Explicit per-head reference: softmax((Q Kᵀ · scale) ⊙ factor + bias) ⊙ weight, times V."""
    q, k, v = _qkv(attn, x, ctx)
    if k_extra is not None:
        k, v = torch.cat([k, k_extra(k)], 2), torch.cat([v, v_extra(v)], 2)
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            s = (q[b, h] @ k[b, h].T) * attn.scale
            if factor is not None:
                s = s * factor[b]
            if bias is not None:
                s = s + bias[b]
            p = torch.softmax(s, -1)
            if weight is not None:
                p = p * weight[b]
            out[b, h] = p @ v[b, h]
    return _finish(attn, out)


LEVEL1_SELF = "down_blocks.1.attentions.1.transformer_blocks.0.attn1"
LEVEL1_CROSS = "up_blocks.2.attentions.0.transformer_blocks.0.attn2"


def _mask_rows(call_or_grid, masks):
    m = masks.at(call_or_grid)  # (2, N)
    return torch.cat([m, m])  # CFG batch [uncond, cond] of 2 samples


class MaskedBias(Gate):
    """-inf between hole queries and known keys of the *cond* half only, finite boost elsewhere in hole rows."""

    def __init__(self, masks):
        self.masks = masks

    def score_bias(self, call):
        m = self.masks.for_call(call)  # (B, N)
        hole_q, known_k = m[:, None, :, None] > 0.5, m[:, None, None, :] < 0.5
        bias = torch.where(hole_q & known_k, float("-inf"), 0.0) + torch.where(hole_q & ~known_k, 0.7, 0.0)
        bias = bias.expand(call.batch_size, -1, -1, -1).clone()
        bias[: call.cond.start] = 0  # uncond half untouched
        return bias


def test_additive_bias_matches_dense_reference(unet):
    layer = LayerTable(unet).by_name(LEVEL1_SELF)
    masks = TokenMasks(_hole_masks())
    sample, text = _inputs()
    x, ctx, out = _capture(unet, layer, [MaskedBias(masks)], sample, text)
    m = _mask_rows(layer.grid(LATENT), masks)
    hole_q, known_k = m[:, :, None] > 0.5, m[:, None, :] < 0.5
    bias = torch.where(hole_q & known_k, float("-inf"), 0.0) + torch.where(hole_q & ~known_k, 0.7, 0.0)
    bias[:2] = 0
    ref = _dense(layer.module, x, None, bias=bias)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert (out - _dense(layer.module, x, None)).abs().max() > 1e-3  # the edit did something


class ColumnFactor(Gate):
    """PAIntA-like: logits of (hole query, known key) pairs multiplied by c_j, per sample."""

    def __init__(self, masks, c):
        self.masks, self.c = masks, c

    def score_factor(self, call):
        m = self.masks.for_call(call)
        pair = (m[:, None, :, None] > 0.5) & (m[:, None, None, :] < 0.5)
        return torch.where(pair, self.c[: call.tokens].view(1, 1, 1, -1), torch.ones(()))


def test_multiplicative_factor_matches_dense_reference(unet):
    layer = LayerTable(unet).by_name(LEVEL1_SELF)
    masks = TokenMasks(_hole_masks())
    c = torch.linspace(0.0, 1.0, 24)
    x, ctx, out = _capture(unet, layer, [ColumnFactor(masks, c)], *_inputs())
    m = _mask_rows(layer.grid(LATENT), masks)
    factor = torch.where((m[:, :, None] > 0.5) & (m[:, None, :] < 0.5), c.view(1, 1, -1), torch.ones(()))
    torch.testing.assert_close(out, _dense(layer.module, x, None, factor=factor), atol=1e-5, rtol=0)


class RankTwoWeight(Gate):
    """SAMS: W = m̂ m̂ᵀ + (1-m̂)(1-m̂)ᵀ with the soft mask m̂ = (1-τ) m + τ/N, as a low-rank weight."""

    def __init__(self, masks, tau=0.1):
        self.masks, self.tau = masks, tau

    def prob_weight(self, call):
        m = self.masks.for_call(call)
        soft = (1 - self.tau) * m + self.tau / call.tokens
        factors = torch.stack([soft, 1 - soft], -1)[:, None]  # (B, 1, N, 2)
        return factors, factors


class SBCWeight(Gate):
    """PILOT's SBC on a cross-attention layer: known query rows keep only key 0, as a rank-2 weight."""

    def __init__(self, masks):
        self.masks = masks

    def prob_weight(self, call):
        m = self.masks.for_call(call)
        rows = torch.stack([torch.ones_like(m), m], -1)[:, None]  # (B, 1, Nq, 2)
        first = torch.zeros(call.key.shape[2])
        first[0] = 1
        return rows, torch.stack([first, 1 - first], -1)[None, None]  # (1, 1, Nk, 2)


class DenseProbEdit(Gate):
    """Any dense post-softmax edit: multiply by a fixed per-sample matrix."""

    def __init__(self, matrix):
        self.matrix = matrix

    def edit_probs(self, call, probs):
        return probs * self.matrix[:, None]


def _sbc_weight(m, keys):
    first = torch.zeros(keys)
    first[0] = 1
    return first + m[:, :, None] * (1 - first)


def _sams_weight(m, tau):
    soft = (1 - tau) * m + tau / m.shape[1]
    return soft[:, :, None] * soft[:, None, :] + (1 - soft)[:, :, None] * (1 - soft)[:, None, :]


def test_low_rank_post_softmax_weight_on_sdpa_matches_dense_reference(unet):
    layer = LayerTable(unet).by_name(LEVEL1_SELF)
    masks = TokenMasks(_hole_masks())
    x, ctx, out = _capture(unet, layer, [RankTwoWeight(masks)], *_inputs())
    weight = _sams_weight(_mask_rows(layer.grid(LATENT), masks), 0.1)
    torch.testing.assert_close(out, _dense(layer.module, x, None, weight=weight), atol=1e-5, rtol=0)


def test_sbc_as_low_rank_weight_matches_dense_reference(unet):
    layer = LayerTable(unet).by_name(LEVEL1_CROSS)
    masks = TokenMasks(_hole_masks())
    x, ctx, out = _capture(unet, layer, [SBCWeight(masks)], *_inputs())
    weight = _sbc_weight(_mask_rows(layer.grid(LATENT), masks), ctx.shape[1])
    torch.testing.assert_close(out, _dense(layer.module, x, ctx, weight=weight), atol=1e-5, rtol=0)


def test_dense_prob_edit_and_low_rank_weight_compose(unet):
    layer = LayerTable(unet).by_name(LEVEL1_CROSS)
    masks = TokenMasks(_hole_masks())
    matrix = torch.rand(4, 24, 7, generator=torch.Generator().manual_seed(3))
    x, ctx, out = _capture(unet, layer, [DenseProbEdit(matrix), SBCWeight(masks)], *_inputs())
    weight = matrix * _sbc_weight(_mask_rows(layer.grid(LATENT), masks), ctx.shape[1])
    torch.testing.assert_close(out, _dense(layer.module, x, ctx, weight=weight), atol=1e-5, rtol=0)


class AppendKeys(Gate):
    """MAKVS-like: append λ-scaled keys whose hole rows are replaced by the mean known key (values alike)."""

    def __init__(self, masks, lam):
        self.masks, self.lam = masks, lam

    def keys_values(self, call, key, value):
        m = self.masks.for_call(call)[:, None, :, None]  # (B,1,N,1)
        known = 1 - m
        k_bar = (key * known).sum(2, keepdim=True) / known.sum(2, keepdim=True)
        v_bar = (value * known).sum(2, keepdim=True) / known.sum(2, keepdim=True)
        k_t = torch.where(m > 0.5, k_bar, key)
        v_t = torch.where(m > 0.5, v_bar, value)
        return torch.cat([key, self.lam * k_t], 2), torch.cat([value, v_t], 2)


def test_key_value_extension_matches_dense_reference(unet):
    layer = LayerTable(unet).by_name("up_blocks.3.attentions.2.transformer_blocks.0.attn1")
    masks = TokenMasks(_hole_masks())
    x, ctx, out = _capture(unet, layer, [AppendKeys(masks, 1.4)], *_inputs())
    m = _mask_rows(layer.grid(LATENT), masks)[:, None, :, None]

    def extra(t, lam):
        mean = (t * (1 - m)).sum(2, keepdim=True) / (1 - m).sum(2, keepdim=True)
        return lam * torch.where(m > 0.5, mean, t)

    ref = _dense(layer.module, x, None, k_extra=lambda k: extra(k, 1.4), v_extra=lambda v: extra(v, 1.0))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("keys", [None, [0, 2, 3]], ids=["all-keys", "some-keys"])
@pytest.mark.parametrize("what", ["scores", "probs"])
@pytest.mark.parametrize("heads", ["each", "mean"])
def test_reads_match_dense_reference_on_cond_half_and_rows(unet, what, heads, keys):
    layer = LayerTable(unet).by_name(LEVEL1_CROSS)
    rows = torch.tensor([0, 5, 23])

    class RowStore(AttentionStore):
        def read_rows(self, call):
            return rows

        def read_keys(self, call):
            return None if keys is None else torch.tensor(keys)

    store = RowStore(Read(what, batch="cond", heads=heads))
    bias = AddBias(lambda call: torch.full((), -5.0))  # reads are raw: edits of the layer are not seen
    x, ctx, out = _capture(unet, layer, [store, bias], *_inputs())
    q, k, _ = _qkv(layer.module, x, ctx)
    s = (q @ k.transpose(-1, -2) * layer.module.scale)[2:, :, rows]
    ref = s if what == "scores" else s.softmax(-1)  # the softmax over every key, whichever keys are read
    ref = ref.mean(1) if heads == "mean" else ref
    ref = ref if keys is None else ref[..., keys]
    assert len(store.maps) == 1
    torch.testing.assert_close(store.maps[0], ref, atol=1e-5, rtol=0)


class BlockInputProbe(Gate):
    needs_block_input = True

    def __init__(self):
        self.seen = []

    def score_bias(self, call):
        self.seen.append((call.block_input, call.block_encoder_hidden_states, call.original_output()))
        self.processor = call.attn.processor
        return None


def test_block_input_and_original_output_reach_the_control(unet):
    layer = LayerTable(unet).by_name(LEVEL1_SELF)
    seen = {}
    handle = layer.transformer_block.register_forward_pre_hook(
        lambda m, a, kw: seen.update(x=a[0] if a else kw["hidden_states"], ctx=kw["encoder_hidden_states"]),
        with_kwargs=True)
    probe = BlockInputProbe()
    try:
        x, _, out = _capture(unet, layer, [probe], *_inputs())
    finally:
        handle.remove()
    block_input, block_ctx, original = probe.seen[0]
    assert block_input is seen["x"] and block_ctx is seen["ctx"]
    assert torch.equal(original, out)  # no edit: the SDPA path equals the original processor bit for bit
    assert probe.processor.block_input is None and probe.processor.block_encoder_hidden_states is None  # not kept


class TargetRowMask(Gate):
    """CorrFill-like: −inf / boost on some query rows of the cond half only, as a RowBias."""

    def __init__(self, rows, bias):
        self.rows, self.bias = rows, bias

    def row_bias(self, call):
        return RowBias(self.rows, self.bias, batch=call.cond)


@pytest.mark.parametrize("with_weight", [False, True])
@pytest.mark.parametrize("dense", [False, True])
def test_row_bias_matches_dense_reference(unet, with_weight, dense):
    layer = LayerTable(unet).by_name(LEVEL1_SELF)
    masks = TokenMasks(_hole_masks())
    rows = torch.tensor([1, 4, 7, 20])
    g = torch.Generator().manual_seed(5)
    row_values = torch.where(torch.rand(2, 1, 4, 24, generator=g) < 0.3, float("-inf"), torch.randn(2, 1, 4, 24, generator=g))
    row_values[..., 0] = 0.0  # every row keeps a finite key
    controls = [TargetRowMask(rows, row_values)]
    c = torch.linspace(0.5, 1.5, 24)
    if with_weight:
        controls.append(RankTwoWeight(masks, tau=0.2))
    if dense:
        controls.append(ColumnFactor(masks, c))
    x, _, out = _capture(unet, layer, controls, *_inputs())
    bias = torch.zeros(4, 24, 24)
    bias[2:, rows] = row_values[:, 0]
    m = _mask_rows(layer.grid(LATENT), masks)
    weight = _sams_weight(m, 0.2) if with_weight else None
    factor = torch.where((m[:, :, None] > 0.5) & (m[:, None, :] < 0.5), c.view(1, 1, -1), torch.ones(())) if dense else None
    ref = _dense(layer.module, x, None, factor=factor, bias=bias, weight=weight)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_gradient_reads_head_mean_equal_direct_autograd(unet):
    """Head-mean probs read with a graph (heads recomputed in backward) give the plain autograd gradient."""
    layer = LayerTable(unet).by_name(LEVEL1_SELF)
    controller = AttentionController(unet)
    store = controller.add(AttentionStore(Read("probs", batch="cond", heads="mean", grad=True)), layer)
    seen = {}
    handle = layer.module.register_forward_pre_hook(lambda m, a, kw: seen.update(x=a[0]), with_kwargs=True)
    sample, text = _inputs(batch=2)
    weights = torch.randn(1, 24, 24, generator=torch.Generator().manual_seed(0))
    try:
        with torch.enable_grad(), controller:
            controller.state.cfg = True
            z = sample.clone().requires_grad_(True)
            _run(unet, z, text)
            (grad,) = torch.autograd.grad((store.maps[0] * weights).sum(), z, retain_graph=True)
            q, k, _ = _qkv(layer.module, seen["x"], None)
            direct = (q[1:] @ k[1:].transpose(-1, -2) * layer.module.scale).softmax(-1).mean(1)
            torch.testing.assert_close(store.maps[0], direct, atol=1e-6, rtol=0)
            (ref,) = torch.autograd.grad((direct * weights).sum(), z)
    finally:
        handle.remove()
    torch.testing.assert_close(grad, ref, atol=1e-6, rtol=1e-5)
    assert grad[0].abs().sum() == 0 and grad[1].abs().sum() > 0  # only the cond sample carries the gradient


def test_cfg_batch_equals_single_runs_with_per_sample_masks(unet):
    """Per-sample masks and the [uncond, cond] layout: a batch of 2 prompts equals each prompt run alone."""
    masks = _hole_masks()
    sample, text = _inputs(batch=4)  # rows: uncond 0, uncond 1, cond 0, cond 1

    def run(rows, mask):
        token_masks = TokenMasks(mask)
        controller = AttentionController(unet)
        controller.add(MaskedBias(token_masks), controller.layers.select(kind="self", levels=1))
        controller.add(RankTwoWeight(token_masks), controller.layers.select(kind="self", levels=2))
        controller.add(ColumnFactor(token_masks, torch.linspace(0, 1, 24)), controller.layers.select(kind="self", levels=1))
        store = controller.add(AttentionStore(Read("probs", batch="cond")), controller.layers.select(kind="cross", levels=2))
        with controller:
            controller.state.cfg, controller.state.phase = True, "on"
            out = _run(unet, sample[rows], text[rows])
        return out, torch.cat(store.maps, 1)

    both, both_maps = run([0, 1, 2, 3], masks)
    for i in range(2):
        alone, alone_maps = run([i, 2 + i], masks[i:i + 1])
        torch.testing.assert_close(both[[i, 2 + i]], alone, atol=1e-5, rtol=0)
        torch.testing.assert_close(both_maps[i:i + 1], alone_maps, atol=1e-6, rtol=0)


def test_two_unets_in_one_process_do_not_interfere(unet):
    other = tiny_unet(in_channels=4, seed=1).requires_grad_(False)
    sample, text = _inputs(batch=2)
    first, second = AttentionController(unet), AttentionController(other)
    store1 = first.add(AttentionStore(Read("probs")), first.layers.select(kind="cross", levels=2))
    store2 = second.add(AttentionStore(Read("probs")), second.layers.select(kind="cross", levels=0))
    plain_other = _run(other, sample, text)
    with first, second:
        second.state.cfg = True
        _run(unet, sample, text)
        assert len(store1.maps) == 5 and store2.maps == []
        assert torch.equal(_run(other, sample, text), plain_other)
        assert len(store1.maps) == 5 and len(store2.maps) == 5
    assert store1.maps[0].shape[0] == 2 and store2.maps[0].shape[0] == 1  # each its own CallState (cfg)


def test_scores_are_float32_under_bfloat16(unet):
    import copy

    half = copy.deepcopy(unet).to(torch.bfloat16)
    layer = LayerTable(half).by_name(LEVEL1_SELF)
    masks = TokenMasks(_hole_masks())
    controller = AttentionController(half)
    store = controller.add(AttentionStore(Read("scores", heads="each")), layer)
    controller.add(ColumnFactor(masks, torch.linspace(0, 1, 24)), layer)
    sample, text = _inputs(dtype=torch.bfloat16)
    seen = {}
    handle = layer.module.register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    try:
        with controller:
            controller.state.cfg, controller.state.phase = True, "on"
            out = _run(half, sample, text)
    finally:
        handle.remove()
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    q, k, _ = _qkv(layer.module, seen["x"], None)  # bfloat16 projections
    ref = (q.float() @ k.float().transpose(-1, -2) * layer.module.scale)[2:]  # products and sums in float32
    assert store.maps[0].dtype == torch.float32
    torch.testing.assert_close(store.maps[0], ref, atol=1e-5, rtol=1e-5)


def test_blocks_after_a_layer_follow_the_forward_order(unet):
    from asuka.attention import blocks_after

    order = [*unet.down_blocks, *([unet.mid_block] if unet.mid_block is not None else []), *unet.up_blocks]
    layers = LayerTable(unet)
    for layer in layers:
        holder = unet.mid_block if layer.place == "mid" else getattr(unet, f"{layer.place}_blocks")[layer.block]
        position = next(i for i, block in enumerate(order) if block is holder)
        assert blocks_after(unet, layer) == order[position + 1:]
    assert blocks_after(unet, layers[-1]) == []

"""Gradients through controls with respect to the latent only (float64 finite differences), inside a no_grad
pipeline-style function: no UNet parameter gets a .grad, and nothing of a step's graph survives the step."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from asuka.attention import AttentionControl, AttentionController, AttentionStore, ControlledAttnProcessor, Read, TokenMasks
from asuka.attention.functional import attention_scores, split_heads
from asuka.models.tiny import tiny_unet

LATENT = (8, 8)


class PromptAwareFactor(AttentionControl):
    """PAIntA-shaped edit: logits of (hole query, known key) scaled by a relevance computed, with its graph, from
    the block input, the vanilla self-attention output and the next cross-attention's projections."""

    needs_block_input = True

    def __init__(self, masks):
        self.masks = masks

    def score_factor(self, call):
        block, cond = call.layer.transformer_block, call.cond
        a2 = block.attn2
        x, y = call.block_input[cond], call.original_output()[cond]
        qc = split_heads(a2.to_q(block.norm2(x + y)), a2.heads)
        kc = split_heads(a2.to_k(call.block_encoder_hidden_states[cond]), a2.heads)
        relevance = attention_scores(qc, kc, a2.scale).softmax(-1).mean(1)[..., 1:3].sum(-1)  # (Bc, N)
        c = relevance / relevance.amax(-1, keepdim=True)
        c = torch.cat([c, c]) if call.state.cfg else c
        m = self.masks.for_call(call)
        pair = (m[:, :, None] > 0.5) & (m[:, None, :] < 0.5)
        return torch.where(pair, c[:, None, :], torch.ones((), dtype=c.dtype)).unsqueeze(1)


@pytest.fixture(scope="module")
def setup():
    unet = tiny_unet(in_channels=4).double()  # parameters keep requires_grad=True on purpose
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, *LATENT, generator=g, dtype=torch.float64)
    text = torch.randn(2, 7, 32, generator=g, dtype=torch.float64)
    mask = torch.zeros(1, 1, *LATENT, dtype=torch.float64)
    mask[..., 2:6, 1:5] = 1
    controller = AttentionController(unet)
    controller.add(PromptAwareFactor(TokenMasks(mask)), controller.layers.select(kind="self", levels=1))
    store = controller.add(AttentionStore(Read("scores", batch="cond", heads="each", grad=True)),
                           controller.layers.select(kind="cross", levels=2))
    probs = controller.add(AttentionStore(Read("probs", batch="cond", heads="mean", grad=True)),
                           controller.layers.select(kind="self", levels=2))
    return unet, controller, store, probs, z, text


def _loss(store, probs):
    scores = torch.stack([m.mean(1) for m in store.maps]).mean(0)  # (1, N, 7)
    return torch.sigmoid(scores - 1.0).square().sum() + sum(p[..., :3].sum() for p in probs.maps)


@torch.no_grad()
def _guided_step(unet, controller, store, probs, z, text):
    """What a method's @no_grad pipeline does at one step: the gradient of a loss on stored maps w.r.t. z."""
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        store.clear(), probs.clear()
        unet(torch.cat([z, z]), 500, encoder_hidden_states=text)
        loss = _loss(store, probs)
        (grad,) = torch.autograd.grad(loss, z)
    alive = weakref.ref(store.maps[0])
    store.clear(), probs.clear()
    return loss.detach(), grad, alive


@torch.no_grad()
def _loss_at(unet, store, probs, z, text):
    store.clear(), probs.clear()
    unet(torch.cat([z, z]), 500, encoder_hidden_states=text)
    loss = _loss(store, probs)
    store.clear(), probs.clear()
    return loss


def test_latent_gradient_matches_central_differences_float64(setup):
    unet, controller, store, probs, z, text = setup
    with controller:
        controller.state.cfg = True
        loss, grad, _ = _guided_step(unet, controller, store, probs, z, text)
        assert grad.abs().sum() > 0
        g = torch.Generator().manual_seed(1)
        eps = 1e-5
        for _ in range(2):
            d = torch.randn(z.shape, generator=g, dtype=torch.float64)
            fd = (_loss_at(unet, store, probs, z + eps * d, text) - _loss_at(unet, store, probs, z - eps * d, text)) / (2 * eps)
            torch.testing.assert_close((grad * d).sum(), fd, rtol=1e-6, atol=1e-9)
    assert all(p.grad is None for p in unet.parameters())


def test_no_graph_survives_a_step_and_no_state_is_kept(setup):
    unet, controller, store, probs, z, text = setup
    with controller:
        controller.state.cfg = True
        _, _, alive = _guided_step(unet, controller, store, probs, z, text)
        gc.collect()
        assert alive() is None  # the stored map and its graph are gone once the step cleared its store
        installed = [p for p in unet.attn_processors.values() if isinstance(p, ControlledAttnProcessor)]
        assert len(installed) == 5 + 5 + 5
        assert all(p.block_input is None and p.block_encoder_hidden_states is None for p in installed)
    assert all(p.grad is None for p in unet.parameters())


def test_gradient_checkpointing_backward_inside_replaying_reads_each_call_once(setup):
    """With the UNet's gradient checkpointing, autograd re-runs the layers inside the backward; inside
    ``controller.replaying()`` their reads are not delivered again (stores keep one map per forward call) and the gradient is the
    one without checkpointing."""
    unet, controller, store, probs, z, text = setup
    with controller:
        controller.state.cfg = True
        _, plain, _ = _guided_step(unet, controller, store, probs, z, text)

        def step(replay: bool):
            with torch.enable_grad():
                x = z.detach().requires_grad_(True)
                store.clear(), probs.clear()
                unet(torch.cat([x, x]), 500, encoder_hidden_states=text)
                counts = len(store.maps), len(probs.maps)
                loss = _loss(store, probs)
                if replay:
                    with controller.replaying():
                        (grad,) = torch.autograd.grad(loss, x)
                else:
                    (grad,) = torch.autograd.grad(loss, x)
                after = len(store.maps), len(probs.maps)
                store.clear(), probs.clear()
            return counts, after, grad

        unet.enable_gradient_checkpointing()
        try:
            counts, after, grad = step(replay=True)
            assert after == counts and not controller.state.replaying  # no second read; the flag is restored
            torch.testing.assert_close(grad, plain, rtol=1e-10, atol=1e-12)
            counts, after, _ = step(replay=False)
            assert after[0] > counts[0] and after[1] > counts[1]  # without it the re-run layers read again
        finally:
            unet.disable_gradient_checkpointing()

"""``head_mean_probs``: the head-mean softmax read with a hand-written backward, against the dense formula and
autograd (float64 finite differences), in every tiling; it keeps nothing of size B·H·Nq·Nk for backward."""

from __future__ import annotations

import pytest
import torch

from asuka.attention.functional import head_mean_probs

B, H, NQ, NK, D = 2, 3, 6, 10, 4
KEYS = torch.tensor([0, 2, 3, 7, 9])


def _inputs(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, NQ, D, generator=g, dtype=dtype)
    k = torch.randn(B, H, NK, D, generator=g, dtype=dtype)
    return q, k


def _dense(q, k, scale, bias, keys):
    scores = q.double() @ k.double().transpose(-1, -2) * scale
    if bias is not None:
        scores = scores + bias.double()
    probs = scores.softmax(-1).mean(1)
    return probs if keys is None else probs[..., keys]


BIASES = {
    "none": None,
    "full": torch.randn(B, H, NQ, NK, generator=torch.Generator().manual_seed(1), dtype=torch.float64),
    "keys-only": torch.where(torch.arange(NK) % 4 == 1, float("-inf"), 0.0).double().view(1, 1, 1, NK),
}


@pytest.mark.parametrize("tile", [1, NK * B * 2 + 1, 2 * B * NQ * NK, 1 << 24])  # rows of a head (one; two, the last partial), two heads (the last group partial), all heads
@pytest.mark.parametrize("keys", [None, KEYS], ids=["all-keys", "some-keys"])
@pytest.mark.parametrize("bias", list(BIASES), ids=list(BIASES))
def test_values_and_gradients_match_dense_autograd(tile, keys, bias):
    q, k = _inputs()
    b = BIASES[bias]
    out = head_mean_probs(q, k, 0.7, b, keys, tile)
    torch.testing.assert_close(out, _dense(q, k, 0.7, b, keys), atol=1e-12, rtol=0)
    q.requires_grad_(True)
    k.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda q, k: head_mean_probs(q, k, 0.7, b, keys, tile), (q, k))
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = torch.autograd.grad((head_mean_probs(q, k, 0.7, b, keys, tile) * weights).sum(), (q, k))
    ref = torch.autograd.grad((_dense(q, k, 0.7, b, keys) * weights).sum(), (q, k))
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, atol=1e-12, rtol=1e-10)


def test_half_precision_inputs_are_scored_in_float32():
    q, k = _inputs(torch.float16)
    q.requires_grad_(True)
    out = head_mean_probs(q, k, 0.5, None, KEYS, 7)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _dense(q.detach(), k, 0.5, None, KEYS), atol=1e-6, rtol=0)
    (grad,) = torch.autograd.grad(out.sum(), q)
    assert grad.dtype == torch.float16


def test_backward_keeps_no_score_sized_tensor():
    q, k = _inputs(torch.float32)
    q, k = q.repeat(1, 1, 8, 1).requires_grad_(True), k.repeat(1, 1, 8, 1).requires_grad_(True)  # Nq 48, Nk 80
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = head_mean_probs(q, k, 0.5, None, None, 64)
    assert max(saved) <= q.numel() + k.numel()  # q, k and the row log-sum-exp, never B·H·Nq·Nk scores
    assert sum(saved) < B * H * q.shape[2] * k.shape[2] / 4
    out.sum().backward()
    assert q.grad is not None and k.grad is not None


def test_a_bias_with_a_gradient_is_refused():
    q, k = _inputs()
    with pytest.raises(ValueError, match="does not differentiate its bias"):
        head_mean_probs(q, k, 1.0, torch.zeros(NK, dtype=torch.float64, requires_grad=True))

"""PILOT's pure math against dense formulas written out here and the oracles of the paper's official code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from asuka.pipelines.pilot import objective as obj
from asuka.pipelines.pilot import schedule as sch


def assert_equal(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_background_loss_is_the_codes_affine_sum_per_sample():
    g = torch.Generator().manual_seed(1)
    x0, zin = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    hole = (torch.rand(3, 1, 8, 8, generator=g) > 0.5).float()
    keep = 1 - hole
    # code: sum(((zin+1)/2 * keep - (x0+1)/2 * keep) ** 2), here per sample
    dense = torch.stack([(((zin[b] + 1) / 2 * keep[b] - (x0[b] + 1) / 2 * keep[b]) ** 2).sum() for b in range(3)])
    torch.testing.assert_close(obj.background_loss(x0, zin, hole), dense)


def test_attention_hole_mask_samples_the_central_2x2_pixels():
    g = torch.Generator().manual_seed(2)
    m = (torch.rand(2, 1, 16, 16, generator=g) > 0.3).float()
    for factor in (2, 4, 8):
        got = obj.attention_hole_mask(m, (16 // factor, 16 // factor)).squeeze(1)
        c = factor // 2  # the central 2x2 pixels of each factor x factor block
        blocks = m[:, 0].unfold(1, factor, factor).unfold(2, factor, factor)
        dense = blocks[..., c - 1:c + 1, c - 1:c + 1].amin(dim=(-1, -2))
        assert_equal(got, dense)
    assert_equal(obj.attention_hole_mask(m, (16, 16)), m)


def test_latent_hole_mask_nearest():
    m = torch.zeros(1, 1, 64, 64)
    m[..., 8:40, 16:48] = 1
    assert_equal(obj.latent_hole_mask(m, (8, 8)), F.interpolate(m, (8, 8), mode="nearest"))


def test_sbc_keeps_bos_everywhere_and_words_only_in_the_hole():
    hole = torch.tensor([[1.0, 0.0, 1.0]])
    w = obj.sbc_weights(hole, 5)
    assert w.shape == (1, 1, 3, 5)
    assert_equal(w[0, 0, :, 0], torch.ones(3))
    assert_equal(w[0, 0, :, 1:], hole[0][:, None].expand(3, 4))
    probs = torch.softmax(torch.randn(1, 2, 3, 5), -1)
    out = obj.apply_sbc(probs, w)
    assert_equal(out[:, :, 1, 1:], torch.zeros(1, 2, 4))  # no renormalisation
    assert_equal(out[:, :, 1, 0], probs[:, :, 1, 0])


def _dense_term(probs, hole, words):
    """The code's per-layer score, written out for one sample: positions x heads, summed word mass."""
    heads, n, _ = probs.shape
    idx = [j for j in range(probs.shape[-1]) if words[j]]
    fg_rows, bg_rows = [i for i in range(n) if hole[i]], [i for i in range(n) if not hole[i]]
    if not fg_rows or not bg_rows:
        return 0.0
    bg = sum(float(probs[h, i, j]) for h in range(heads) for i in bg_rows for j in idx) / (len(bg_rows) * heads)
    fg = sum(float(probs[h, i, j]) for h in range(heads) for i in fg_rows for j in idx) / (len(fg_rows) * heads)
    return bg - fg


def test_centralisation_term_matches_the_dense_formula_per_sample():
    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(2, 3, 6, 8, generator=g), -1)
    hole = torch.tensor([[1, 1, 0, 0, 0, 1], [0, 1, 0, 0, 0, 0]], dtype=torch.float32)
    ids = torch.tensor([[9, 3, 4, 5, 10, 10, 10, 10], [9, 7, 10, 10, 10, 10, 10, 10]])
    words = obj.word_token_mask(ids, (9, 10))
    got = obj.attention_centralisation_term(probs, hole, words)
    dense = torch.tensor([_dense_term(probs[b], hole[b], words[b]) for b in range(2)])
    torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-6)


def test_centralisation_term_oracle_o7():
    g = torch.Generator().manual_seed(4)
    hole = torch.tensor([[1, 0, 0, 1]], dtype=torch.float32)
    words = torch.tensor([[0, 1, 1, 0, 0]], dtype=torch.float32)
    row = torch.softmax(torch.randn(1, 2, 1, 5, generator=g), -1)
    assert float(obj.attention_centralisation_term(row.expand(1, 2, 4, 5), hole, words)[0]) == 0.0  # uniform rows
    probs = torch.softmax(torch.randn(1, 2, 4, 5, generator=g) * 3, -1)
    term = obj.attention_centralisation_term(probs, hole, words)
    assert -1 <= float(term) <= 1
    overwritten = probs.clone()
    overwritten[..., [0, 3, 4]] = torch.rand(1, 2, 4, 3, generator=g)  # BOS and pad columns never enter the sums
    assert_equal(obj.attention_centralisation_term(overwritten, hole, words), term)
    # a layer where the hole vanished (or covers everything) contributes 0, as in the code
    for degenerate in (torch.zeros(1, 4), torch.ones(1, 4)):
        assert float(obj.attention_centralisation_term(probs, degenerate, words)[0]) == 0.0


def test_semantic_loss_is_the_layer_mean():
    terms = [torch.tensor([0.1, 0.2]), torch.tensor([0.3, -0.2])]
    torch.testing.assert_close(obj.semantic_loss(terms), torch.tensor([0.2, 0.0]))
    with pytest.raises(ValueError):
        obj.semantic_loss([])


def test_lambda_schedule_oracle_o11():
    hole = torch.zeros(2, 1, 64, 64)
    hole[0, :, :32, :32] = 1  # 25% hole: N_bg = 3072
    c = sch.area_coefficient(150.0, hole, 1499)
    torch.testing.assert_close(c, torch.tensor([150 * 3072 / 1499, 150 * 4096 / 1499]))
    assert sch.coef_factor(999, "linear", 1000) == 1.0
    assert sch.coef_factor(300, "linear", 1000) == pytest.approx(0.1)
    assert all(sch.coef_factor(t, "linear", 1000) == 0.1 for t in (0, 150, 299))
    code = [0.1] * 300 + list(np.linspace(0.1, 1.0, 700))  # coef_scheduler("linear", 1)
    values = [sch.coef_factor(t, "linear", 1000) for t in range(1000)]
    np.testing.assert_allclose(values, code, rtol=1e-12)
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert sch.coef_factor(500, "constant", 1000) == 1.0


def test_step_size_schedule_oracle_o11():
    kw = dict(lr=0.025, schedule="exp", num_train_timesteps=1000, warmup=0.007)
    assert sch.step_size(991, first=True, **kw) == 0.007
    for t, expected in ((946, 0.0278), (796, 0.0376), (596, 0.056), (396, 0.0836), (196, 0.125), (46, 0.168)):
        assert sch.step_size(t, first=False, **kw) == pytest.approx(expected, abs=6e-4)
        assert sch.step_size(t, first=False, **kw) == 0.025 * 1.002 ** (1000 - t)
    assert sch.step_size(500, first=False, **{**kw, "schedule": "constant"}) == 0.025
    assert sch.step_size(0, first=False, **{**kw, "schedule": "linear"}) == 10.0


def test_step_plan_counts_oracle_o8():
    from asuka.models.tiny import ddim_scheduler

    ddim = ddim_scheduler()
    ddim.set_timesteps(20)
    ts = [int(t) for t in ddim.timesteps]
    plan = sch.step_plan(ts, interval=5, gamma=1.0, num_train_timesteps=1000, gradient_steps=3)
    assert [i for i, p in enumerate(plan) if p.optimise] == [0, 5, 10, 15] and not any(p.blend for p in plan)
    assert not any(p.optimise for p in sch.step_plan(ts, 5, 0.0, 1000, 3))
    assert all(p.blend for p in sch.step_plan(ts, 5, 0.0, 1000, 3))
    ddim.set_timesteps(100)
    ts = [int(t) for t in ddim.timesteps]
    plan = sch.step_plan(ts, 10, 0.8, 1000, 10)  # controlnet_step100: optimised t = 991 ... 291, blend t <= 191
    assert [ts[i] for i, p in enumerate(plan) if p.optimise] == list(range(991, 290, -100))
    assert min(t for t, p in zip(ts, plan) if not p.blend) == 201 and max(t for t, p in zip(ts, plan) if p.blend) == 191
    ddim.set_timesteps(200)
    ts = [int(t) for t in ddim.timesteps]
    assert sum(p.optimise for p in sch.step_plan(ts, 10, 1.0, 1000, 10)) * 10 == 200  # paper: 200 fwd+bwd


def test_momentum_step_is_torch_sgd_with_momentum():
    g = torch.Generator().manual_seed(5)
    z0 = torch.randn(2, 4, 4, 4, generator=g)
    grads = [torch.randn(2, 4, 4, 4, generator=g) for _ in range(4)]
    z, v = z0.clone(), torch.zeros_like(z0)
    for gr in grads:
        z, v = sch.momentum_step(z, v, gr, 0.03, 0.7)
    p = torch.nn.Parameter(z0.clone())
    opt = torch.optim.SGD([p], lr=0.03, momentum=0.7)
    for gr in grads:
        p.grad = gr.clone()
        opt.step()
    torch.testing.assert_close(z, p.detach(), rtol=1e-6, atol=1e-6)
    bad = grads[0].clone()
    bad[1, 0, 0, 0] = float("inf")
    z1, _ = sch.momentum_step(z0, torch.zeros_like(z0), bad, 0.1, 0.7)
    assert_equal(z1[1], z0[1])  # a non-finite gradient leaves that sample alone
    torch.testing.assert_close(z1[0], z0[0] - 0.1 * bad[0])


def test_blend_is_exact_in_the_background():
    g = torch.Generator().manual_seed(6)
    z, zin, eps = (torch.randn(1, 4, 8, 8, generator=g) for _ in range(3))
    hole = torch.zeros(1, 1, 8, 8)
    hole[..., 2:5, 2:6] = 1
    ab = torch.tensor(0.3)
    out = sch.blend(z, sch.noised(zin, eps, ab), hole)
    keep = hole.expand_as(z) < 0.5
    assert_equal(out[keep], (ab.sqrt() * zin + (1 - ab).sqrt() * eps)[keep])
    assert_equal(out[~keep], z[~keep])


def test_descend_resets_momentum_at_every_call_oracle_o11():
    """L = ½‖z‖² per sample: g = z, so K heavy-ball steps from z0 follow a closed form; a second call from the same
    start repeats it exactly (the velocity starts at 0 at every optimised timestep)."""
    z0 = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(7))
    loss = lambda z: 0.5 * z.pow(2).flatten(1).sum(1)  # noqa: E731
    eta, mu = 0.1, 0.7
    z, v = z0.clone(), torch.zeros_like(z0)
    for _ in range(3):
        v = mu * v - eta * z
        z = z + v
    first = sch.descend(loss, z0, steps=3, step=eta, momentum=mu)
    torch.testing.assert_close(first, z, rtol=1e-6, atol=1e-6)
    assert_equal(sch.descend(loss, z0, steps=3, step=eta, momentum=mu), first)

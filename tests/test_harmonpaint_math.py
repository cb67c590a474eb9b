"""HarmonPaint's pure math against the dense formulas of the paper (Eqs. 4-13) and hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from asuka.attention import LayerTable, TokenMasks, weighted_sdpa
from asuka.pipelines.harmonpaint.makvs import makvs_applicable, makvs_bypass_bias, makvs_keys_values, mask_adjusted
from asuka.pipelines.harmonpaint.masks import resize_mask_to_grid, soft_mask
from asuka.pipelines.harmonpaint.sams import sams_factors
from asuka.pipelines.harmonpaint.schedule import plan_steps
from asuka.pipelines.harmonpaint.steer import prompt_token_mask, steer_loss, steer_step_sizes

B, H, N, D = 2, 2, 12, 4


def _qkv(seed=0, batch=B, n=N, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, H, n, D, generator=g, dtype=dtype) for _ in range(3)]


def _mask(seed=1, batch=B, n=N):
    g = torch.Generator().manual_seed(seed)
    m = (torch.rand(batch, n, generator=g) < 0.4).double()
    m[:, 0], m[:, 1] = 1.0, 0.0  # at least one hole and one known token per sample
    return m


def sams_attention(q, k, v, m, tau, variant="obj_bg"):
    """SAMS as the controlled processor evaluates it: the low-rank weight through weighted_sdpa."""
    rows, cols = sams_factors(m, tau, variant)
    return weighted_sdpa(q, k, v, (rows[:, None], cols[:, None]), None, None)


def makvs_attention(q, k, v, m, lam, mode="concat", applicable=None):
    """MAKVS as the controlled processor evaluates it: edited keys/values (and bypass bias) through SDPA."""
    keys, values = makvs_keys_values(k, v, m, lam, mode, applicable)
    bias = makvs_bypass_bias(applicable, N) if applicable is not None and mode == "concat" else None
    return weighted_sdpa(q, keys, values, None, bias, None)


def _softmax_map(q, k):
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)


def _dense_sams_weight(m, tau, variant):
    """W of Eqs. 4-7 (and the Fig. 7 variants) written out, (B, 1, N, N)."""
    mh = ((1 - tau) * m + tau / m.shape[-1])[:, None, :, None]
    obj, bg = mh @ mh.transpose(-1, -2), (1 - mh) @ (1 - mh).transpose(-1, -2)
    return {"obj_bg": obj + bg, "bg_bg": 1 - bg, "obj_obj": 1 - obj}[variant]


# ---------------------------------------------------------------- SAMS


@pytest.mark.parametrize("variant", ["obj_bg", "bg_bg", "obj_obj"])
@pytest.mark.parametrize("tau", [0.0, 0.1, 0.5, 1.0])
def test_sams_sdpa_form_equals_dense_eqs_4_to_7(tau, variant):  # T4
    q, k, v = _qkv()
    m = _mask()
    dense = (_dense_sams_weight(m, tau, variant) * _softmax_map(q, k)) @ v
    torch.testing.assert_close(sams_attention(q, k, v, m, tau, variant), dense, atol=1e-10, rtol=0)


def test_sams_does_not_renormalise():  # T5
    q, k, _ = _qkv()
    m = _mask()
    out = sams_attention(q, k, torch.ones_like(q), m, tau=0.0)
    in_hole_mass = (_softmax_map(q, k) * m[:, None, None, :]).sum(-1)  # sum_{j in M} A_ij
    hole = m.bool()
    torch.testing.assert_close(out[..., 0].permute(0, 2, 1)[hole], in_hole_mass.permute(0, 2, 1)[hole])
    assert (out[..., 0].permute(0, 2, 1)[hole] < 1 - 1e-6).all()


def test_sams_tau_one_scales_plain_attention():  # T6 (core)
    q, k, v = _qkv()
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    c = (1 / N) ** 2 + (1 - 1 / N) ** 2
    torch.testing.assert_close(sams_attention(q, k, v, _mask(), tau=1.0), c * plain)


@pytest.mark.parametrize("n,expected", [(4096, (0.820039, 0.099995, 0.999951)), (1024, (0.820156, 0.099980, 0.999805)),
                                        (256, (0.820625, 0.099922, 0.999219)), (64, (0.822505, 0.099692, 0.996880))])
def test_sams_weight_values_of_the_table(n, expected):  # T6 (table): obj-obj, obj-bg, bg-bg entries at tau 0.1
    m = torch.zeros(1, n, dtype=torch.float64)
    m[0, 0] = 1.0
    a, b = soft_mask(m, 0.1)[0, :2].tolist()
    entries = (a * a + (1 - a) ** 2, a * b + (1 - a) * (1 - b), b * b + (1 - b) ** 2)
    assert entries == pytest.approx(expected, abs=1e-6)
    if n <= 256:  # the dense W of Eqs. 4-7 has the same entries
        w = _dense_sams_weight(m, 0.1, "obj_bg")[0, 0]
        assert (w[0, 0].item(), w[0, 1].item(), w[1, 1].item()) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("mask_value", [0.0, 1.0])
def test_sams_tau_zero_uniform_mask_is_plain_attention(mask_value):
    q, k, v = _qkv()
    m = torch.full((B, N), mask_value, dtype=torch.float64)
    torch.testing.assert_close(sams_attention(q, k, v, m, tau=0.0),
                               torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_sams_locality_at_tau_zero():  # T7
    q, k, v = _qkv()
    m = _mask()
    hole = m.bool()[:, None, :, None].expand_as(v)
    out = sams_attention(q, k, v, m, tau=0.0)
    for region in (hole, ~hole):  # perturb V in one region: the other region's outputs do not move
        changed = sams_attention(q, k, torch.where(region, v + torch.randn_like(v), v), m, tau=0.0)
        torch.testing.assert_close(changed[~region], out[~region])
        assert not torch.allclose(changed[region], out[region])


# ---------------------------------------------------------------- MAKVS


def _dense_makvs(q, k, v, m, lam, mode):
    """Eqs. 10-13 written out per sample with explicit means (no shared code with the module)."""
    outs = []
    for b in range(q.shape[0]):
        known = m[b] < 0.5
        kb, vb = k[b].clone(), v[b].clone()
        kt, vt = kb.clone(), vb.clone()
        kt[:, ~known] = kb[:, known].mean(1, keepdim=True)
        vt[:, ~known] = vb[:, known].mean(1, keepdim=True)
        if mode == "concat":
            keys, values = torch.cat([kb, lam * kt], 1), torch.cat([vb, vt], 1)
        else:
            keys, values = kt, vt
        outs.append(_softmax_map(q[b], keys) @ values)
    return torch.stack(outs)


@pytest.mark.parametrize("mode", ["concat", "naive"])
@pytest.mark.parametrize("lam", [0.8, 1.4])
def test_makvs_equals_dense_eqs_10_to_13(lam, mode):  # T8
    q, k, v = _qkv()
    m = _mask()
    torch.testing.assert_close(makvs_attention(q, k, v, m, lam, mode), _dense_makvs(q, k, v, m, lam, mode))


def test_makvs_means_are_per_sample_means_over_known_tokens():  # T8
    _, k, _ = _qkv()
    m = _mask()
    kt = mask_adjusted(k, m)
    for b in range(B):
        known = m[b] < 0.5
        expected = k[b][:, known].mean(1)
        for i in torch.nonzero(~known).flatten():
            torch.testing.assert_close(kt[b, :, i], expected)
        torch.testing.assert_close(kt[b][:, known], k[b][:, known])


def test_makvs_compact_form_equals_literal():  # T8: [K; lam K_u; lam K_bar] with a log n_mask bias
    q, k, v = _qkv(batch=1)
    m = _mask(batch=1)
    lam, known = 1.4, m[0] < 0.5
    k_bar, v_bar = k[..., known, :].mean(-2, keepdim=True), v[..., known, :].mean(-2, keepdim=True)
    keys = torch.cat([k, lam * k[..., known, :], lam * k_bar], -2)
    values = torch.cat([v, v[..., known, :], v_bar], -2)
    bias = torch.zeros(keys.shape[-2], dtype=q.dtype)
    bias[-1] = math.log(int((~known).sum()))
    compact = torch.softmax(q @ keys.transpose(-1, -2) / math.sqrt(D) + bias, -1) @ values
    torch.testing.assert_close(makvs_attention(q, k, v, m, lam), compact)


def test_makvs_is_a_convex_combination_sams_is_not():  # T8
    q, k, _ = _qkv()
    m = _mask()
    v = torch.full_like(q, 0.7)
    torch.testing.assert_close(makvs_attention(q, k, v, m, 1.4), v)
    assert not torch.allclose(sams_attention(q, k, v, m, tau=0.0), v)


def test_makvs_applicable_flags_empty_and_full_masks():
    m = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert makvs_applicable(m).tolist() == [False, False, True]


@pytest.mark.parametrize("mode", ["concat", "naive"])
@pytest.mark.parametrize("bypassed", ["empty", "full"])
def test_makvs_bypasses_samples_without_hole_or_known_tokens(mode, bypassed):  # T8 / T9 per sample
    q, k, v = _qkv(batch=3)
    m = _mask(batch=3)
    m[1] = 0.0 if bypassed == "empty" else 1.0
    applicable = makvs_applicable(m)
    assert applicable.tolist() == [True, False, True]
    out = makvs_attention(q, k, v, m, 1.4, mode, applicable)
    torch.testing.assert_close(out[1], torch.nn.functional.scaled_dot_product_attention(q[1], k[1], v[1]))
    for b in (0, 2):
        torch.testing.assert_close(out[b:b + 1], makvs_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], m[b:b + 1],
                                                                 1.4, mode))
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------- batch independence, permutation


@pytest.mark.parametrize("attention", [
    lambda q, k, v, m: sams_attention(q, k, v, m, 0.1),
    lambda q, k, v, m: makvs_attention(q, k, v, m, 1.4),
    lambda q, k, v, m: makvs_attention(q, k, v, m, 0.8, "naive"),
], ids=["sams", "makvs", "makvs_naive"])
def test_batch_of_two_equals_single_samples(attention):  # T9
    q, k, v = _qkv()
    m = _mask()
    both = attention(q, k, v, m)
    for b in range(B):
        torch.testing.assert_close(both[b:b + 1], attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], m[b:b + 1]))


@pytest.mark.parametrize("attention", [
    lambda q, k, v, m: sams_attention(q, k, v, m, 0.1, "bg_bg"),
    lambda q, k, v, m: makvs_attention(q, k, v, m, 1.4),
], ids=["sams", "makvs"])
def test_permutation_equivariance(attention):  # T10
    q, k, v = _qkv()
    m = _mask()
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(3))
    out = attention(q, k, v, m)
    permuted = attention(q[:, :, perm], k[:, :, perm], v[:, :, perm], m[:, perm])
    torch.testing.assert_close(permuted, out[:, :, perm])


# ---------------------------------------------------------------- masks


def test_soft_mask_is_eq_7():
    m = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(soft_mask(m, 0.1), torch.tensor([[0.9 + 0.025, 0.025, 0.025, 0.025]]))


def test_aligned_block_mask_pyramid_is_exact():  # T11
    latent = torch.zeros(1, 1, 16, 16)
    latent[..., 0:8, 8:16] = 1.0  # aligned to every level down to 2x2
    for mode in ("area", "nearest", "maxpool"):
        masks = TokenMasks(latent, resize=lambda m, size: resize_mask_to_grid(m, size, mode))
        assert [int(masks.at((s, s)).sum()) for s in (16, 8, 4, 2)] == [64, 16, 4, 1]
        for side in (16, 8, 4, 2):
            expected = torch.zeros(side, side)
            expected[: side // 2, side // 2:] = 1.0
            torch.testing.assert_close(masks.at((side, side)), expected.flatten()[None])


def test_odd_latent_sizes_follow_the_unet_grids():  # T11
    from asuka.models.tiny import tiny_unet

    unet = tiny_unet()
    grids = sorted({layer.grid((15, 17)) for layer in LayerTable(unet)}, reverse=True)
    assert grids == [(15, 17), (8, 9), (4, 5), (2, 3)]
    seen = set()
    hooks = [layer.module.register_forward_hook(lambda mod, args, out: seen.add(args[0].shape[1]))
             for layer in LayerTable(unet).select(kind="self")]
    with torch.no_grad():
        unet(torch.zeros(1, 9, 15, 17), 10, encoder_hidden_states=torch.zeros(1, 3, 32))
    for hook in hooks:
        hook.remove()
    masks = TokenMasks(torch.ones(1, 1, 15, 17), resize=resize_mask_to_grid)
    assert seen == {masks.at(grid).shape[1] for grid in grids}


def test_maxpool_marks_any_covered_token():
    latent = torch.zeros(1, 1, 4, 4)
    latent[..., 0, 0] = 1.0
    assert resize_mask_to_grid(latent, (2, 2), "maxpool").flatten(1).tolist() == [[1.0, 0.0, 0.0, 0.0]]
    assert resize_mask_to_grid(latent, (2, 2), "area").flatten(1).tolist() == [[0.0, 0.0, 0.0, 0.0]]
    assert resize_mask_to_grid(latent, (2, 2), "nearest").flatten(1).tolist() == [[1.0, 0.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="mask_resize"):
        resize_mask_to_grid(latent, (2, 2), "bicubic")


# ---------------------------------------------------------------- steer loss


def test_steer_loss_hand_computed():  # T12: 3 patches x 2 tokens
    probs = torch.tensor([[[0.5, 0.2], [0.3, 0.1], [0.9, 0.6]]])  # (1, N=3, L=2)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    expected = -(math.log(1 - 0.5 * 0.7) + math.log(1 - 0.8 * 0.9))
    loss = steer_loss({3: probs}, {3: mask}, torch.ones(1, 2))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    outside = probs.clone()
    outside[0, 2] = torch.tensor([0.01, 0.02])  # unmasked patch changed: same loss
    assert steer_loss({3: outside}, {3: mask}, torch.ones(1, 2)).item() == pytest.approx(expected, rel=1e-6)
    assert loss.item() >= 0


def test_steer_loss_is_finite_without_in_hole_attention():  # T12
    probs = torch.zeros(1, 3, 2, requires_grad=True)
    loss = steer_loss({3: probs}, {3: torch.tensor([[1.0, 0.0, 0.0]])}, torch.ones(1, 2))
    assert torch.isfinite(loss).all() and loss.item() > 0
    loss.sum().backward()
    assert torch.isfinite(probs.grad).all()


def test_steer_loss_sums_resolutions_weights_tokens_and_skips_empty_levels():
    g = torch.Generator().manual_seed(0)
    p4, p16 = torch.rand(2, 4, 5, generator=g), torch.rand(2, 16, 5, generator=g)
    m4, m16 = torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0]]), (torch.arange(16) < 5).float().repeat(2, 1)
    w = torch.tensor([[0.0, 1, 1, 0, 0], [0, 1, 0, 0, 0]])
    both = steer_loss({4: p4, 16: p16}, {4: m4, 16: m16}, w)
    singles = steer_loss({4: p4}, {4: m4}, w) + steer_loss({16: p16}, {16: m16}, w)
    torch.testing.assert_close(both, singles)
    assert steer_loss({4: p4}, {4: m4}, w)[1].item() == 0.0  # sample 1 has no hole at N=4
    one_token = steer_loss({16: p16[1:]}, {16: m16[1:]}, w[1:])
    assert one_token.item() == pytest.approx(-math.log(1 - torch.prod(1 - p16[1, :5, 1]).item()), rel=1e-5)


def test_steer_loss_ae_normalisation():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(1, 4, 6, generator=g), -1)
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    prompt = torch.tensor([[0.0, 1, 1, 1, 0, 0]])
    loss = steer_loss({4: probs}, {4: mask}, prompt, normalize="ae", prompt_tokens=prompt)
    resoft = torch.softmax(100 * probs[0, :, 1:4], -1) * mask[0, :, None]
    expected = -torch.log(1 - torch.exp(torch.log1p(-resoft).sum(0) / 4)).sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_prompt_token_mask_and_step_sizes():
    w = prompt_token_mask([2, 0], 6)
    assert w.tolist() == [[0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]]
    assert prompt_token_mask([80], 77)[0, 1:76].all() and prompt_token_mask([80], 77)[0, 76] == 0
    assert prompt_token_mask([2], 6, indices=[3]).tolist() == [[0, 0, 0, 1, 0, 0]]
    with pytest.raises(ValueError, match="steer_token_indices"):
        prompt_token_mask([2], 6, indices=[6])
    sizes = steer_step_sizes(20.0, 50)
    assert sizes[0] == pytest.approx(20.0) and sizes[-1] == pytest.approx(20 * math.sqrt(0.5))


# ---------------------------------------------------------------- phases


def _ddim_timesteps(steps):
    from asuka.models.tiny import ddim_scheduler

    scheduler = ddim_scheduler()
    scheduler.set_timesteps(steps)
    return scheduler.timesteps.tolist()


def test_phase_split_at_50_ddim_steps():  # T3 (timesteps)
    timesteps = _ddim_timesteps(50)
    assert timesteps[:2] == [981, 961] and timesteps[-1] == 1
    plans = plan_steps(timesteps)
    assert [p.structure for p in plans] == [True] * 20 + [False] * 30
    assert all(p.sams and p.steer and not p.makvs for p in plans[:20])
    assert all(p.makvs and not p.sams and not p.steer for p in plans[20:])


def test_benchmark_steps_keep_the_papers_structure_share():  # benchmarks/methods.py's harmonpaint row
    from benchmarks.methods import harmonpaint_steps

    assert [harmonpaint_steps(n) for n in (1, 2, 4, 5, 6, 10, 11, 50)] == [5, 5, 5, 5, 10, 10, 20, 50]
    for steps in (5, 10, 20):  # 2 steps (t = 501, 1) would have no structure step, 4 steps one of four
        assert sum(p.structure for p in plan_steps(_ddim_timesteps(steps))) * 5 == steps * 2


def test_phase_follows_the_timestep_value_not_the_step_index():
    timesteps = _ddim_timesteps(10)  # 901, 801, ..., 1
    assert [p.structure for p in plan_steps(timesteps)] == [t >= 600 for t in timesteps]
    assert sum(p.structure for p in plan_steps(timesteps, eta=0.3)) == 7
    late = _ddim_timesteps(50)[25:]  # a schedule that starts at t = 481 (e.g. strength < 1): no structure step
    assert not any(p.structure for p in plan_steps(late))
    uneven = [999, 990, 980, 700, 300, 100]
    assert [p.structure for p in plan_steps(uneven)] == [True, True, True, True, False, False]


def test_override_flags():
    plans = plan_steps(_ddim_timesteps(10), sams_all_steps=True, makvs_all_steps=True, use_steer=False)
    assert all(p.sams and p.makvs and not p.steer for p in plans)
    off = plan_steps(_ddim_timesteps(10), use_sams=False, use_steer=False, use_makvs=False)
    assert not any(p.sams or p.steer or p.makvs for p in off)


# ---------------------------------------------------------------- diagnostics


def test_attention_pca_separates_block_structured_maps(tmp_path):
    from PIL import Image

    from asuka.pipelines.harmonpaint.diagnostics import attention_pca_image, cross_attention_images, save_png

    hole = torch.zeros(16, dtype=torch.bool)
    hole[[1, 2, 5, 6]] = True
    same = (hole[:, None] == hole[None, :]).float()
    attention = same / same.sum(-1, keepdim=True)  # tokens attend within their own region only
    image = attention_pca_image(attention, (4, 4))
    assert image.shape == (3, 4, 4) and image.min() >= 0 and image.max() <= 1
    colours = image.reshape(3, 16).T
    assert torch.allclose(colours[hole], colours[hole][:1]) and torch.allclose(colours[~hole], colours[~hole][:1])
    assert not torch.allclose(colours[hole][0], colours[~hole][0])
    probs = torch.softmax(torch.randn(16, 5), -1)
    maps = cross_attention_images(probs, (4, 4), [1, 3])
    assert maps.shape == (2, 4, 4) and maps.amin((1, 2)).tolist() == [0.0, 0.0]
    assert maps.amax((1, 2)).tolist() == [1.0, 1.0]
    path = save_png(image, tmp_path / "pca.png", scale=2)
    assert Image.open(path).size == (8, 8) and Image.open(save_png(maps[:1], tmp_path / "m.png")).mode == "L"


def test_steer_loss_ae_gradient_is_finite_for_a_sample_without_prompt_tokens():
    probs = torch.softmax(torch.randn(2, 4, 6), -1).requires_grad_(True)
    prompt = torch.tensor([[0.0, 1, 1, 0, 0, 0], [0.0, 0, 0, 0, 0, 0]])
    loss = steer_loss({4: probs}, {4: torch.tensor([[1.0, 0, 0, 0]] * 2)}, prompt, normalize="ae",
                      prompt_tokens=prompt)
    loss.sum().backward()
    assert loss[1].item() == 0.0 and torch.isfinite(probs.grad).all()


def test_unknown_variants_are_rejected():
    m = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="sams_variant"):
        sams_factors(m, 0.1, "all")
    with pytest.raises(ValueError, match="makvs_mode"):
        makvs_keys_values(torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 4, 2), m, 1.4, "mean")
    with pytest.raises(ValueError, match="steer_normalize"):
        steer_loss({4: torch.zeros(1, 4, 2)}, {4: m}, torch.ones(1, 2), normalize="geo")

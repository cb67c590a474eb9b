"""CorrFill's pure math against dense formulas written out here and the oracles of the paper/official code."""

import math

import pytest
import torch
import torch.nn.functional as F

from asuka.pipelines.corrfill import correspondence as cr
from asuka.pipelines.corrfill import guidance as gd
from asuka.pipelines.corrfill.config import PRESETS, CorrFillConfig, make_config

NAN = float("nan")


def centers(side):
    i = (torch.arange(side, dtype=torch.float64) + 0.5) / side
    return torch.stack(torch.meshgrid(i, i, indexing="ij"), -1).reshape(-1, 2).float()


def dense_resize(maps, side):
    """The official code's dense resize: (n,n,n,n) -> (H,H,H,H), bilinear keys / r^2, nearest-exact queries."""
    n = cr.grid_side(maps.shape[-1])
    if n == side:
        return maps
    up = F.interpolate(maps.reshape(1, n * n, n, n), size=(side, side), mode="bilinear") / (side // n) ** 2
    up = F.interpolate(up.reshape(1, n, n, -1).permute(0, 3, 1, 2), size=(side, side), mode="nearest-exact")
    return up.permute(0, 2, 3, 1).reshape(side * side, side * side)


def shifted_maps(side, shift, batch=1):
    """Target token (i, j) attends mostly to reference token (i, j + shift) (clipped)."""
    maps = torch.full((batch, side * side, side * side), 0.1)
    for i in range(side):
        for j in range(side):
            maps[:, i * side + j, i * side + min(j + shift, side - 1)] = 5.0
    return maps.softmax(-1)


# --- resampling and bank (oracles 10, 11) -------------------------------------------------------------------------

def test_upsample_keys_preserves_mass_and_maps_a_peak_to_its_block():
    torch.manual_seed(0)
    maps = torch.rand(1, 16, 16).softmax(-1)
    up = cr.upsample_keys(maps, 8)
    assert up.shape == (1, 16, 64)
    torch.testing.assert_close(up.sum(-1), maps.sum(-1), rtol=0.1, atol=0)
    peak = torch.zeros(1, 1, 16)
    peak[0, 0, 1 * 4 + 2] = 1.0  # coarse key (1, 2) of a 4x4 grid
    up = cr.upsample_keys(peak, 8).view(8, 8)
    block = up[2:4, 4:6]
    assert (block == block.max()).all() and up.max() == block.max()


@pytest.mark.parametrize("n, side", [(1, 8), (2, 8), (4, 8), (16, 64)])
def test_upsample_keys_is_bilinear_with_exact_edge_copies(n, side):
    """F.interpolate's bilinear sampling to float32 rounding, and the clamped edge keys (ratio / 2 of them on each
    side) are exact copies of their source, so their matching scores tie exactly (F.interpolate's (1-w)a + wa does
    not always give a: a near-tie whose winner depends on rounding elsewhere)."""
    torch.manual_seed(0)
    maps = torch.rand(2, 3, n * n)
    up = cr.upsample_keys(maps, side)
    dense = F.interpolate(maps.view(2, 3, n, n), size=(side, side), mode="bilinear", align_corners=False)
    torch.testing.assert_close(up, dense.reshape(2, 3, -1) / (side // n) ** 2, rtol=1e-6, atol=0)
    edge = side // n // 2
    grid = up.view(2, 3, side, side) * (side // n) ** 2
    source = maps.view(2, 3, n, n)
    assert torch.equal(grid[..., -edge:, -edge:], source[..., -1:, -1:].expand(2, 3, edge, edge))
    assert torch.equal(grid[..., :edge, :edge], source[..., :1, :1].expand(2, 3, edge, edge))


def test_vote_equals_the_dense_sum_of_clamped_median_subtracted_resized_maps():
    torch.manual_seed(0)
    side = 8
    bank = torch.zeros(1, 64, 64)
    expected = torch.zeros(64, 64)
    previous = bank.clone()
    for n in (8, 4, 2, 4, 8):
        maps = torch.rand(1, n * n, n * n).softmax(-1)
        cr.vote(bank, cr.upsample_keys(maps, side))
        dense = dense_resize(maps[0], side)
        expected += (dense - dense.median(-1, keepdim=True).values).clamp_min(0)
        assert (bank >= previous).all()  # non-decreasing (no dominant update)
        previous = bank.clone()
    torch.testing.assert_close(bank[0], expected, rtol=1e-5, atol=1e-7)


# --- argmax, dominant filter, smoothing (oracles 7, 8, 9) --------------------------------------------------------

def estimate(bank, **kw):
    args = dict(enable_filter=True, dominant_thresh=4, bank_update="off", enable_smoothing=True, smooth_window=0.2)
    return cr.estimate(bank, **{**args, **kw})


def test_argmax_recovers_a_shift_without_outliers_and_smoothing_keeps_it():
    side, shift = 8, 2
    bank = torch.zeros(1, 64, 64)
    cr.vote(bank, shifted_maps(side, shift))
    c = centers(side)
    expected = c.clone()
    expected[:, 1] = torch.clamp((torch.arange(64) % side + shift), max=side - 1).float().add(0.5) / side
    P, P_o = estimate(bank, enable_filter=False, enable_smoothing=False)
    torch.testing.assert_close(P[0], expected)
    # Only the clipped right columns pile up (on column side-1): interior rows keep their match.
    P, P_o = estimate(bank, enable_smoothing=False)
    interior = (torch.arange(64) % side) < side - shift - 1
    torch.testing.assert_close(P[0][interior], expected[interior])


def test_constant_displacement_is_a_fixed_point_of_smoothing():
    side = 8
    c = centers(side)
    P = (c + torch.tensor([0.0, 0.125])).clone()[None]
    P[0, (c[:, 1] + 0.125 >= 1)] = NAN
    valid = cr.valid_mask(P)
    weight = torch.rand(1, 64) + 0.1
    out = cr.smooth(P, valid, weight, 0.3)
    torch.testing.assert_close(out, P, equal_nan=True)


def test_dominant_filter_five_share_four_do_not():
    side = 8
    match = torch.arange(64)[None].clone()
    valid = torch.ones(1, 64, dtype=torch.bool)
    match[0, [3, 10, 20, 33, 40]] = 7  # token 7 matches 7 too: 6 share -> all outliers
    out = cr.dominant_outliers(match, valid, 4)
    assert set(out[0].nonzero().flatten().tolist()) == {3, 7, 10, 20, 33, 40}
    match = torch.arange(64)[None].clone()
    match[0, [3, 10, 20, 33]] = 63  # with 63 itself: 5 share
    assert set(cr.dominant_outliers(match, valid, 4)[0].nonzero().flatten().tolist()) == {3, 10, 20, 33, 63}
    match = torch.arange(64)[None].clone()
    match[0, [3, 10, 20]] = 63  # 4 share: none
    assert not cr.dominant_outliers(match, valid, 4).any()
    # Invalid tokens do not count.
    match[0, 5] = 63
    valid[0, 5] = False
    assert not cr.dominant_outliers(match, valid, 4).any()


def test_dominant_tokens_leave_P_and_stay_in_P_o():
    side = 8
    bank = torch.zeros(1, 64, 64)
    bank[0, torch.arange(64), torch.arange(64)] = 1.0
    for t in (1, 2, 3, 4, 5):
        bank[0, t, 9] = 2.0  # five target tokens share reference 9
    P, P_o = estimate(bank, enable_smoothing=False)
    for t in (1, 2, 3, 4, 5):
        assert P[0, t].isnan().all()
        torch.testing.assert_close(P_o[0, t], centers(side)[9])
    assert P_o[0, 0].isnan().all() and not P[0, 0].isnan().any()


@pytest.mark.parametrize("mode", ["zero_pair", "code_compat"])
def test_dominant_bank_update_zeroes_the_right_entries(mode):
    torch.manual_seed(0)
    bank = torch.rand(1, 64, 64) * 0.1 + torch.eye(64)
    for t in (1, 2, 3, 4):
        bank[0, t, 9] = 2.0  # with token 9 itself: five share reference 9
    before = bank.clone()
    estimate(bank, bank_update=mode, enable_smoothing=False)
    changed = (bank != before).nonzero()[:, 1:].tolist()
    if mode == "zero_pair":
        assert sorted(changed) == [[t, 9] for t in (1, 2, 3, 4, 9)]
    else:  # C[P(t), P(P(t))]: row 9 (the reference index read as a target index), at row 9's own argmax
        assert changed == [[9, int(before[0, 9].argmax())]]
    assert all(bank[0, r, c] == 0 for r, c in changed)


def dense_smooth(P, weight, radius):
    side = cr.grid_side(P.shape[0])
    c = centers(side)
    valid = ~P[:, 0].isnan()
    out = torch.full_like(P, NAN)
    for t in range(P.shape[0]):
        if not valid[t]:
            continue
        near = valid & ((c - c[t]).norm(dim=-1) < radius)
        w = weight * near
        disp = ((P - c).nan_to_num(0) * w[:, None]).sum(0) / w.sum()
        new = c[t] + disp
        if ((new >= 0) & (new < 1)).all():
            out[t] = new
    return out


def test_smoothing_equals_the_dense_weighted_mean_and_ignores_outliers():
    torch.manual_seed(0)
    side = 8
    c = centers(side)
    P = (c + 0.05 * torch.randn(64, 2)).clamp(0.01, 0.99)
    P[[5, 17, 40]] = NAN  # invalid / outliers
    weight = torch.rand(64) + 0.1
    expected = dense_smooth(P, weight, 0.3)
    out = cr.smooth(P[None], cr.valid_mask(P[None]), weight[None], 0.3)[0]
    torch.testing.assert_close(out, expected, equal_nan=True)
    # Scaling the weights changes nothing; outliers' weights are ignored.
    torch.testing.assert_close(cr.smooth(P[None], cr.valid_mask(P[None]), 7 * weight[None], 0.3)[0], out,
                               equal_nan=True)
    w2 = weight.clone()
    w2[[5, 17, 40]] = 100.0
    torch.testing.assert_close(cr.smooth(P[None], cr.valid_mask(P[None]), w2[None], 0.3)[0], out, equal_nan=True)


def test_smoothing_pulls_a_corrupted_displacement_towards_its_neighbours_and_drops_out_of_range():
    side = 8
    c = centers(side)
    P = c + torch.tensor([0.0, 0.0625])
    P[c[:, 1] + 0.0625 >= 1] = NAN
    t = 3 * side + 3
    P[t] = torch.tensor([0.9, 0.9])
    weight = torch.ones(64)
    weight[t] = 0.1
    out = cr.smooth(P[None], cr.valid_mask(P[None]), weight[None], 0.3)[0]
    assert (out[t] - (c[t] + torch.tensor([0.0, 0.0625]))).norm() < (P[t] - (c[t] + torch.tensor([0.0, 0.0625]))).norm() / 2
    # A field pushing everything right by 0.3: tokens near the right border leave the image -> NaN.
    P = c + torch.tensor([0.0, 0.3])
    P[:, 1] = P[:, 1].clamp(max=0.99)
    out = cr.smooth(P[None], cr.valid_mask(P[None]), torch.ones(1, 64), 0.15)[0]
    assert out[7].isnan().all()  # (0, 7): mean displacement of its neighbours sends it past 1


# --- attention mask (oracles 4, 5, 6) -----------------------------------------------------------------------------

def test_mask_structure():
    side = 4
    c = centers(side)
    P = torch.full((1, 16, 2), NAN)
    P_o = torch.full((1, 16, 2), NAN)
    P[0, 0] = c[5]                 # valid query 0 -> reference token 5
    P_o[0, 1] = c[10]              # outlier-only query 1
    boost = torch.tensor([1.5])
    radius = gd.mask_radius(1, side)  # one token
    m = gd.target_to_reference_mask(P, P_o, side, 1, boost)[0]
    d0 = (c - c[5]).norm(dim=-1)
    assert torch.equal(m[0], torch.where(d0 <= radius, 1.5, float("-inf")))
    d1 = (c - c[10]).norm(dim=-1)
    assert torch.equal(m[1], torch.where(d1 < radius, float("-inf"), 0.0))
    assert (m[2:] == 0).all()
    full = gd.stitched_key_mask(m[None])[0].view(16, 4, 8)
    assert (full[..., 4:] == 0).all()  # target keys
    torch.testing.assert_close(full[..., :4].reshape(16, 16), m)


def test_radius_semantics_and_boundary():
    assert gd.mask_radius(2, 8) == 2 / 8 and gd.mask_radius(2, 64) == 2 / 64  # same token count at every scale
    assert gd.mask_radius(-0.3, 8) == 0.3 and gd.mask_radius(-0.01, 8) == 1 / 16
    side = 8
    c = centers(side)
    P = torch.full((1, 64, 2), NAN)
    P[0, 0] = c[0]
    m = gd.target_to_reference_mask(P, torch.full_like(P, NAN), side, 2, torch.tensor([1.0]))[0, 0].view(8, 8)
    assert m[0, 2] == 1.0 and m[0, 3] == float("-inf") and m[2, 0] == 1.0  # exactly 2 tokens away: included
    m = gd.target_to_reference_mask(torch.full_like(P, NAN), P, side, 2, torch.tensor([1.0]))[0, 0].view(8, 8)
    assert m[0, 2] == 0 and m[0, 1] == float("-inf")  # suppression excludes the boundary


def test_coarse_layer_uses_block_nanmean():
    P = torch.full((1, 64, 2), NAN)
    P[0, 0] = torch.tensor([0.1, 0.2])
    P[0, 1] = torch.tensor([0.3, 0.4])
    out = gd.block_nanmean(P, 4)
    torch.testing.assert_close(out[0, 0], torch.tensor([0.2, 0.3]))
    assert out[0, 1:].isnan().all()
    with pytest.raises(ValueError):
        gd.block_nanmean(torch.zeros(1, 36, 2), 2)  # ratio 3


def test_mask_effect_in_sdpa():
    torch.manual_seed(0)
    side = 4
    c = centers(side)
    P = torch.full((1, 16, 2), NAN)
    P[0, :8] = c[torch.arange(8) + 4]
    m = gd.stitched_key_mask(gd.target_to_reference_mask(P, torch.full_like(P, NAN), side, 1, torch.tensor([2.0])))
    q, k = torch.randn(16, 8), torch.randn(32, 8)
    logits = q @ k.T / math.sqrt(8)
    probs = (logits + m[0]).softmax(-1)
    assert not probs.isnan().any()
    torch.testing.assert_close(probs.sum(-1), torch.ones(16))
    assert (probs[m[0] == float("-inf")] == 0).all()
    boosted = m[0] == 2.0
    base = logits.softmax(-1)
    assert ((probs * boosted).sum(-1)[:8] > (base * boosted).sum(-1)[:8]).all()


# --- objective and update (oracles 12, 13) ------------------------------------------------------------------------

def dense_loss(maps, P, radius):
    """The official bce_loss on dense tensors: resize, heatmap E, class-balanced BCE-with-logits, mean."""
    side = cr.grid_side(P.shape[0])
    A = dense_resize(maps, side)
    valid = ~P[:, 0].isnan()
    c = centers(side)
    E = ((c[None] - P[:, None]).norm(dim=-1) < radius).float()
    pred, gt = A[valid], E[valid]
    pos, neg = (gt == 1).float(), (gt == 0).float()
    w = neg.sum() / gt.numel() * pos + pos.sum() / gt.numel() * neg
    mx = (pred + 1e-7).max(-1, keepdim=True).values
    md = (pred + 1e-7).median(-1, keepdim=True).values
    x = ((pred - md) / mx).clamp(0, 1)
    return F.binary_cross_entropy_with_logits(x, gt, w)


@pytest.mark.parametrize("n", [8, 4, 2])
def test_loss_equals_the_dense_bce(n):
    torch.manual_seed(n)
    side = 8
    maps = torch.randn(1, n * n, n * n).mul(3).softmax(-1)
    c = centers(side)
    P = (c + 0.03 * torch.randn(64, 2)).clamp(0.0, 0.999)
    P[[1, 9, 30]] = NAN
    got = gd.correspondence_loss(cr.upsample_keys(maps, side), P[None], 0.3)
    torch.testing.assert_close(got[0], dense_loss(maps[0], P, 0.3))


def test_heatmap_radius_and_two_by_two_hand_value():
    side = 64
    c = centers(side)
    idx, member = gd.positive_keys(c[None], 0.05)
    assert member[0, 2080].sum() == 37  # a token centre: 37 reference tokens within 0.05 at side 64
    dense = (c - c[2080]).norm(dim=-1) < 0.05
    assert sorted(idx[0, 2080][member[0, 2080]].tolist()) == dense.nonzero().flatten().tolist()
    # 2x2 tokens, one valid row: E = [1, 0, 0, 0]; hand-computed weighted BCE.
    maps = torch.tensor([[[0.7, 0.1, 0.1, 0.1]] * 4])
    P = torch.full((1, 4, 2), NAN)
    P[0, 0] = torch.tensor([0.25, 0.25])
    x = torch.tensor([1.0, 0.0, 0.0, 0.0])  # (a - median) / max clamped: (0.7-0.1)/0.7 -> 6/7 for a[0]
    x[0] = (0.7 - (0.1 + 1e-7)) / (0.7 + 1e-7)
    bce = F.softplus(x) - x * torch.tensor([1.0, 0, 0, 0])
    expected = (0.75 * bce[0] + 0.25 * bce[1:].sum()) / 4
    torch.testing.assert_close(gd.correspondence_loss(maps, P, 0.3)[0], expected)


def test_loss_descends_along_the_normalised_gradient():
    torch.manual_seed(0)
    side = 8
    logits = torch.randn(1, 64, 64, dtype=torch.float64, requires_grad=True)
    c = centers(side).double()
    P = c.clone()[None]
    S = gd.correspondence_loss(logits.softmax(-1), P, 0.2)
    g, = torch.autograd.grad(S.sum(), logits)
    step = gd.normalized_gradient(g)
    with torch.no_grad():
        S2 = gd.correspondence_loss((logits - 1e-3 * step).softmax(-1), P, 0.2)
    assert S2 < S


def test_update_touches_only_the_target_half_with_the_documented_scale():
    torch.manual_seed(0)
    z = torch.randn(2, 4, 8, 16)
    d = torch.randn(2, 4, 8, 8)
    rho = torch.tensor([0.5, 1.0])
    out = gd.latent_update(z, d, base_lr=0.03, rho=rho, sigma=0.4, strength=2.0)
    assert torch.equal(out[..., :8], z[..., :8])
    torch.testing.assert_close(z[..., 8:] - out[..., 8:], 0.03 * 0.4 * 2.0 * rho.view(2, 1, 1, 1) * d)
    assert torch.equal(gd.latent_update(z, d, base_lr=0.03, rho=rho, sigma=0.0, strength=2.0), z)
    g = torch.randn(2, 4, 8, 8)
    g[1] = 0
    n = gd.normalized_gradient(g)
    torch.testing.assert_close(n[0].double().std(), torch.tensor(1.0, dtype=torch.float64))
    assert (n[1] == 0).all()


def test_sigma_table_matches_ddim_and_is_zero_without_eta():
    from diffusers import DDIMScheduler, PNDMScheduler

    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(50)
    table = gd.sigma_table(sched, 1.0)
    ts = sched.timesteps.tolist()
    for t, s in zip(ts, table):
        prev = t - 1000 // 50
        assert s == pytest.approx(float(sched._get_variance(t, prev)) ** 0.5, rel=1e-5)
    values = dict(zip(ts, table))
    for t, s in {981: 0.454, 801: 0.397, 501: 0.295, 201: 0.185, 21: 0.039, 1: 0.021}.items():
        assert values[t] == pytest.approx(s, abs=2e-3)
    assert gd.sigma_table(sched, 0.0) == [0.0] * 50
    pndm = PNDMScheduler(skip_prk_steps=True)
    pndm.set_timesteps(10)
    assert set(gd.sigma_table(pndm, 1.0)) == {0.0}
    with pytest.warns(UserWarning, match="no effect"):
        gd.warn_if_no_update(pndm, 1.0, 5)


# --- settings -----------------------------------------------------------------------------------------------------

def test_presets_follow_table_s1():
    sbs = make_config("side-by-side")
    assert (sbs.step_masking, sbs.step_optimize, sbs.mask_window, sbs.smooth_window, sbs.mask_boost,
            sbs.str_optimize) == (50, 50, 2, 0.2, 1, 2)
    lr = make_config("leftrefill", "leftrefill-megadepth")
    assert (lr.step_masking, lr.step_optimize, lr.mask_boost) == (5, 5, 0)
    assert make_config("leftrefill", "leftrefill-megadepth-code").step_masking == 15
    assert make_config("paint-by-example").vote_layers == tuple(range(10, 15))
    assert make_config("ip-adapter-plus").mask_window == -0.3
    assert len([p for p in PRESETS if not p.endswith("-code")]) == 8
    clean = make_config(profile="paper_clean")
    assert clean.dominant_bank_update == "zero_pair" and clean.mask_uncond_branch
    assert make_config().dominant_bank_update == "code_compat"


def test_bad_settings_are_input_errors_naming_the_field():
    from asuka.errors import InputError

    with pytest.raises(InputError, match="preset .* is for baseline"):
        make_config("side-by-side", "leftrefill-re10k")
    with pytest.raises(InputError, match="mask_window"):
        CorrFillConfig(mask_window=0)
    with pytest.raises(InputError, match="baseline"):
        make_config("nope")
    with pytest.raises(InputError, match="unknown CorrFill setting"):
        make_config(foo=1)

"""HD-Painter's pure math against the paper's / official code's numbers and dense re-implementations
(oracles O1-O4, P3, R2, R3, R6 (loss), S1, S3-S5, Q1)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from asuka.models.tiny import SD15_SCHEDULE, tiny_tokenizer
from asuka.pipelines.hd_painter import blend, painta, preprocess, rasg, sr


def _sd_ddim(**kw) -> DDIMScheduler:
    return DDIMScheduler(**SD15_SCHEDULE, clip_sample=False, timestep_spacing="trailing", set_alpha_to_one=True, **kw)


# ------------------------------------------------------------------------------------------------ O1-O4
def test_o1_trailing_timesteps():
    s = _sd_ddim()
    s.set_timesteps(50)
    assert s.timesteps.tolist() == list(range(999, 0, -20))
    assert int((s.timesteps > 500).sum()) == 25
    up = DDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
    up.set_timesteps(20)
    assert up.timesteps.tolist() == list(range(999, 0, -50))


def test_o2_sigma_official_and_paper():
    s = _sd_ddim()
    official = lambda t: rasg.sigma(s.alphas, s.alphas_cumprod, t, t - 20, 1.0, "official")  # noqa: E731
    paper = lambda t: rasg.sigma(s.alphas, s.alphas_cumprod, t, t - 20, 1.0, "paper")  # noqa: E731
    assert official(999) == pytest.approx(0.018542, abs=2e-6)
    assert paper(999) == pytest.approx(0.45999, abs=2e-5)
    assert official(499) == pytest.approx(0.014538, abs=2e-6)
    assert paper(499) == pytest.approx(0.29408, abs=2e-5)
    assert rasg.sigma(s.alphas, s.alphas_cumprod, 19, -1, 0.1, "official") == 0.0   # raw formula would be NaN
    assert rasg.sigma(s.alphas, s.alphas_cumprod, 999, 979, 0.1, "official") == pytest.approx(0.0018542, abs=2e-7)
    with pytest.raises(ValueError, match="sigma_mode"):
        rasg.sigma(s.alphas, s.alphas_cumprod, 999, 979, 0.1, "cumulative")


def test_o3_gaussian_kernel():
    assert painta.gaussian_kernel_1d().tolist() == pytest.approx([0.211942, 0.576117, 0.211942], abs=1e-6)
    # torchvision's default sigma for a 19-tap blur, the SR blend mask's
    assert 0.3 * ((sr.SR_MASK_BLUR - 1) * 0.5 - 1) + 0.8 == pytest.approx(3.2)


def test_o4_token_indices(tmp_path):
    tok = tiny_tokenizer(tmp_path)
    tau = "a red boat"
    full = f"{tau}, Full HD, 4K, high quality, high resolution"
    ids = lambda text: tok([text], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids  # noqa: E731
    n = len(tok(tau).input_ids) - 2
    n_full = len(tok(full).input_ids) - 2
    w = preprocess.token_weights(ids(tau), ids(full), tok.eos_token_id)
    assert preprocess.token_indices(w[0]) == list(range(1, n + 1)) + [n_full + 1]
    # a batch with different prompts, and an empty prompt (only the full prompt's EOT)
    w2 = preprocess.token_weights(torch.cat([ids(tau), ids("")]), torch.cat([ids(full), ids("Full HD")]),
                                  tok.eos_token_id)
    assert preprocess.token_indices(w2[0]) == list(range(1, n + 1)) + [n_full + 1]
    assert preprocess.token_indices(w2[1]) == [len(tok("Full HD").input_ids) - 1]
    # truncation: the full prompt's EOT lands on 76 and the user's words beyond it are dropped
    long_tau = " ".join(["boat"] * 100)
    w3 = preprocess.token_weights(ids(long_tau), ids(long_tau + ", Full HD"), tok.eos_token_id)
    assert preprocess.token_indices(w3[0]) == list(range(1, 77))


def test_o4_pad_token_zero_uses_first_eos():
    # SD2's tokenizer pads with id 0: the first EOS is the one that counts
    eos = 9
    prompt = torch.tensor([[8, 1, 2, eos, 0, 0, 0]])
    full = torch.tensor([[8, 1, 2, 3, 4, eos, 0]])
    assert preprocess.token_indices(preprocess.token_weights(prompt, full, eos)[0]) == [1, 2, 5]


# ------------------------------------------------------------------------------------------------ PAIntA
def test_p3_c_range_zeros_and_lower_median():
    torch.manual_seed(0)
    raw = torch.rand(3, 64)
    c = painta.normalise(raw)
    assert float(c.min()) >= 0 and float(c.max()) < 1
    assert bool(((c == 0).sum(-1) >= math.ceil(64 / 2)).all())
    lower_median = raw.sort(-1).values[:, 31:32]                # torch.median: the lower of the two middle values
    torch.testing.assert_close(c, ((raw - lower_median) / raw.amax(-1, keepdim=True)).clamp(0, 1))


def test_p3_all_tokens_gives_unit_map_and_kernel_padding():
    probs = torch.rand(2, 3, 36, 77).softmax(-1)
    weights = torch.ones(2, 77)
    raw = painta.prompt_relevance(probs, weights)
    torch.testing.assert_close(raw, torch.ones(2, 36))
    torch.testing.assert_close(painta.compute_c(probs, weights, (6, 6), smooth=False), torch.zeros(2, 36),
                               atol=1e-6, rtol=0)   # equal up to float rounding of the softmax sums
    sm = painta.smooth_3x3(raw, (6, 6)).reshape(2, 6, 6)
    torch.testing.assert_close(sm[:, 1:-1, 1:-1], torch.ones(2, 4, 4))
    torch.testing.assert_close(sm[:, 0, 1:-1], torch.full((2, 4), 0.78806), atol=1e-5, rtol=0)
    torch.testing.assert_close(sm[:, [0, 0, -1, -1], [0, -1, 0, -1]], torch.full((2, 4), 0.62104), atol=1e-5, rtol=0)


def test_p2_scale_logits_case_split():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6, 6)
    c = torch.rand(2, 6)
    m = torch.tensor([[1, 1, 0, 0, 1, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.float32)
    out = painta.scale_logits(logits, c, m)
    for b in range(2):
        for i in range(6):
            for j in range(6):
                factor = c[b, j] if (m[b, i] == 1 and m[b, j] == 0) else 1.0
                torch.testing.assert_close(out[b, :, i, j], logits[b, :, i, j] * factor)


# ------------------------------------------------------------------------------------------------ RASG
def test_r2_paper_step_equals_diffusers_ddim():
    s = _sd_ddim()
    s.set_timesteps(50)
    torch.manual_seed(0)
    z, eps, g = torch.randn(3, 2, 4, 8, 8).unbind(0)
    g_hat = rasg.standardise(g)
    for t in (999, 499, 19):
        t_prev = t - 20
        sig = rasg.sigma(s.alphas, s.alphas_cumprod, t, t_prev, 0.7, "paper")
        ab_prev = s.alphas_cumprod[t_prev] if t_prev >= 0 else s.final_alpha_cumprod
        ours, x0 = rasg.ddim_step(z, eps, s.alphas_cumprod[t], ab_prev, sig, g_hat)
        ref = s.step(eps, t, z, eta=0.7, variance_noise=g_hat)
        torch.testing.assert_close(ours, ref.prev_sample, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(x0, ref.pred_original_sample)
    # sigma = 0: bit for bit diffusers' deterministic step
    ours, _ = rasg.ddim_step(z, eps, s.alphas_cumprod[499], s.alphas_cumprod[479])
    assert torch.equal(ours, s.step(eps, 499, z, eta=0.0).prev_sample)
    with pytest.raises(ValueError, match="noise"):
        rasg.ddim_step(z, eps, s.alphas_cumprod[499], s.alphas_cumprod[479], 0.1, None)


def test_r3_standardise_keeps_mean():
    torch.manual_seed(0)
    g = torch.randn(3, 4, 8, 8) * torch.tensor([0.01, 1.0, 50.0]).view(3, 1, 1, 1) + 0.3
    g_hat = rasg.standardise(g)
    torch.testing.assert_close(g_hat.flatten(1).std(1), torch.ones(3))
    torch.testing.assert_close(g_hat.flatten(1).mean(1), g.flatten(1).mean(1) / g.flatten(1).std(1))
    assert torch.isfinite(rasg.standardise(torch.zeros(1, 4, 2, 2))).all()


def test_r6_bce_loss_matches_numpy():
    torch.manual_seed(0)
    layers = [torch.randn(2, 2, 16, 77) for _ in range(3)]     # (B, heads, N, L) cond-half logits of 3 layers
    mask = (torch.rand(2, 16) > 0.5).float()
    weights = torch.zeros(2, 77)
    weights[0, [1, 2, 5]] = 1
    weights[1, [1, 3]] = 1
    ours = rasg.bce_loss(rasg.mean_cross_attention([x.mean(1) for x in layers]), mask, weights)
    a = np.concatenate([x.numpy() for x in layers], axis=1).astype(np.float64).mean(axis=1)   # (B, N, L)
    for b in range(2):
        total = 0.0
        for k in np.nonzero(weights[b].numpy())[0]:
            z = a[b, :, k] - 1.0
            y = mask[b].numpy()
            p = 1 / (1 + np.exp(-z))
            total += np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p)))
        assert float(ours[b]) == pytest.approx(total, rel=1e-5)


# ------------------------------------------------------------------------------------------------ SR
def test_s1_v_conversions_round_trip():
    torch.manual_seed(0)
    z, v = torch.randn(2, 2, 4, 8, 8, dtype=torch.float64).unbind(0)
    ab = torch.tensor(0.37, dtype=torch.float64)
    eps, x0 = sr.v_to_eps_x0(v, z, ab)
    torch.testing.assert_close(ab.sqrt() * x0 + (1 - ab).sqrt() * eps, z)
    up = DDIMScheduler(num_train_timesteps=1000, prediction_type="v_prediction", beta_schedule="scaled_linear",
                       beta_start=1e-4, beta_end=0.02, clip_sample=False)
    up.set_timesteps(20)
    ref = up.step(v.float(), int(up.timesteps[3]), z.float())
    _, x0_ref = sr.v_to_eps_x0(v.float(), z.float(), up.alphas_cumprod[int(up.timesteps[3])])
    torch.testing.assert_close(x0_ref, ref.pred_original_sample)


def test_s3_step_uses_pre_blend_eps():
    torch.manual_seed(0)
    z, v, known = torch.randn(3, 1, 4, 8, 8).unbind(0)
    m = torch.rand(1, 1, 8, 8)
    ab, ab_prev = torch.tensor(0.3), torch.tensor(0.5)
    eps, x0 = sr.v_to_eps_x0(v, z, ab)
    x0b = sr.blend_x0(x0, known, m)
    expected = ab_prev.sqrt() * (m * (ab.sqrt() * z - (1 - ab).sqrt() * v) + (1 - m) * known) \
        + (1 - ab_prev).sqrt() * (ab.sqrt() * v + (1 - ab).sqrt() * z)
    torch.testing.assert_close(sr.deterministic_step(x0b, eps, ab_prev), expected)


def test_s4_sizes():
    assert sr.sr_sizes(512, 512) == ((2048, 2048), (2048, 2048))
    assert sr.sr_sizes(300, 400) == ((1536, 2048), (1536, 2048))
    (h, w), (ph, pw) = sr.sr_sizes(333, 500)
    assert max(h, w) == 2048 and ph % 256 == 0 and pw % 256 == 0 and (ph - h) < 256
    assert preprocess.working_size(333, 500) == (340, 512)       # upsampled small inputs too, int() truncation
    lh, lw = preprocess.working_size(333, 500)
    assert (lh + (-lh) % 64) * 4 == ph and (lw + (-lw) % 64) * 4 == pw   # 512-scale pad x64 == latent of 2048-scale


def test_soft_blend_mask_shape_range():
    m = torch.zeros(1, 1, 256, 256)
    assert bool((sr.soft_blend_mask(m, (64, 64)) == 0).all())
    m[..., 60:200, 60:200] = 1                                  # latent 15..50, dilated by 19 px = ~5 latent px
    soft = sr.soft_blend_mask(m, (64, 64))
    assert soft.shape == (1, 1, 64, 64) and float(soft.max()) <= 1 and float(soft.min()) >= 0
    row = soft[0, 0, 32]
    assert float(row[32]) == pytest.approx(1.0, abs=1e-4) and float(row[0]) < 1e-3
    assert bool(((row[5:15] > 0.01) & (row[5:15] < 0.99)).any())   # a soft edge around the dilated hole
    torch.testing.assert_close(sr.soft_blend_mask(torch.ones(1, 1, 64, 64), (16, 16)), torch.ones(1, 1, 16, 16))


def test_s5_poisson_outside_dilated_bbox_is_exact():
    rng = np.random.default_rng(0)
    orig = rng.integers(0, 256, (120, 150, 3), dtype=np.uint8)
    fake = rng.integers(0, 256, (120, 150, 3), dtype=np.uint8)
    mask = np.zeros((120, 150), np.uint8)
    mask[50:70, 60:90] = 255
    out = blend.poisson_blend(orig, fake, mask)
    rows, cols = np.nonzero(mask)
    r = blend.POISSON_DILATION // 2
    outside = np.ones(mask.shape, bool)
    outside[rows.min() - r:rows.max() + r + 1, cols.min() - r:cols.max() + r + 1] = False
    assert np.array_equal(out[outside], orig[outside])
    assert not np.array_equal(out[60, 75], orig[60, 75])
    assert np.array_equal(blend.poisson_blend(orig, fake, np.zeros_like(mask)), orig)
    # a hole touching the border still works (the padding keeps the dilated mask off the edge)
    mask[:] = 0
    mask[0:10, 0:20] = 1
    assert blend.poisson_blend(orig, fake, mask).shape == orig.shape


# ------------------------------------------------------------------------------------------------ Q1
def test_q1_preprocessing():
    assert preprocess.working_size(1000, 500) == (512, 256)
    assert preprocess.working_size(480, 640, 1024) == (768, 1024)
    x = torch.zeros(1, 3, 50, 70)
    padded, size = preprocess.pad_bottom_right(x, 64, value=-1)
    assert padded.shape[-2:] == (64, 128) and size == (50, 70)
    assert bool((padded[..., 50:, :] == -1).all()) and bool((padded[..., :, 70:] == -1).all())
    m = torch.zeros(1, 1, 9, 9)
    m[..., 4, 4] = 1
    d = preprocess.dilate(m, 1)[0, 0]
    assert d.sum() == 5 and d[3, 4] == d[5, 4] == d[4, 3] == d[4, 5] == 1 and d[3, 3] == 0   # 4-neighbourhood
    assert preprocess.dilate(m, 3)[0, 0].sum() == 25                                         # L1 diamond radius 3
    one = torch.zeros(1, 1, 64, 64)
    one[..., 10, 10] = 1                                            # a single pixel: any coverage at latent size
    assert preprocess.latent_mask(one, (8, 8))[0, 0, 1, 1] == 1
    assert preprocess.attention_mask(one, (8, 8)).sum() == 0        # thresholded at 0.5 for PAIntA / RASG
    block = torch.zeros(1, 1, 64, 64)
    block[..., :32, :] = 1
    att = preprocess.attention_mask(block, (4, 4))[0, 0]
    assert att[:2].sum() == 8 and att[2:].sum() == 0

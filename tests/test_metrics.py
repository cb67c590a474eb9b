"""Metrics against hand-computed values and independent references (scikit-image, torchmetrics, scipy)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from scipy import linalg
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from asuka.metrics import (
    CLIPScore, InceptionFeatures, LPIPS, MissingWeightsError, boundary_gradient, fid_from_features,
    inception_discriminative_scores, kid_from_features, psnr, save_random_inception_weights, save_tiny_clip, ssim,
)


def _pair(seed: int = 0, size: int = 64, batch: int = 2, noise: float = 0.2):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
    b = (a + noise * torch.randn(batch, 3, size, size, generator=g)).clamp(-1, 1)
    return a, b


def _unit_np(x: torch.Tensor) -> np.ndarray:
    return ((x.double() + 1) / 2).numpy()


# ---------------------------------------------------------------- PSNR / SSIM
def test_psnr_matches_skimage_and_identity_is_bounded():
    a, b = _pair()
    ours = psnr(a, b)
    for i in range(2):
        ref = peak_signal_noise_ratio(_unit_np(a[i]), _unit_np(b[i]), data_range=1.0)
        assert ours[i].item() == pytest.approx(ref, abs=1e-3)
    assert torch.allclose(psnr(a, a), torch.full((2,), 70.0, dtype=torch.float64))  # -10 log10(1e-7)


def test_known_region_psnr_is_mse_over_known_pixels():
    a, b = _pair()
    known = torch.zeros(2, 1, 64, 64)
    known[..., :, :20] = 1
    expected = [peak_signal_noise_ratio(_unit_np(a[i, :, :, :20]), _unit_np(b[i, :, :, :20]), data_range=1.0)
                for i in range(2)]
    assert psnr(a, b, known).numpy() == pytest.approx(expected, abs=1e-3)
    assert torch.isnan(psnr(a, b, torch.zeros_like(known))).all()


def test_ssim_matches_skimage_gray_and_rgb():
    a, b = _pair(1)
    gray = torchvision.transforms.functional.rgb_to_grayscale
    for i in range(2):
        ref_gray = structural_similarity(gray(torch.from_numpy(_unit_np(a[i])))[0].numpy(),
                                         gray(torch.from_numpy(_unit_np(b[i])))[0].numpy(), data_range=1.0)
        ref_rgb = structural_similarity(_unit_np(a[i]), _unit_np(b[i]), data_range=1.0, channel_axis=0)
        assert ssim(a, b)[i].item() == pytest.approx(ref_gray, abs=1e-10)
        assert ssim(a, b, gray=False)[i].item() == pytest.approx(ref_rgb, abs=1e-10)
    assert torch.allclose(ssim(a, a), torch.ones(2, dtype=torch.float64))


def test_known_region_ssim_is_mean_of_map_over_region():
    a, b = _pair(2)
    b[..., :, 32:] = a[..., :, 32:]  # right half identical -> SSIM map is exactly 1 well inside it
    known = torch.zeros(2, 1, 64, 64)
    known[..., :, 40:] = 1
    assert torch.allclose(ssim(a, b, known), torch.ones(2, dtype=torch.float64))
    assert (ssim(a, b) < 1).all()
    # whole-image region equals the plain score
    assert torch.allclose(ssim(a, b, torch.ones_like(known)), ssim(a, b))


def test_pixel_metrics_reject_bad_shapes():
    a, b = _pair()
    with pytest.raises(ValueError, match="same shape"):
        psnr(a, b[..., :32])
    with pytest.raises(ValueError, match="within"):
        ssim(a, b, torch.ones(2, 3, 64, 64))


# ---------------------------------------------------------------- Grad
def test_grad_of_known_step_at_mask_edge():
    """A constant offset c inside a half-plane hole gives |Sobel| = 4c·127.5 on the boundary columns."""
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(2, 3, 64, 64, generator=g) * 1.6 - 0.8
    mask = torch.zeros(2, 1, 64, 64)
    mask[..., :, 32:] = 1
    c = 0.2
    assert torch.allclose(boundary_gradient(gt + c * mask, gt, mask), torch.full((2,), 4 * c * 127.5,
                                                                                   dtype=torch.float64))
    assert torch.allclose(boundary_gradient(gt, gt, mask), torch.zeros(2, dtype=torch.float64))
    assert torch.isnan(boundary_gradient(gt, gt, torch.zeros_like(mask))).all()  # no edge: undefined


# ---------------------------------------------------------------- FID / KID / IDS
def test_fid_identical_features_is_zero_and_matches_gaussian_formulas():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=g)
    assert fid_from_features(x, x) == pytest.approx(0.0, abs=1e-9)
    # 1-D: (mu1-mu2)^2 + s1 + s2 - 2 sqrt(s1 s2) with unbiased variances
    a, b = torch.randn(300, 1, generator=g), 2 * torch.randn(300, 1, generator=g) + 0.5
    s1, s2 = a.double().var().item(), b.double().var().item()
    expected = (a.double().mean() - b.double().mean()).item() ** 2 + s1 + s2 - 2 * np.sqrt(s1 * s2)
    assert fid_from_features(a, b) == pytest.approx(expected, rel=1e-9)
    # 2-D correlated: closed form with scipy's matrix square root
    a = torch.randn(400, 2, generator=g) @ torch.tensor([[1.0, 0.5], [0.0, 1.0]])
    b = torch.randn(400, 2, generator=g) * torch.tensor([0.7, 1.5]) + 1.0
    an, bn = a.double().numpy(), b.double().numpy()
    c1, c2 = np.cov(an, rowvar=False), np.cov(bn, rowvar=False)
    ref = np.sum((an.mean(0) - bn.mean(0)) ** 2) + np.trace(c1 + c2 - 2 * linalg.sqrtm(c1 @ c2).real)
    assert fid_from_features(a, b) == pytest.approx(ref, rel=1e-7)


@pytest.mark.parametrize("n,m,d", [(50, 80, 16), (12, 9, 64)])
def test_fid_matches_torch_fidelity_including_rank_deficient(n, m, d):
    """Same value as torch-fidelity's eigenvalue formula, also with fewer samples than dimensions."""
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    g = torch.Generator().manual_seed(n)
    a = torch.randn(n, d, generator=g) * 3 + 1
    b = torch.randn(m, d, generator=g) @ torch.randn(d, d, generator=g) * 0.3
    stats = [{"mu": x.double().numpy().mean(0), "sigma": np.cov(x.double().numpy(), rowvar=False)} for x in (a, b)]
    ref = fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]
    assert fid_from_features(a, b) == pytest.approx(ref, rel=1e-6)  # eigvals of a singular product: ~1e-8 noise


@pytest.mark.parametrize("n,m,d", [(300, 260, 16), (40, 70, 24)])
def test_fid_large_sets_use_the_covariance_form_and_equal_torch_fidelity(n, m, d):
    """N > D takes the D×D path (memory O(D²)); same value as torch-fidelity and as the N×M product form."""
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    from asuka.metrics.fid import trace_sqrt_product

    g = torch.Generator().manual_seed(n)
    a = torch.randn(n, d, generator=g) * 2 + 0.5
    b = torch.randn(m, d, generator=g) @ torch.randn(d, d, generator=g) * 0.5
    stats = [{"mu": x.double().numpy().mean(0), "sigma": np.cov(x.double().numpy(), rowvar=False)} for x in (a, b)]
    ref = fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]
    assert fid_from_features(a, b) == pytest.approx(ref, rel=1e-8)
    # the product form on the same data (forced by widening the features with zero columns: same statistics)
    pad = max(n, m) - d
    wide = [torch.nn.functional.pad(x, (0, pad)) for x in (a, b)]
    assert fid_from_features(*wide) == pytest.approx(ref, rel=1e-7)
    ca, cb = (torch.from_numpy(s["sigma"]) for s in stats)
    product = ca @ cb
    assert float(trace_sqrt_product(ca, cb)) == pytest.approx(
        float(torch.linalg.eigvals(product).real.clamp(min=0).sqrt().sum()), rel=1e-8)


def test_kid_options_reach_the_estimator():
    """Non-default kernel options change the value and equal the hand-computed unbiased MMD² with that kernel."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(25, 8, generator=g), torch.randn(25, 8, generator=g) * 1.3 + 0.2
    xn, yn = x.double().numpy(), y.double().numpy()
    n = 25

    def mmd(k):
        kxx, kyy, kxy = k(xn, xn), k(yn, yn), k(xn, yn)
        return (kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2 * kxy.mean()

    poly = kid_from_features(x, y, subsets=2, degree=2, gamma=0.5, coef0=0.25)["kid_mean"]
    assert poly == pytest.approx(mmd(lambda a, b: (0.5 * a @ b.T + 0.25) ** 2), rel=1e-9)
    assert poly != pytest.approx(kid_from_features(x, y, subsets=2)["kid_mean"], rel=1e-3)
    rbf = kid_from_features(x, y, subsets=2, kernel="rbf", rbf_sigma=3.0)["kid_mean"]
    sq = lambda a, b: (a ** 2).sum(1)[:, None] + (b ** 2).sum(1)[None] - 2 * a @ b.T  # noqa: E731
    assert rbf == pytest.approx(mmd(lambda a, b: np.exp(-sq(a, b) / (2 * 3.0 ** 2))), rel=1e-7)
    with pytest.raises(ValueError, match="kernel"):
        kid_from_features(x, y, kernel="linear")


def test_kid_matches_hand_computed_unbiased_mmd():
    """With subset size = N every subset is the full set: KID = unbiased MMD² with k = (x·y/d + 1)³."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 16, generator=g), torch.randn(30, 16, generator=g) + 0.5
    out = kid_from_features(x, y, subsets=3)
    xn, yn = x.double().numpy(), y.double().numpy()
    k = lambda a, b: (a @ b.T / 16 + 1) ** 3  # noqa: E731
    n = 30
    kxx, kyy, kxy = k(xn, xn), k(yn, yn), k(xn, yn)
    expected = ((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                - 2 * kxy.mean())
    assert out["kid_subset_size"] == 30 and out["kid_std"] == pytest.approx(0.0, abs=1e-9)
    assert out["kid_mean"] == pytest.approx(expected, rel=1e-9)
    assert kid_from_features(x, x + 3.0, subsets=3)["kid_mean"] > out["kid_mean"] > 0


def test_ids_separable_identical_and_pca():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(40, 5, generator=g)
    fake = real.clone()
    fake[:, 0] += 10.0  # linearly separable along the first axis
    assert inception_discriminative_scores(real, fake)["u_ids"] == 0.0
    assert inception_discriminative_scores(real, fake)["p_ids"] == 0.0
    same = inception_discriminative_scores(real, real)  # every point carries both labels: half are wrong
    assert same == {"u_ids": 0.5, "p_ids": 0.0}
    assert inception_discriminative_scores(real, fake, pca_dim=2)["u_ids"] == 0.0
    with pytest.raises(ValueError, match="paired"):
        inception_discriminative_scores(real, fake[:10])


def test_ids_group_rule_marks_degenerate_groups():
    """Same-distribution features are always separable below the rule's size (U = P = 0), not above it."""
    from asuka.metrics import ids_min_pairs

    g = torch.Generator().manual_seed(0)
    d = 16
    assert ids_min_pairs(d) == 4 * (d + 1)
    half = (d + 1) // 2  # 2N <= D + 1 points: any labeling is separable
    small = inception_discriminative_scores(torch.randn(half, d, generator=g), torch.randn(half, d, generator=g))
    assert small == {"u_ids": 0.0, "p_ids": 0.0}
    n = ids_min_pairs(d)
    large = inception_discriminative_scores(torch.randn(n, d, generator=g), torch.randn(n, d, generator=g))
    assert large["u_ids"] > 0.25 and large["p_ids"] > 0.1


def test_p_ids_counts_pairs_where_fake_scores_higher():
    """Pairs straddling the boundary in reverse order are counted; hand-made 1-D example."""
    real = torch.tensor([[2.0], [3.0], [4.0], [-0.5]])
    fake = torch.tensor([[-2.0], [-3.0], [-4.0], [0.5]])  # pair 3 is swapped: fake looks more real
    out = inception_discriminative_scores(real, fake)
    assert out["p_ids"] == 0.25 and out["u_ids"] == 0.25


# ---------------------------------------------------------------- Inception features
@pytest.fixture(scope="module")
def fidelity_weights(tmp_path_factory):
    return save_random_inception_weights(tmp_path_factory.mktemp("inc") / "inception.pth", seed=0)


def test_inception_features_match_torch_fidelity_on_uint8(fidelity_weights):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    a, _ = _pair(size=64, batch=2)
    ours = InceptionFeatures(fidelity_weights)(a)
    ref = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                      feature_extractor_weights_path=str(fidelity_weights))
    expected = ref(((a + 1) * 127.5).round().to(torch.uint8))[0]
    assert ours.shape == (2, 2048) and torch.equal(ours, expected)


def test_missing_weights_name_the_option_and_source(tmp_path):
    with pytest.raises(MissingWeightsError, match="inception_weights: .*weights-inception-2015-12-05-6726825d"):
        InceptionFeatures()
    with pytest.raises(MissingWeightsError, match="lpips_weights: .*alexnet-owt-7be5be79"):
        LPIPS("alex")
    with pytest.raises(MissingWeightsError, match="no such file"):
        InceptionFeatures(tmp_path / "absent.pth")
    with pytest.raises(ValueError, match="variant"):
        InceptionFeatures(variant="tf")


def test_torchvision_inception_pil_preprocessing_equals_transforms_on_8bit_images(tmp_path):
    """resize="pil" = torchvision's ImageNet transforms on 8-bit PIL images (ASUKA's cal_ids.py input path)."""
    from PIL import Image
    from torchvision import transforms

    path = save_random_inception_weights(tmp_path / "tv.pth", variant="torchvision")
    images, _ = _pair(5)
    ours = InceptionFeatures(path, variant="torchvision", resize="pil")(images)
    reference = torchvision.models.inception_v3(weights=None, aux_logits=True, transform_input=True,
                                                init_weights=False)
    reference.load_state_dict(torch.load(path, weights_only=True))
    reference.fc = torch.nn.Identity()
    reference.eval()
    prep = transforms.Compose([transforms.Resize(342), transforms.CenterCrop(299), transforms.ToTensor(),
                               transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    pixels = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    with torch.no_grad():
        expected = reference(torch.stack([prep(Image.fromarray(p)) for p in pixels]))
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    tensor_path = InceptionFeatures(path, variant="torchvision")(images)
    assert not torch.allclose(tensor_path, ours, atol=1e-6)
    with pytest.raises(ValueError, match="resize"):
        InceptionFeatures(path, variant="torchvision", resize="cv2")


# ---------------------------------------------------------------- LPIPS
@pytest.mark.parametrize("net,builder", [("alex", "alexnet"), ("squeeze", "squeezenet1_1")])
def test_lpips_identical_zero_and_matches_torchmetrics(tmp_path, net, builder):
    from torchmetrics.functional.image.lpips import _LPIPS

    torch.manual_seed(0)
    backbone = getattr(torchvision.models, builder)(weights=None)
    path = tmp_path / f"{builder}.pth"
    torch.save(backbone.state_dict(), path)
    metric = LPIPS(net, path)
    a, b = _pair(3)
    assert metric.name == f"lpips_{net}"
    assert torch.equal(metric(a, a), torch.zeros(2))
    # independent reference: torchmetrics' own LPIPS copy with the same backbone and shipped linear heads
    ref = _LPIPS(pretrained=True, net=net, pnet_rand=True).eval()
    for module in ref.net.modules():  # every Sequential slice keeps torchvision's layer indices as names
        if isinstance(module, torch.nn.Sequential):
            for idx, layer in module.named_children():
                layer.load_state_dict(backbone.features[int(idx)].state_dict())
    with torch.no_grad():
        expected = ref(a, b).flatten()
    assert torch.allclose(metric(a, b), expected, atol=1e-6)


def test_lpips_rejects_wrong_backbone_file(tmp_path):
    path = tmp_path / "vgg.pth"
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match="lpips_weights: .*missing|size mismatch"):
        LPIPS("alex", path)


def test_lpips_heads_are_checked_strictly(tmp_path):
    """lpips loads head files with strict=False; ours names missing, unexpected and mis-shaped keys."""
    import lpips as lpips_lib

    torch.manual_seed(0)
    backbone = tmp_path / "alexnet.pth"
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), backbone)
    shipped = Path(lpips_lib.__file__).parent / "weights" / "v0.1" / "alex.pth"
    heads = torch.load(shipped, weights_only=True, map_location="cpu")
    a, b = _pair(3)
    torch.testing.assert_close(LPIPS("alex", backbone, linear_weights=shipped)(a, b), LPIPS("alex", backbone)(a, b))
    scaled = {k: v * 2 for k, v in heads.items()}
    torch.save(scaled, tmp_path / "scaled.pth")
    torch.testing.assert_close(LPIPS("alex", backbone, linear_weights=tmp_path / "scaled.pth")(a, b),
                               2 * LPIPS("alex", backbone)(a, b))
    vgg_heads = torch.load(shipped.with_name("vgg.pth"), weights_only=True, map_location="cpu")
    torch.save(vgg_heads, tmp_path / "vgg_heads.pth")
    with pytest.raises(ValueError, match="not LPIPS v0.1 heads.*wrong shape"):
        LPIPS("alex", backbone, linear_weights=tmp_path / "vgg_heads.pth")
    torch.save({"foo": torch.zeros(1)}, tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="missing.*lin0.*unexpected.*foo"):
        LPIPS("alex", backbone, linear_weights=tmp_path / "junk.pth")


# ---------------------------------------------------------------- CLIP score
def test_clip_score_matches_full_clip_forward(tmp_path):
    folder = save_tiny_clip(tmp_path / "clip")
    scorer = CLIPScore(folder, region="full")
    a, b = _pair(4)
    texts = ["a photo of a cat", "a house"]
    # reference: CLIPModel's own forward returns normalised image/text embeddings
    uint8 = ((a + 1) * 127.5).round().to(torch.uint8)
    inputs = scorer.processor(text=texts, images=list(uint8), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = scorer.model(**inputs)
    assert torch.allclose(scorer.image_embeddings(a), out.image_embeds, atol=1e-5)
    assert torch.allclose(scorer.text_embeddings(texts), out.text_embeds, atol=1e-5)
    cos = (out.image_embeds * out.text_embeds).sum(-1).double()
    assert torch.allclose(scorer.text_score(a, texts), 100 * cos.clamp(min=0), atol=1e-3)
    assert torch.allclose(scorer(a, a), torch.full((2,), 100.0, dtype=torch.float64), atol=1e-3)


def test_clip_score_hole_region_ignores_known_pixels(tmp_path):
    scorer = CLIPScore(save_tiny_clip(tmp_path / "clip"))
    a, b = _pair(5)
    mask = torch.zeros(2, 1, 64, 64)
    mask[..., 16:48, 16:48] = 1
    b_same_hole = b * (1 - mask) + a * mask  # differs only outside the hole
    assert torch.allclose(scorer(a, b_same_hole, mask), torch.full((2,), 100.0, dtype=torch.float64), atol=1e-3)
    with pytest.raises(ValueError, match="mask"):
        scorer(a, b)
    with pytest.raises(FileNotFoundError, match="clip_model"):
        CLIPScore(tmp_path / "missing")

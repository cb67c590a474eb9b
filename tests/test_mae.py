"""MAEPrior: inference contract, invariants, independent references and the training math."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data

from asuka.models.mae import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MAEPrior,
    adaptive_random_masking,
    masked_mse_loss,
    param_groups_weight_decay,
    patch_coverage,
    patchify,
    preprocess,
    sincos_pos_embed_2d,
    training_loss_mask,
    unpatchify,
)


@pytest.fixture(scope="module")
def model() -> MAEPrior:
    return MAEPrior.tiny(seed=0).eval()


def _photo(height: int, width: int) -> torch.Tensor:
    """Astronaut photograph resized to (height, width), as a (1, 3, H, W) tensor in [-1, 1]."""
    rgb = cv2.resize(data.astronaut(), (width, height), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 127.5 - 1


def _box_mask(height: int, width: int, boxes) -> torch.Tensor:
    mask = torch.zeros(1, 1, height, width)
    for top, bottom, left, right in boxes:
        mask[..., top:bottom, left:right] = 1
    return mask


def _reference_forward(model: MAEPrior, x: torch.Tensor, mask: torch.Tensor, feature_layer: int):
    """MAE-FAR's inference written out with explicit attention math (masked_fill(-inf) on masked keys)."""
    p = model.config.patch_size
    area = F.interpolate(mask, scale_factor=1 / p, mode="area").flatten(1)  # (B, L)
    masked, full = area > 0, area == 1

    def block(blk, h, key_mask=None):
        y = blk.norm1(h)
        b, n, c = y.shape
        heads = blk.attn.num_heads
        q, k, v = blk.attn.qkv(y).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) * (c // heads) ** -0.5
        if key_mask is not None:
            scores = scores.masked_fill(key_mask[:, None, None, :], float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
        h = h + blk.attn.proj(y)
        return h + blk.mlp(blk.norm2(h))

    h = model.patch_embed.proj(x).flatten(2).transpose(1, 2) + model.pos_embed
    for blk in model.blocks:
        h = block(blk, h, masked)
    h = model.decoder_embed(model.norm(h))
    m = masked[..., None].float()
    h = h * (1 - m) + model.mask_token * m
    emb = model.decoder_patch_embed.proj(torch.cat([x * (1 - mask), mask], 1)).flatten(2).transpose(1, 2)
    partial = (masked & ~full)[..., None].float()
    a = model.alpha.clamp(0, 1)
    h = h * (1 - partial) + (h * a + emb * (1 - a)) * partial
    h = h + model.decoder_pos_embed
    feats = None
    for i, blk in enumerate(model.decoder_blocks):
        if i == feature_layer:
            feats = h
        h = block(blk, h)
    pred = model.decoder_pred(model.decoder_norm(h))
    return (h if feats is None else feats), unpatchify(pred, p)


# --------------------------------------------------------------------------------------------- inference
def test_prior_shapes_and_range_any_size(model):
    image = torch.cat([_photo(300, 200), _photo(300, 200).flip(-1)])
    mask = torch.cat([_box_mask(300, 200, [(40, 160, 30, 120)]), _box_mask(300, 200, [(0, 300, 0, 90)])])
    out = model.prior(image, mask)
    assert out.features.shape == (2, 256, model.config.decoder_embed_dim)
    assert out.image.shape == (2, 3, 300, 200)
    assert out.image.min() >= -1 and out.image.max() <= 1
    assert torch.isfinite(out.features).all()


def test_default_config_is_vit_b_16_at_256():
    prior = MAEPrior()
    assert prior.num_tokens == 256 and prior.feature_dim == 512
    assert len(prior.blocks) == 12 and len(prior.decoder_blocks) == 8
    assert prior.blocks[0].attn.num_heads == 12 and prior.decoder_blocks[0].attn.num_heads == 16
    assert prior.blocks[0].attn.qkv.bias is not None and prior.norm.eps == 1e-6
    assert prior.decoder_patch_embed.proj.in_channels == 4 and prior.alpha.item() == 1.0
    n_params = sum(p.numel() for p in prior.parameters())
    assert 111e6 < n_params < 113e6  # specs §1.1.1: ≈112.5 M incl. the frozen pos-embeds (0.33 M)
    assert not any(name.endswith("pos_embed") for name, _ in prior.named_parameters())


def test_matches_explicit_mae_far_reference(model):
    image = _photo(256, 256)
    mask = _box_mask(256, 256, [(40, 150, 23, 200), (200, 256, 0, 256)])
    x, m = preprocess(image, mask)
    with torch.no_grad():
        model.alpha.fill_(0.3)  # exercise the partial-patch mix
        try:
            out = model(x, m)
            ref_feats, ref_image = _reference_forward(model, x, m, model.config.feature_layer)
        finally:
            model.alpha.fill_(1.0)
    torch.testing.assert_close(out.features, ref_feats, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.image, ref_image, atol=1e-5, rtol=1e-5)


def test_features_only_path_matches_full_forward(model):
    x, m = preprocess(_photo(256, 256), _box_mask(256, 256, [(64, 190, 64, 190)]))
    with torch.no_grad():
        full = model(x, m)
        for layer in range(model.config.decoder_depth + 1):
            assert torch.equal(model.forward_features(x, m, feature_layer=layer),
                               model(x, m, feature_layer=layer).features)
    assert torch.equal(full.features, model.forward_features(x, m))


@pytest.mark.parametrize("size", [(256, 256), (300, 200), (512, 384), (97, 130)])
def test_hole_content_changes_nothing(model, size):
    h, w = size
    image = _photo(h, w)
    mask = _box_mask(h, w, [(h // 5, h // 2, w // 7, w // 2 + 3), (h - h // 6, h, 0, w)])
    hole = mask.expand_as(image) > 0.5
    other = image.clone()
    other[hole] = torch.rand(int(hole.sum()), generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        a, b = model.prior(image, mask), model.prior(other, mask)
    assert torch.equal(a.features, b.features)
    assert torch.equal(a.image, b.image)


def test_all_hole_mask_is_finite_and_equals_mask_tokens_only():
    model = MAEPrior.tiny(seed=0, all_hole="mask_token").eval()  # ours; the default "zeros" is the official one
    image = _photo(200, 260)
    mask = torch.ones(1, 1, 200, 260)
    with torch.no_grad():
        out = model.prior(image, mask)
        out_other = model.prior(-image, mask)
        # Every token is mask_token + pos-embed: run the decoder blocks on that alone.
        h = model.mask_token + model.decoder_pos_embed
        for blk in model.decoder_blocks[: model.config.feature_layer]:
            h = blk(h)
    assert torch.isfinite(out.features).all() and torch.isfinite(out.image).all()
    torch.testing.assert_close(out.features, h, atol=1e-6, rtol=1e-6)
    assert torch.equal(out.features, out_other.features) and torch.equal(out.image, out_other.image)


def test_reconstructed_prior_is_prior_with_empty_mask(model):
    image = _photo(128, 128)
    with torch.no_grad():
        a = model.reconstructed_prior(image)
        b = model.prior(image, torch.zeros(1, 1, 128, 128))
    assert torch.equal(a.features, b.features) and torch.equal(a.image, b.image)


def test_masked_keys_do_not_influence_visible_tokens(model):
    """With the hole on the right half, the encoder output of left-half tokens ignores right-half content."""
    x, m = preprocess(_photo(256, 256), _box_mask(256, 256, [(0, 256, 128, 256)]))
    x2 = x.clone()
    x2[..., 128:] = torch.randn(1, 3, 256, 128, generator=torch.Generator().manual_seed(3))
    touched, _ = patch_coverage(m, 16)
    with torch.no_grad():
        t1 = model.encode(model.patch_embed(x) + model.pos_embed, ~touched)
        t2 = model.encode(model.patch_embed(x2) + model.pos_embed, ~touched)
    assert torch.equal(t1[:, ~touched[0]], t2[:, ~touched[0]])
    assert not torch.equal(t1[:, touched[0]], t2[:, touched[0]])


def test_preprocess_matches_cv2_official_pipeline():
    rgb = cv2.resize(data.chelsea(), (512, 512), interpolation=cv2.INTER_AREA)
    image = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 127.5 - 1
    mask_np = np.zeros((512, 512), np.float32)
    mask_np[100:300, 60:250] = 1  # even-aligned: every 2x2 window is fully known or fully hole
    x, m = preprocess(image, torch.from_numpy(mask_np)[None, None])
    # Official: cv2 INTER_AREA on the image, INTER_NEAREST on the mask, ImageNet norm, x * (mask < 0.5).
    ref = cv2.resize(rgb.astype(np.float32) / 255.0, (256, 256), interpolation=cv2.INTER_AREA)
    ref = (ref - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    ref_mask = cv2.resize(mask_np, (256, 256), interpolation=cv2.INTER_NEAREST)
    ref = ref * (ref_mask < 0.5)[..., None]
    assert np.array_equal(m[0, 0].numpy(), ref_mask)
    np.testing.assert_allclose(x[0].permute(1, 2, 0).numpy(), ref, atol=2e-5)


@pytest.mark.parametrize("size", [(300, 200), (97, 401)])
def test_preprocess_mask_is_cv2_nearest(size):
    h, w = size
    rng = np.random.default_rng(0)
    mask_np = (rng.random((h, w)) > 0.5).astype(np.float32)
    _, m = preprocess(torch.zeros(1, 3, h, w), torch.from_numpy(mask_np)[None, None])
    assert np.array_equal(m[0, 0].numpy(), cv2.resize(mask_np, (256, 256), interpolation=cv2.INTER_NEAREST))


def test_sincos_table_matches_mae_formula():
    dim, grid = 16, 5
    table = sincos_pos_embed_2d(dim, grid).double()
    omega = 1 / 10000 ** (np.arange(dim // 4) / (dim // 4))
    for token in (0, 7, 24):
        row, col = divmod(token, grid)
        expected = np.concatenate([np.sin(col * omega), np.cos(col * omega), np.sin(row * omega), np.cos(row * omega)])
        np.testing.assert_allclose(table[token].numpy(), expected, atol=1e-6)


def test_patchify_roundtrip_and_order():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    patches = patchify(x, 16)
    assert patches.shape == (2, 4, 768)
    assert torch.equal(patches[0, 1, :3], x[0, :, 0, 16])  # patch (0,1), pixel (0,0), channels last
    assert torch.equal(unpatchify(patches, 16), x)


def test_bad_inputs_raise_clear_errors(model):
    image, mask = _photo(64, 64), torch.zeros(1, 1, 64, 64)
    with pytest.raises(ValueError, match="mask must have shape"):
        model.prior(image, mask[0])
    with pytest.raises(ValueError, match="match image"):
        model.prior(image, torch.zeros(1, 1, 32, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model.prior(image[:, :1], mask)
    with pytest.raises(TypeError, match="torch tensors"):
        model.prior(image.numpy(), mask)
    with pytest.raises(ValueError, match="use MAEPrior.prior"):
        model(image, mask)
    with pytest.raises(ValueError, match="feature_layer"):
        MAEPrior.tiny(feature_layer=3)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        MAEPrior.tiny(img_size=250)


def test_bfloat16_prior_is_finite(model):
    prior = MAEPrior.tiny(seed=0).to(torch.bfloat16)
    out = prior.prior(_photo(128, 96), _box_mask(128, 96, [(10, 90, 10, 60)]))
    assert out.features.dtype == torch.bfloat16 and torch.isfinite(out.features).all()
    assert out.image.dtype == torch.float32 and out.image.shape == (1, 3, 128, 96)


def test_save_pretrained_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = MAEPrior.from_pretrained(tmp_path).eval()
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    image, mask = _photo(200, 200), _box_mask(200, 200, [(30, 120, 50, 170)])
    with torch.no_grad():
        a, b = model.prior(image, mask), loaded.prior(image, mask)
    assert torch.equal(a.features, b.features) and torch.equal(a.image, b.image)
    assert loaded.config.feature_layer == model.config.feature_layer


# ---------------------------------------------------------------------------------------------- training
def test_adaptive_masking_drops_exactly_75_percent_and_every_hole_patch():
    gen = torch.Generator().manual_seed(0)
    touched = torch.rand(4, 256, generator=gen) < torch.tensor([0.0, 0.2, 0.5, 0.74])[:, None]
    masking = adaptive_random_masking(touched, 0.75, torch.Generator().manual_seed(1))
    assert masking.ids_keep.shape == (4, 64)
    assert (masking.dropped.sum(1) == 192).all()
    assert not (touched & ~masking.dropped).any()
    assert masking.keep_valid.all()
    assert torch.equal(masking.added, masking.dropped & ~touched)
    again = adaptive_random_masking(touched, 0.75, torch.Generator().manual_seed(1))
    other = adaptive_random_masking(touched, 0.75, torch.Generator().manual_seed(2))
    assert torch.equal(again.dropped, masking.dropped) and not torch.equal(other.dropped, masking.dropped)


def test_adaptive_masking_never_leaks_when_hole_covers_more_than_75_percent():
    touched = torch.zeros(2, 256, dtype=torch.bool)
    touched[0, :230] = True  # 230 > 192 touched patches
    touched[1] = True  # everything touched
    masking = adaptive_random_masking(touched, 0.75, torch.Generator().manual_seed(0))
    assert masking.ids_keep.shape == (2, 64)  # equal K across the batch
    assert torch.equal(masking.dropped, touched)  # no hole patch visible, every untouched patch visible
    assert torch.equal(masking.keep_valid, ~touched.gather(1, masking.ids_keep))
    assert masking.keep_valid[0].sum() == 26 and not masking.keep_valid[1].any()


def test_forward_train_hole_content_never_reaches_prediction(model):
    """Real hole over > 75 % of patches (MAE-FAR leaks here): the prediction ignores hole pixels."""
    x, m = preprocess(_photo(256, 256), _box_mask(256, 256, [(0, 232, 0, 256)]))  # 15 of 16 rows touched
    x_full = x.clone()
    x_other = x.clone()
    hole = m.expand_as(x) > 0.5
    x_full[hole] = 1.0
    x_other[hole] = -1.0
    with torch.no_grad():
        a = model.forward_train(x_full, m, generator=torch.Generator().manual_seed(0))
        b = model.forward_train(x_other, m, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a["pred"], b["pred"])
    assert torch.equal(a["dropped"], patch_coverage(m, 16)[0])


def test_forward_train_loss_mask_and_loss_by_hand(model):
    x, m = preprocess(_photo(256, 256), _box_mask(256, 256, [(30, 70, 40, 75)]))
    out = model.forward_train(x, m, generator=torch.Generator().manual_seed(0))
    loss_mask, dropped = out["loss_mask"], out["dropped"]
    assert dropped.sum() == 192
    touched, _ = patch_coverage(m, 16)
    added_px = F.interpolate((dropped & ~touched).float().reshape(1, 1, 16, 16), scale_factor=16.0)
    assert torch.equal(loss_mask, torch.maximum(m, added_px))
    diff = (out["pred"] - x).square() * loss_mask
    torch.testing.assert_close(out["loss"], diff.sum() / (3 * loss_mask.sum()))
    out["loss"].backward()
    assert model.alpha.grad is not None and model.alpha.grad.abs() > 0  # kept at the alpha = 1 bound
    model.zero_grad(set_to_none=True)


def test_masked_mse_loss_norm_pix_by_hand():
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 3, 32, 32, generator=gen), torch.randn(2, 3, 32, 32, generator=gen)
    mask = torch.zeros(2, 1, 32, 32)
    mask[0, :, :16, :16] = 1  # exactly patch 0 of sample 0
    patch = target[0, :, :16, :16]
    normed = (patch - patch.mean()) / (patch.var() + 1e-6).sqrt()
    expected = (pred[0, :, :16, :16] - normed).square().mean()
    torch.testing.assert_close(masked_mse_loss(pred, target, mask, 16, norm_pix=True), expected)
    assert masked_mse_loss(pred, target, torch.zeros_like(mask), 16) == 0


def test_training_loss_mask_adds_full_patches():
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 3:5, 3:5] = 1
    added = torch.tensor([[False, False, False, True]])
    out = training_loss_mask(mask, added, 16)
    assert out[..., 16:, 16:].eq(1).all() and out[..., :16, :16].sum() == 4 and out.sum() == 4 + 256


def test_gradient_checkpointing_gives_identical_gradients():
    x, m = preprocess(_photo(256, 256), _box_mask(256, 256, [(30, 170, 40, 75)]))
    grads = []
    for checkpointing in (False, True):
        prior = MAEPrior.tiny(seed=0)
        if checkpointing:
            prior.enable_gradient_checkpointing()
        prior.forward_train(x, m, generator=torch.Generator().manual_seed(0))["loss"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in prior.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])


def test_param_groups_weight_decay(model):
    decay, no_decay = param_groups_weight_decay(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert {"mask_token", "alpha", "norm.weight", "blocks.0.attn.qkv.bias"} <= no_decay_names
    assert {"blocks.0.attn.qkv.weight", "patch_embed.proj.weight", "decoder_pred.weight"} <= decay_names
    assert not any(n.endswith("bias") or "norm" in n for n in decay_names)
    assert len(decay_names) + len(no_decay_names) == len(names)

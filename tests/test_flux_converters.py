"""Official ASUKA-FLUX options through the converters: MAE ``mae_mask_concat`` / ``mask_decoder`` / all-hole zeros, and
the decoder's ``gate_conv`` / ``tanh_out`` / ``attn_resolutions``, each loaded from an official-layout state dict and
compared with a straightforward re-statement of the official module (tests/flux_support.py) on random weights."""

from __future__ import annotations

import pytest
import torch

from asuka.models import convert
from asuka.models.decoder import HarmonizingDecoderKL, up_block_types_for
from asuka.models.mae import MAEPrior, preprocess
from asuka.models.seeding import seeded
from flux_support import official_decoder, official_mae_features, to_ldm_decoder

TINY_MAE = dict(num_heads=2, decoder_num_heads=2, feature_layer=1)


def _official_mae_state() -> dict:
    """A tiny MAE-FAR finetune state dict with random weights everywhere (alpha inside (0, 1): the partial-patch mix
    matters)."""
    model = MAEPrior.tiny(seed=3)
    state = model.state_dict()
    with seeded(4):
        for key, value in state.items():
            if value.is_floating_point() and "pos_embed" not in key:
                state[key] = torch.randn_like(value) * 0.2 + (1 if key.endswith("norm1.weight") else 0)
    state["alpha"] = torch.tensor(0.4)
    return state


def _inputs():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 256, 256, generator=g) * 2 - 1
    mask = torch.zeros(2, 1, 256, 256)
    mask[0, :, 40:150, 30:201] = 1  # patch-misaligned: touched, full and partial patches
    mask[1, :, 100:117, 7:250] = 1
    return preprocess(image, mask)


@pytest.mark.parametrize("mask_concat, mask_decoder", [(True, False), (False, True)])
def test_mae_official_options_match_the_official_module(mask_concat, mask_decoder):
    state = _official_mae_state()
    model = convert.mae_prior_from_mae_far({"model": state}, mask_concat=mask_concat, **TINY_MAE).eval()
    x, m = _inputs()
    with torch.no_grad():
        ours = model.forward_features(x, m)
    ref = official_mae_features(state, x, m, heads=2, decoder_heads=2, depth=2, decoder_depth=2, decoder_layer=1,
                                mask_concat=mask_concat, mask_decoder=mask_decoder)
    assert ours.shape == (2, 256, 32 + int(mask_concat)) and model.feature_dim == ours.shape[-1]
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)


def test_all_hole_features_are_zero_by_default_and_per_sample():
    state = _official_mae_state()
    model = convert.mae_prior_from_mae_far({"model": state}, **TINY_MAE).eval()
    x, m = _inputs()
    m_all = m.clone()
    m_all[1] = 1
    with torch.no_grad():
        batch = model.forward_features(x, m_all)
        single = model.forward_features(x[:1], m[:1])
        ours = convert.mae_prior_from_mae_far({"model": state}, all_hole="mask_token", **TINY_MAE).eval()
        finite = ours.forward_features(x, m_all)
    official = official_mae_features(state, x[1:], m_all[1:], heads=2, decoder_heads=2, depth=2, decoder_depth=2,
                                     decoder_layer=1)
    assert torch.equal(batch[1], torch.zeros_like(batch[1])) and torch.equal(official[0], batch[1])
    torch.testing.assert_close(batch[:1], single, atol=1e-6, rtol=0)  # the official check would zero both samples
    assert torch.isfinite(finite).all() and finite[1].abs().sum() > 0


@pytest.mark.parametrize("gate_conv, tanh_out, attn_resolutions", [(False, False, (16,)), (True, True, (8, 32))])
def test_decoder_official_options_match_the_official_module(gate_conv, tanh_out, attn_resolutions):
    levels, resolution = 4, 64
    with seeded(5):
        model = HarmonizingDecoderKL(
            down_block_out_channels=(8, 16, 32, 32), up_block_out_channels=(8, 16, 32, 32), norm_num_groups=4,
            latent_channels=16, up_block_types=up_block_types_for(attn_resolutions, resolution, levels),
            gate_conv=gate_conv, tanh_out=tanh_out)
        for param in model.parameters():  # random everywhere, biases included
            param.data = torch.randn_like(param) * 0.15
    ldm = to_ldm_decoder(model.state_dict(), levels)
    assert gate_conv == (ldm["decoder.encoder.layers.0.weight"].shape[0] == 2 * 8)
    assert any(".attn." in k for k in ldm) == bool(attn_resolutions)
    loaded = convert.load_harmonizing_decoder_checkpoint({"state_dict": ldm}, identity_quant_convs=True,
                                                         norm_num_groups=4, tanh_out=tanh_out)
    assert loaded.config.gate_conv == gate_conv and tuple(loaded.config.up_block_types) == tuple(model.config.up_block_types)
    assert (loaded.config.scaling_factor, loaded.config.shift_factor) == (0.3611, 0.1159)  # FLUX latents
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 16, 8, 8, generator=g)
    image = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 9:40, 13:57] = 1
    with torch.no_grad():
        ours = loaded.decode(z, image=image, mask=mask).sample
    ref = official_decoder(ldm, z, image, mask, levels=levels, num_res_blocks=2, groups=4, gate_conv=gate_conv,
                           tanh_out=tanh_out)
    torch.testing.assert_close(ours, ref, atol=5e-4, rtol=1e-4)


def test_up_block_types_follow_the_official_resolutions():
    assert up_block_types_for([], 256, 4) == ("UpDecoderBlock2D",) * 4
    assert up_block_types_for([32, 256], 256, 4) == ("AttnUpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D",
                                                     "AttnUpDecoderBlock2D")

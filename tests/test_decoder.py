"""HarmonizingDecoderKL: oracle against diffusers' AsymmetricAutoencoderKL, invariants, from_vae, converters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AsymmetricAutoencoderKL, StableDiffusionInpaintPipeline
from PIL import Image

from asuka.models.decoder import HarmonizingDecoderKL, downsample_mask
from asuka.models.tiny import tiny_vae

ASYM_KEYS = ("in_channels", "out_channels", "down_block_types", "down_block_out_channels", "layers_per_down_block",
             "up_block_types", "up_block_out_channels", "layers_per_up_block", "act_fn", "latent_channels",
             "norm_num_groups", "sample_size", "scaling_factor")


def _inputs(seed: int = 0, batch: int = 2, size: int = 64):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, 4, size // 8, size // 8, generator=g)
    image = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
    mask = torch.zeros(batch, 1, size, size)
    mask[0, :, 13:41, 7:50] = 1  # not aligned to the 8-pixel latent grid
    mask[1:, :, 30:, :21] = 1
    return z, image, mask


def _decode(model, z: torch.Tensor, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The conditioned decode of latents ``z`` (image and mask passed as keywords, as diffusers requires)."""
    return model.decode(z, image=image, mask=mask).sample


def _randomize(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _asym_reference(model: HarmonizingDecoderKL) -> AsymmetricAutoencoderKL:
    ref = AsymmetricAutoencoderKL(**{k: model.config[k] for k in ASYM_KEYS}).eval()
    ref.load_state_dict(model.state_dict(), strict=True)
    return ref


@pytest.fixture(scope="module")
def vae():
    return tiny_vae(0)


def test_oracle_equals_diffusers_asymmetric_bit_for_bit(vae):
    model = HarmonizingDecoderKL.from_vae(vae, condition_channels=3, mask_downsample="nearest").eval()
    _randomize(model.decoder.condition_encoder, 1)
    ref = _asym_reference(model)
    z, image, mask = _inputs()
    with torch.no_grad():
        ours = _decode(model, z, image, mask)
        theirs = _decode(ref, z, image, mask)
        assert torch.equal(ours, theirs)
        assert torch.equal(model(image, mask=mask).sample, ref(image, mask=mask).sample)
        assert torch.equal(model.decode(z).sample, ref.decode(z).sample)  # unconditioned: plain decoder


def test_known_region_depends_only_on_known_pixels(vae):
    model = HarmonizingDecoderKL.from_vae(vae).eval()  # ASUKA: 4 channels, area_any
    _randomize(model.decoder.condition_encoder, 2)  # the mask channel must matter for this test
    z, image, mask = _inputs()
    other = torch.where(mask.bool(), torch.rand_like(image) * 2 - 1, image)  # new hole pixels only
    with torch.no_grad():
        a = _decode(model, z, image, mask)
        b = model.decode(z, image=other, mask=mask).sample
        moved = model.decode(z, image=image, mask=torch.roll(mask, 9, dims=-1)).sample
    assert torch.equal(a, b)
    assert not torch.allclose(a, moved)  # the mask itself is an input


def test_area_any_marks_every_cell_touching_the_hole():
    mask = torch.zeros(1, 1, 8, 8)
    mask[0, 0, 3, 5] = 1  # one pixel: cell (1, 2) of a 4x4 grid
    area = downsample_mask(mask, (4, 4), "area_any")
    expected = torch.zeros(1, 1, 4, 4)
    expected[0, 0, 1, 2] = 1
    assert torch.equal(area, expected)
    assert downsample_mask(mask, (4, 4), "nearest").sum() == 0  # nearest samples pixel (2i, 2j) and misses it
    with pytest.raises(ValueError, match="mask_downsample"):
        downsample_mask(mask, (4, 4), "bilinear")


def test_variants_differ_only_in_the_chosen_options(vae):
    z, image, mask = _inputs()
    nearest = HarmonizingDecoderKL.from_vae(vae, condition_channels=4, mask_downsample="nearest").eval()
    area = HarmonizingDecoderKL.from_vae(vae, condition_channels=4, mask_downsample="area_any").eval()
    area.load_state_dict(nearest.state_dict())
    with torch.no_grad():
        assert not torch.allclose(_decode(nearest, z, image, mask),
                                  _decode(area, z, image, mask))


def test_from_autoencoder_kl_copies_and_zero_inits_mask_channel(vae):
    model = HarmonizingDecoderKL.from_vae(vae)
    ours, theirs = model.state_dict(), vae.state_dict()
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key
    first = ours["decoder.condition_encoder.layers.0.weight"]
    assert first.shape[1] == 4 and torch.all(first[:, 3] == 0) and first[:, :3].abs().sum() > 0
    assert model.config.up_block_out_channels == tuple(vae.config.block_out_channels)
    z, image, _ = _inputs()
    with torch.no_grad():  # an all-hole mask means "no condition": exactly the plain VAE decoder
        full = model.decode(z, image=image, mask=torch.ones(2, 1, 64, 64)).sample
        torch.testing.assert_close(full, vae.decode(z).sample, rtol=1e-5, atol=1e-5)


def test_from_asymmetric_copies_condition_encoder(vae):
    source = HarmonizingDecoderKL.from_vae(vae, condition_channels=3, mask_downsample="nearest")
    _randomize(source.decoder.condition_encoder, 3)
    asym = _asym_reference(source)
    model = HarmonizingDecoderKL.from_vae(asym, condition_channels=4, mask_downsample="nearest").eval()
    first = model.state_dict()["decoder.condition_encoder.layers.0.weight"]
    assert torch.equal(first[:, :3], asym.state_dict()["decoder.condition_encoder.layers.0.weight"])
    assert torch.all(first[:, 3] == 0)
    z, image, mask = _inputs()
    with torch.no_grad():  # zero mask channel: same function as the source
        torch.testing.assert_close(_decode(model, z, image, mask),
                                   _decode(asym, z, image, mask), rtol=1e-5, atol=1e-5)


def test_wider_decoder_keeps_encoder_and_starts_decoder_fresh(vae):
    model = HarmonizingDecoderKL.from_vae(vae, decoder_width="1.5x")
    assert model.config.up_block_out_channels == (12, 24, 48, 48) and model.config.layers_per_up_block == 3
    assert len(model.decoder.up_blocks[0].resnets) == 4  # [62]'s larger1.5: 4 ResNets per level
    assert torch.equal(model.encoder.conv_in.weight, vae.encoder.conv_in.weight)
    assert torch.equal(model.quant_conv.weight, vae.quant_conv.weight)
    assert model.decoder.condition_encoder.layers[0].weight.shape == (12, 4, 3, 3)
    z, image, mask = _inputs()
    assert _decode(model, z, image, mask).shape == (2, 3, 64, 64)
    with pytest.raises(ValueError, match="decoder_width"):
        HarmonizingDecoderKL.from_vae(vae, decoder_width="3x")


def test_save_and_load_roundtrip(vae, tmp_path):
    model = HarmonizingDecoderKL.from_vae(vae, mask_downsample="nearest").eval()
    model.save_pretrained(tmp_path)
    loaded = HarmonizingDecoderKL.from_pretrained(tmp_path).eval()
    assert loaded.config.condition_channels == 4 and loaded.config.mask_downsample == "nearest"
    z, image, mask = _inputs()
    with torch.no_grad():
        assert torch.equal(_decode(model, z, image, mask),
                           _decode(loaded, z, image, mask))


def test_gradient_checkpointing_same_result(vae):
    model = HarmonizingDecoderKL.from_vae(vae)
    _randomize(model.decoder.condition_encoder, 4)
    z, image, mask = _inputs()
    plain = _decode(model, z, image, mask)
    model.enable_gradient_checkpointing()
    model.train()
    ckpt = _decode(model, z, image, mask)
    torch.testing.assert_close(plain, ckpt)
    ckpt.mean().backward()
    assert model.decoder.condition_encoder.layers[0].weight.grad.abs().sum() > 0


def test_bad_arguments_raise_clear_errors(vae):
    with pytest.raises(ValueError, match="condition_channels"):
        HarmonizingDecoderKL(condition_channels=5)
    with pytest.raises(ValueError, match="mask_downsample"):
        HarmonizingDecoderKL(mask_downsample="bilinear")
    with pytest.raises(TypeError, match="vae must be"):
        HarmonizingDecoderKL.from_vae(torch.nn.Conv2d(1, 1, 1))
    model = HarmonizingDecoderKL.from_vae(vae)
    z, image, mask = _inputs()
    with pytest.raises(ValueError, match="both image= and mask="):
        model.decode(z, image=image)
    with pytest.raises(ValueError, match="output size"):
        model.decode(z, image=image[..., :32, :32], mask=mask[..., :32, :32])
    with pytest.raises(ValueError, match=r"mask \(B,1,H,W\)"):
        model.decode(z, image=image, mask=mask.expand(-1, 3, -1, -1))


def test_sd_inpaint_pipeline_hands_image_and_mask(tiny_inpaint_dir, tmp_path):
    """The exported folder is a drop-in ``vae=``: the pipeline decodes with image and mask by itself."""
    model = HarmonizingDecoderKL.from_vae(tiny_vae(0))
    _randomize(model.decoder.condition_encoder, 5)
    model.save_pretrained(tmp_path / "decoder")
    decoder = HarmonizingDecoderKL.from_pretrained(tmp_path / "decoder")
    pipe = StableDiffusionInpaintPipeline.from_pretrained(tiny_inpaint_dir, vae=decoder, safety_checker=None,
                                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3)).astype(np.uint8)
    hole = np.zeros((64, 64), np.uint8)
    hole[16:48, 8:40] = 255
    kwargs = dict(prompt="a photo", image=Image.fromarray(rgb), mask_image=Image.fromarray(hole), height=64,
                  width=64, num_inference_steps=2, guidance_scale=1.0)
    out = pipe(**kwargs, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    latents = pipe(**kwargs, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    image = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 127.5 - 1
    mask = torch.from_numpy(hole > 127)[None, None].float()
    with torch.no_grad():
        manual = decoder.decode(latents / decoder.config.scaling_factor, image=image, mask=mask).sample
        plain = decoder.decode(latents / decoder.config.scaling_factor).sample
    torch.testing.assert_close(out, (manual / 2 + 0.5).clamp(0, 1), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out, (plain / 2 + 0.5).clamp(0, 1), atol=1e-3)


# ---------------------------------------------------------------------------------------------- converters
def _to_ldm(state: dict[str, torch.Tensor], levels: int = 4) -> dict[str, torch.Tensor]:
    """diffusers names -> LDM names (Asymmetric VQGAN ``my_decoder.py`` / ASUKA ``asuka_decoder.py`` layout)."""
    import re

    out = {}
    for key, value in state.items():
        new = key.replace("decoder.condition_encoder.", "decoder.encoder.")
        new = re.sub(r"^decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.", new)
        for a, b in (("mid_block.resnets.0.", "mid.block_1."), ("mid_block.resnets.1.", "mid.block_2."),
                     ("mid_block.attentions.0.group_norm.", "mid.attn_1.norm."),
                     ("mid_block.attentions.0.to_q.", "mid.attn_1.q."), ("mid_block.attentions.0.to_k.", "mid.attn_1.k."),
                     ("mid_block.attentions.0.to_v.", "mid.attn_1.v."),
                     ("mid_block.attentions.0.to_out.0.", "mid.attn_1.proj_out."), ("down_blocks.", "down."),
                     (".resnets.", ".block."), (".downsamplers.0.", ".downsample."), (".upsamplers.0.", ".upsample."),
                     (".conv_shortcut.", ".nin_shortcut."), ("conv_norm_out.", "norm_out.")):
            new = new.replace(a, b)
        if ".mid.attn_1." in new and new.endswith("weight") and "norm" not in new:
            value = value[:, :, None, None]  # LDM attention projections are 1x1 convs
        out[new] = value.clone()
    return out


LDM_KEYS = ("decoder.up.0.block.2.conv2.weight", "decoder.up.3.upsample.conv.weight", "decoder.mid.attn_1.q.weight",
            "decoder.mid.attn_1.proj_out.bias", "decoder.encoder.layers.4.weight", "decoder.up.1.block.0.nin_shortcut.weight",
            "decoder.norm_out.weight", "decoder.conv_in.weight", "encoder.down.0.downsample.conv.weight",
            "encoder.mid.block_1.norm1.weight", "encoder.norm_out.bias", "quant_conv.weight", "post_quant_conv.bias")


def test_asymmetric_vqgan_checkpoint_converts_strictly(vae, tmp_path):
    from asuka.models.convert import load_harmonizing_decoder_checkpoint

    source = HarmonizingDecoderKL.from_vae(vae, condition_channels=3, mask_downsample="nearest")
    _randomize(source.decoder, 6)
    ldm = _to_ldm(source.state_dict())
    assert all(k in ldm for k in LDM_KEYS) and ldm["decoder.mid.attn_1.q.weight"].ndim == 4
    ldm["decoder.up_layers.0.deconv.weight"] = torch.zeros(32, 32, 4, 4)  # unused in forward: dropped
    ldm["loss.logvar"] = torch.zeros(())  # training-only loss module: dropped
    torch.save({"state_dict": ldm, "global_step": 3}, tmp_path / "base.ckpt")
    model = load_harmonizing_decoder_checkpoint(tmp_path / "base.ckpt", norm_num_groups=4)
    assert model.config.condition_channels == 3 and model.config.mask_downsample == "nearest"
    ref = _asym_reference(source)
    z, image, mask = _inputs()
    with torch.no_grad():
        assert torch.equal(_decode(model, z, image, mask), _decode(ref, z, image, mask))
    asuka = HarmonizingDecoderKL.from_vae(model)  # the ASUKA variant from the [62] base: zero mask channel
    assert torch.all(asuka.decoder.condition_encoder.layers[0].weight[:, 3] == 0)


def test_asuka_decoder_checkpoint_with_decoder_keys_only(vae):
    from asuka.models.convert import load_harmonizing_decoder_checkpoint

    source = HarmonizingDecoderKL.from_vae(vae).eval()
    _randomize(source.decoder, 7)
    decoder_only = {k: v for k, v in _to_ldm(source.state_dict()).items() if k.startswith("decoder.")}
    with pytest.raises(ValueError, match="pass vae="):
        load_harmonizing_decoder_checkpoint({"state_dict": decoder_only})
    model = load_harmonizing_decoder_checkpoint({"state_dict": decoder_only}, vae=vae)
    assert model.config.condition_channels == 4 and model.config.mask_downsample == "area_any"
    z, image, mask = _inputs()
    with torch.no_grad():
        assert torch.equal(_decode(model, z, image, mask),
                           _decode(source, z, image, mask))


def test_converter_names_missing_and_unexpected_keys(vae):
    from asuka.models.convert import StateDictMismatchError, load_harmonizing_decoder_checkpoint

    ldm = _to_ldm(HarmonizingDecoderKL.from_vae(vae).state_dict())
    del ldm["decoder.up.0.block.1.conv1.weight"]
    ldm["decoder.mid.attn_2.q.weight"] = torch.zeros(1)
    with pytest.raises(StateDictMismatchError) as info:
        load_harmonizing_decoder_checkpoint(ldm, norm_num_groups=4)
    assert "decoder.up_blocks.3.resnets.1.conv1.weight" in str(info.value)
    assert "decoder.mid.attn_2.q.weight" in str(info.value)
    with pytest.raises(ValueError, match="no LDM decoder keys"):
        load_harmonizing_decoder_checkpoint({"encoder.conv_in.weight": torch.zeros(1)})
    with pytest.raises(FileNotFoundError):
        load_harmonizing_decoder_checkpoint("/nonexistent/base.ckpt")


def test_export_loads_into_asuka_inpaint_pipeline(tiny_inpaint_dir_768, tmp_path):
    """``AsukaInpaintPipeline.from_parts(..., vae=export)`` picks HarmonizingDecoderKL and conditions the decode."""
    from diffusers import AutoencoderKL

    from asuka.models.aligner import PriorAligner
    from asuka.models.mae import MAEPrior
    from asuka.pipelines.asuka import AsukaInpaintPipeline

    torch.manual_seed(0)
    mae = MAEPrior.tiny().eval()
    PriorAligner(in_dim=mae.feature_dim, cross_attention_dim=768, num_blocks=1).save_pretrained(tmp_path / "aligner")
    mae.save_pretrained(tmp_path / "mae")
    decoder = HarmonizingDecoderKL.from_vae(AutoencoderKL.from_pretrained(tiny_inpaint_dir_768, subfolder="vae"))
    _randomize(decoder.decoder.condition_encoder, 8)
    decoder.save_pretrained(tmp_path / "decoder")
    pipe = AsukaInpaintPipeline.from_parts(tiny_inpaint_dir_768, mae=tmp_path / "mae", aligner=tmp_path / "aligner",
                                           vae=tmp_path / "decoder")
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.vae, HarmonizingDecoderKL) and pipe.vae.config.condition_channels == 4
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3)).astype(np.uint8))
    hole = np.zeros((64, 64), np.uint8)
    hole[20:44, 12:40] = 255
    kwargs = dict(num_inference_steps=2, paste_back=False)
    latents = pipe(rgb, Image.fromarray(hole), output_type="latent", generator=torch.Generator().manual_seed(0),
                   **kwargs).images
    out = pipe(rgb, Image.fromarray(hole), output_type="pt", generator=torch.Generator().manual_seed(0), **kwargs).images
    image = torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    mask = torch.from_numpy(hole > 127)[None, None].float()
    with torch.no_grad():
        manual = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, image=image, mask=mask).sample
    torch.testing.assert_close(out, (manual / 2 + 0.5).clamp(0, 1), rtol=1e-4, atol=1e-4)

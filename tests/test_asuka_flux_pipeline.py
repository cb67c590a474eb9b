"""AsukaFluxFillPipeline on tiny real FLUX.1-Fill components: bit-exact oracle against diffusers' FluxFillPipeline,
the MAE -> heads -> null interpolation condition, the shifted harmonizing decode, batching, save/load, and the
one-call converter from the release folder layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, FluxFillPipeline

from asuka.models import convert
from asuka.models.decoder import HarmonizingDecoderKL
from asuka.pipelines.asuka_flux.pipeline import AsukaFluxFillPipeline, tiny_asuka_flux_pipeline
from asuka.errors import InputError
from flux_support import to_ldm_decoder, to_sequential_head

SIZE = 64
STEPS = 2


@pytest.fixture(scope="module")
def pipe(tiny_flux_fill_dir) -> AsukaFluxFillPipeline:
    pipe = tiny_asuka_flux_pipeline(tiny_flux_fill_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def fill(tiny_flux_fill_dir) -> FluxFillPipeline:
    fill = FluxFillPipeline.from_pretrained(tiny_flux_fill_dir)
    fill.set_progress_bar_config(disable=True)
    return fill


def _inputs(batch: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image01 = torch.rand(batch, 3, SIZE, SIZE, generator=g)
    mask = torch.zeros(batch, 1, SIZE, SIZE)
    mask[..., 12:44, 20:52] = 1
    return image01, 2.0 * image01 - 1.0, mask  # [-1, 1] exactly as diffusers normalises [0, 1] tensors


def _noise(pipe, batch: int, seed: int = 1) -> torch.Tensor:
    return pipe.prepare_noise(batch, SIZE, SIZE, torch.float32, torch.device("cpu"), torch.Generator().manual_seed(seed))


def test_equals_diffusers_flux_fill_bit_for_bit_before_decoding(pipe, fill):
    image01, image, mask = _inputs(batch=2)
    with torch.no_grad():
        text, pooled = pipe.encode_prior(image, mask)
    latents = _noise(pipe, 2)
    ours = pipe(image, mask, num_inference_steps=STEPS, latents=latents, prompt_embeds=text,
                pooled_prompt_embeds=pooled, generator=torch.Generator().manual_seed(5), output_type="latent").images
    ref = fill(image=image01, mask_image=mask, height=SIZE, width=SIZE, num_inference_steps=STEPS, latents=latents,
               prompt_embeds=text, pooled_prompt_embeds=pooled, generator=torch.Generator().manual_seed(5),
               output_type="latent").images
    assert ours.shape == (2, (SIZE // 16) ** 2, 64)
    assert torch.equal(ours, ref)


def test_plain_flux_vae_output_equals_diffusers(pipe, fill):
    """With the FLUX AutoencoderKL as vae (no harmonizing decoder) and no paste-back, the images match too."""
    plain = AsukaFluxFillPipeline(vae=fill.vae, transformer=pipe.transformer, scheduler=pipe.scheduler, mae=pipe.mae,
                                  aligner=pipe.aligner)
    plain.set_progress_bar_config(disable=True)
    image01, image, mask = _inputs()
    text, pooled = plain.encode_prior(image, mask)
    kwargs = dict(num_inference_steps=STEPS, latents=_noise(pipe, 1), prompt_embeds=text, pooled_prompt_embeds=pooled,
                  output_type="pt")
    ours = plain(image, mask, paste_back=False, generator=torch.Generator().manual_seed(2), **kwargs).images
    ref = fill(image=image01, mask_image=mask, height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(2),
               **kwargs).images
    assert torch.equal(ours, ref)


def test_condition_is_aligned_prior_interpolated_toward_nulls(pipe):
    _, image, mask = _inputs()
    with torch.no_grad():
        features = pipe.mae.prior(image, mask, return_image=False).features
        text = pipe.aligner.t5(features)
        pooled = pipe.aligner.clip(features).mean(dim=1)  # official: torch.mean(clip_fea, dim=1)
        for w in (0.5, 0.8):
            got_text, got_pooled = pipe.encode_prior(image, mask, condition_weight=w)
            torch.testing.assert_close(got_text, pipe.aligner.null_text + w * (text - pipe.aligner.null_text))
            torch.testing.assert_close(got_pooled, pipe.aligner.null_pooled + w * (pooled - pipe.aligner.null_pooled))
    assert text.shape == (1, 256, pipe.transformer.config.joint_attention_dim)
    assert pooled.shape == (1, pipe.transformer.config.pooled_projection_dim)
    null = pipe.encode_prior(image, mask, condition_weight=0.0)
    assert torch.equal(null[0], pipe.aligner.null_text) and torch.equal(null[1], pipe.aligner.null_pooled)


def test_harmonizing_decode_uses_shift_and_full_image(pipe):
    _, image, mask = _inputs()
    final = {}

    def keep_latents(_pipe, step, t, tensors):
        final["latents"] = tensors["latents"]
        return {}

    out = pipe(image, mask, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(3), output_type="pt",
               paste_back=False, callback_on_step_end=keep_latents).images
    latents = final["latents"]
    vae = pipe.vae
    assert isinstance(vae, HarmonizingDecoderKL) and vae.config.shift_factor == pytest.approx(0.1159)
    z = pipe._unpack_latents(latents, SIZE, SIZE, pipe.vae_scale_factor)
    with torch.no_grad():
        ref = vae.decode(z / vae.config.scaling_factor + vae.config.shift_factor, image=image, mask=mask).sample
    torch.testing.assert_close(out, (ref / 2 + 0.5).clamp(0, 1), atol=1e-6, rtol=0)
    pasted = pipe(image, mask, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(3),
                  output_type="pt").images
    known = mask.expand_as(image) < 0.5
    torch.testing.assert_close(pasted[known], ((image + 1) / 2)[known], atol=1e-6, rtol=0)


def test_batch_equals_single_runs(pipe):
    _, image, mask = _inputs(batch=2)
    mask[1, :, :8] = 1
    gens = [torch.Generator().manual_seed(s) for s in (7, 8)]
    batch = pipe(image, mask, num_inference_steps=STEPS, generator=gens, output_type="pt").images
    for i, seed in enumerate((7, 8)):
        single = pipe(image[i:i + 1], mask[i:i + 1], num_inference_steps=STEPS,
                      generator=torch.Generator().manual_seed(seed), output_type="pt").images
        torch.testing.assert_close(batch[i:i + 1], single, atol=1e-5, rtol=0)


def test_odd_size_is_padded_and_cropped_and_errors_are_one_line(pipe):
    _, image, mask = _inputs()
    out = pipe(image[..., :50, :41], mask[..., :50, :41], num_inference_steps=1, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 3, 50, 41)
    with pytest.raises(InputError, match="multiple of 16"):
        pipe(image, mask, height=40, width=64, num_inference_steps=1)
    with pytest.raises(InputError, match="together"):
        pipe(image, mask, prompt_embeds=torch.zeros(1, 256, 128), num_inference_steps=1)


# ---------------------------------------------------------------------------------------------- release layout
def test_release_folder_converts_in_one_call_and_runs(pipe, tiny_flux_fill_dir, tmp_path):
    release = tmp_path / "release"
    release.mkdir()
    torch.save({"model": pipe.mae.state_dict(), "epoch": 300}, release / "mae_300.pth")
    for name, head in (("clip", pipe.aligner.clip), ("t5", pipe.aligner.t5)):
        torch.save(to_sequential_head(head.state_dict(), head.config.num_blocks), release / f"asuka_alignment_{name}.pt")
    ldm = to_ldm_decoder(pipe.vae.state_dict(), len(pipe.vae.config.up_block_out_channels))
    ldm["decoder.up_layers.0.weight"] = torch.zeros(1)  # unused ConvTranspose2d stack, dropped by the converter
    torch.save({"state_dict": ldm}, release / "asuka_decoder.ckpt")
    torch.save(pipe.aligner.null_pooled.clone(), release / "vec.pt")
    torch.save(pipe.aligner.null_text.clone(), release / "txt_256.pt")

    tiny = {k: pipe.mae.config[k] for k in ("num_heads", "decoder_num_heads", "feature_layer")}  # not ViT-B
    out = convert.convert_asuka_flux_release(release, tiny_flux_fill_dir, tmp_path / "converted", mae_options=tiny)
    loaded = AsukaFluxFillPipeline.from_pretrained(out)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.vae, HarmonizingDecoderKL)
    assert (loaded.vae.config.scaling_factor, loaded.vae.config.shift_factor) == (0.3611, 0.1159)
    _, image, mask = _inputs()
    kwargs = dict(num_inference_steps=STEPS, output_type="pt")
    a = loaded(image, mask, generator=torch.Generator().manual_seed(4), **kwargs).images
    b = pipe(image, mask, generator=torch.Generator().manual_seed(4), **kwargs).images
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_from_parts_defaults_nulls_to_the_folder_text_encoders(pipe, tiny_flux_fill_dir, tmp_path):
    pipe.mae.save_pretrained(tmp_path / "mae")
    pipe.aligner.clip.save_pretrained(tmp_path / "clip")
    pipe.aligner.t5.save_pretrained(tmp_path / "t5")
    built = AsukaFluxFillPipeline.from_parts(tiny_flux_fill_dir, mae=tmp_path / "mae", aligner_clip=tmp_path / "clip",
                                             aligner_t5=tmp_path / "t5")
    assert torch.equal(built.aligner.null_text, pipe.aligner.null_text)
    assert torch.equal(built.aligner.null_pooled, pipe.aligner.null_pooled)
    assert type(built.vae) is AutoencoderKL  # no decoder given: the FLUX folder's own vae
    with pytest.raises(ValueError, match="either aligner"):
        AsukaFluxFillPipeline.from_parts(tiny_flux_fill_dir, mae=tmp_path / "mae", aligner_clip=tmp_path / "clip")


def test_rejects_vae_without_shift(pipe):
    vae = AutoencoderKL(latent_channels=16, block_out_channels=(8, 16, 32, 32), norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    with pytest.raises(ValueError, match="shift_factor"):
        AsukaFluxFillPipeline(vae=vae, transformer=pipe.transformer, scheduler=pipe.scheduler, mae=pipe.mae,
                              aligner=pipe.aligner)
    assert np.isclose(pipe.aligner.config.null_tokens, 256)


def test_registry_method_runs_the_offline_tiny_demo(monkeypatch, tmp_path):
    from asuka.api import Inpainter
    from asuka.pipelines._registry import available_methods, get_method

    monkeypatch.setenv("ASUKA_CACHE", str(tmp_path))
    assert "asuka-flux" in available_methods()
    assert get_method("asuka-flux").spec.defaults() == {"num_inference_steps": 50, "guidance_scale": 30.0,
                                                        "condition_weight": 0.5}
    inpainter = Inpainter("asuka-flux", options={"num_inference_steps": 1})  # the tiny demo folder, written offline
    _, image, mask = _inputs()
    out = inpainter(image[..., :32, :48], mask[..., :32, :48], seed=0, paste_back=False)
    assert (tmp_path / "tiny-asuka-flux" / "model_index.json").is_file()
    direct = inpainter.runner.pipe(image[..., :32, :48], mask[..., :32, :48], generator=[torch.Generator().manual_seed(0)],
                                   num_inference_steps=1, paste_back=False, output_type="pt").images * 2 - 1
    assert out.shape == (1, 3, 32, 48)
    torch.testing.assert_close(out, direct, atol=1e-6, rtol=0)


def test_builder_swaps_in_a_16_channel_decoder_and_rejects_others(pipe, tmp_path):
    from asuka.models.tiny import tiny_vae
    from asuka.pipelines.asuka_flux.pipeline import build_asuka_flux

    pipe.save_pretrained(tmp_path / "pipe")
    decoder = HarmonizingDecoderKL.from_vae(pipe.vae)
    runner = build_asuka_flux(tmp_path / "pipe", device=torch.device("cpu"), dtype=torch.float32, vae=decoder)
    assert runner.pipe.vae is decoder
    with pytest.raises(InputError, match="16-channel"):
        build_asuka_flux(tmp_path / "pipe", device=torch.device("cpu"), dtype=torch.float32,
                         vae=HarmonizingDecoderKL.from_vae(tiny_vae()))


def test_model_cpu_offload_hooks_give_the_same_images(tiny_flux_fill_dir):
    """enable_model_cpu_offload's accelerate hooks (here with the CPU as execution device: the hook path, not the
    transfer) leave the result unchanged; model_cpu_offload_seq names every model component."""
    offloaded = tiny_asuka_flux_pipeline(tiny_flux_fill_dir)
    offloaded.set_progress_bar_config(disable=True)
    _, image, mask = _inputs()
    kwargs = dict(num_inference_steps=1, output_type="pt")
    ref = offloaded(image, mask, generator=torch.Generator().manual_seed(0), **kwargs).images
    offloaded.enable_model_cpu_offload(device="cpu")
    out = offloaded(image, mask, generator=torch.Generator().manual_seed(0), **kwargs).images
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert set(offloaded.model_cpu_offload_seq.split("->")) == {"mae", "aligner", "transformer", "vae"}

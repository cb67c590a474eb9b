"""AsukaInpaintPipeline: bit-exact oracle against diffusers' StableDiffusionInpaintPipeline, paste-back, batching,
save/load through model_index.json, assembly from separate exports, callbacks, and input errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import AsymmetricAutoencoderKL, StableDiffusionInpaintPipeline
from PIL import Image
from skimage import data

from asuka.models.aligner import PriorAligner
from asuka.models.mae import MAEPrior
from asuka.pipelines._sampling import decode
from asuka.pipelines.asuka import AsukaInpaintPipeline
from asuka.errors import InputError

SIZE = 64
STEPS = 2


def _photo(fn, size: int = SIZE) -> Image.Image:
    return Image.fromarray(fn()).convert("RGB").resize((size, size), Image.BICUBIC)


def _box_mask(size: int = SIZE, box=(16, 12, 44, 52)) -> Image.Image:
    m = np.zeros((size, size), np.uint8)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = 255
    return Image.fromarray(m, "L")


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 127.5 - 1.0


def _mask_tensor(mask: Image.Image) -> torch.Tensor:
    return torch.from_numpy((np.asarray(mask) >= 128).astype(np.float32))[None, None]


@pytest.fixture(scope="module")
def sd(tiny_inpaint_dir_768):
    pipe = StableDiffusionInpaintPipeline.from_pretrained(tiny_inpaint_dir_768, safety_checker=None,
                                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    mae = MAEPrior.tiny().eval()
    aligner = PriorAligner(in_dim=mae.feature_dim, cross_attention_dim=768, num_blocks=2).eval()
    return mae, aligner


def _asuka(sd, parts, vae=None) -> AsukaInpaintPipeline:
    mae, aligner = parts
    pipe = AsukaInpaintPipeline(vae=vae or sd.vae, unet=sd.unet, scheduler=sd.scheduler, mae=mae, aligner=aligner)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def asuka(sd, parts):
    return _asuka(sd, parts)


def _tiny_asymmetric_vae(sd) -> AsymmetricAutoencoderKL:
    """A tiny AsymmetricAutoencoderKL sharing the SD VAE's encoder (so both pipelines see the same latents)."""
    cfg = sd.vae.config
    torch.manual_seed(3)
    vae = AsymmetricAutoencoderKL(
        down_block_types=cfg.down_block_types, down_block_out_channels=cfg.block_out_channels,
        layers_per_down_block=cfg.layers_per_block, up_block_types=cfg.up_block_types,
        up_block_out_channels=cfg.block_out_channels, layers_per_up_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups, sample_size=cfg.sample_size,
        scaling_factor=cfg.scaling_factor).eval()
    missing, unexpected = vae.load_state_dict(sd.vae.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("decoder.condition_encoder.") for k in missing)
    return vae


def _oracle(sd, asuka, image, mask, seed=0, **kwargs):
    embeds = asuka.encode_prior(_to_tensor(image), _mask_tensor(mask))
    assert embeds.shape == (1, 256, 768)
    ref = sd(prompt_embeds=embeds, image=_to_tensor(image), mask_image=_mask_tensor(mask), guidance_scale=1.0,
             num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="np",
             generator=torch.Generator().manual_seed(seed), **kwargs).images
    ours = asuka(image, mask, num_inference_steps=STEPS, output_type="np", paste_back=False,
                 generator=torch.Generator().manual_seed(seed)).images
    return ours, ref


def test_oracle_bit_exact_with_diffusers_inpaint_pipeline(sd, asuka):
    ours, ref = _oracle(sd, asuka, _photo(data.astronaut), _box_mask())
    assert ours.shape == (1, SIZE, SIZE, 3)
    np.testing.assert_array_equal(ours, ref)


def test_oracle_bit_exact_with_asymmetric_decoder(sd, parts):
    vae = _tiny_asymmetric_vae(sd)
    ref_pipe = StableDiffusionInpaintPipeline(vae=vae, unet=sd.unet, scheduler=sd.scheduler, text_encoder=sd.text_encoder,
                                              tokenizer=sd.tokenizer, safety_checker=None, feature_extractor=None,
                                              requires_safety_checker=False)
    ref_pipe.set_progress_bar_config(disable=True)
    pipe = _asuka(sd, parts, vae=vae)
    ours, ref = _oracle(ref_pipe, pipe, _photo(data.chelsea), _box_mask())
    np.testing.assert_array_equal(ours, ref)
    # The decoder really is conditioned: a plain decode of the same latents differs.
    latents = pipe(_photo(data.chelsea), _box_mask(), num_inference_steps=STEPS, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
    plain = vae.decode(latents / vae.config.scaling_factor).sample
    conditioned = decode(vae, latents, image=_to_tensor(_photo(data.chelsea)), mask=_mask_tensor(_box_mask()))
    assert not torch.allclose(plain, conditioned)


def test_paste_back_keeps_known_pixels_exactly(asuka):
    image, mask = _photo(data.coffee), _box_mask()
    out = asuka(image, mask, num_inference_steps=STEPS, output_type="np",
                generator=torch.Generator().manual_seed(1)).images[0]
    raw = asuka(image, mask, num_inference_steps=STEPS, output_type="np", paste_back=False,
                generator=torch.Generator().manual_seed(1)).images[0]
    known = np.asarray(mask) < 128
    np.testing.assert_array_equal(np.round(out[known] * 255).astype(np.uint8), np.asarray(image)[known])
    np.testing.assert_array_equal(out[~known], raw[~known])
    assert not np.array_equal(raw[known], out[known])  # the raw decoder output is not the input


def test_batch_with_generator_list_matches_single_runs(asuka):
    images = [_photo(data.astronaut), _photo(data.rocket)]
    masks = [_box_mask(), _box_mask(box=(4, 4, 30, 60))]
    batch = asuka(images, masks, num_inference_steps=STEPS, output_type="np",
                  generator=[torch.Generator().manual_seed(s) for s in (5, 6)]).images
    assert batch.shape == (2, SIZE, SIZE, 3)
    for i, seed in enumerate((5, 6)):
        single = asuka(images[i], masks[i], num_inference_steps=STEPS, output_type="np",
                       generator=torch.Generator().manual_seed(seed)).images[0]
        np.testing.assert_allclose(batch[i], single, atol=2e-5)


def test_one_mask_serves_a_batch_and_pil_output(asuka):
    images = [_photo(data.astronaut), _photo(data.chelsea)]
    out = asuka(images, _box_mask(), num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert len(out) == 2 and all(isinstance(im, Image.Image) and im.size == (SIZE, SIZE) for im in out)


def test_height_width_resize_and_latent_output(asuka):
    image = _photo(data.astronaut, size=80)
    latents = asuka(image, _box_mask(size=80), height=48, width=64, num_inference_steps=2, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images
    assert latents.shape == (1, 4, 6, 8)


def test_callback_on_step_end_sees_and_replaces_latents(asuka):
    seen = []

    def callback(pipe, step, t, tensors):
        seen.append((step, tuple(tensors)))
        return {"latents": torch.zeros_like(tensors["latents"])}

    out = asuka(_photo(data.astronaut), _box_mask(), num_inference_steps=STEPS, output_type="latent",
                callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
                generator=torch.Generator().manual_seed(0)).images
    assert seen == [(i, ("latents", "prompt_embeds")) for i in range(STEPS)]
    assert torch.count_nonzero(out) == 0


def test_save_pretrained_and_from_pretrained_round_trip(tmp_path, asuka):
    asuka.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["_class_name"] == "AsukaInpaintPipeline"
    assert index["mae"] == ["asuka.models.mae", "MAEPrior"]
    assert index["aligner"] == ["asuka.models.aligner", "PriorAligner"]
    loaded = AsukaInpaintPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.mae, MAEPrior) and isinstance(loaded.aligner, PriorAligner)
    kwargs = dict(num_inference_steps=2, output_type="np")
    a = asuka(_photo(data.astronaut), _box_mask(), generator=torch.Generator().manual_seed(0), **kwargs).images
    b = loaded(_photo(data.astronaut), _box_mask(), generator=torch.Generator().manual_seed(0), **kwargs).images
    np.testing.assert_array_equal(a, b)


def test_from_parts_assembles_separate_exports_with_the_harmonizing_decoder(tmp_path, sd, parts,
                                                                           tiny_inpaint_dir_768):
    from asuka.models.decoder import HarmonizingDecoderKL

    mae, aligner = parts
    mae.save_pretrained(tmp_path / "mae")
    aligner.save_pretrained(tmp_path / "aligner")
    decoder = HarmonizingDecoderKL.from_vae(sd.vae).eval()
    decoder.save_pretrained(tmp_path / "decoder")
    pipe = AsukaInpaintPipeline.from_parts(tiny_inpaint_dir_768, mae=tmp_path / "mae", aligner=tmp_path / "aligner",
                                           vae=tmp_path / "decoder")
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.vae, HarmonizingDecoderKL)
    assert type(pipe.scheduler) is type(sd.scheduler)
    direct = _asuka(sd, parts, vae=decoder)
    kwargs = dict(num_inference_steps=2, output_type="np", paste_back=False)
    a = pipe(_photo(data.rocket), _box_mask(), generator=torch.Generator().manual_seed(0), **kwargs).images
    b = direct(_photo(data.rocket), _box_mask(), generator=torch.Generator().manual_seed(0), **kwargs).images
    np.testing.assert_array_equal(a, b)
    # The whole pipeline, decoder included, round-trips through model_index.json.
    pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["vae"] == ["asuka.models.decoder", "HarmonizingDecoderKL"]
    loaded = AsukaInpaintPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.vae, HarmonizingDecoderKL)
    c = loaded(_photo(data.rocket), _box_mask(), generator=torch.Generator().manual_seed(0), **kwargs).images
    np.testing.assert_array_equal(a, c)
    # A fresh process that never imported asuka.models.decoder loads it too (diffusers resolves only imported modules).
    code = ("import sys; from asuka.pipelines.asuka import AsukaInpaintPipeline as P; "
            "print(type(P.from_pretrained(sys.argv[1]).vae).__name__)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "pipe")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "HarmonizingDecoderKL"


def test_from_parts_missing_folder_is_clear(tmp_path, parts, tiny_inpaint_dir_768):
    parts[0].save_pretrained(tmp_path / "mae")
    with pytest.raises(FileNotFoundError, match="aligner: "):
        AsukaInpaintPipeline.from_parts(tiny_inpaint_dir_768, mae=tmp_path / "mae", aligner=tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="sd_inpaint: "):
        AsukaInpaintPipeline.from_parts(tmp_path, mae=tmp_path / "mae", aligner=tmp_path / "mae")


def test_mismatched_components_are_rejected(sd, parts):
    mae, _ = parts
    with pytest.raises(ValueError, match="in_dim"):
        AsukaInpaintPipeline(vae=sd.vae, unet=sd.unet, scheduler=sd.scheduler, mae=mae,
                             aligner=PriorAligner(in_dim=512, cross_attention_dim=768, num_blocks=1))
    with pytest.raises(ValueError, match="cross_attention_dim"):
        AsukaInpaintPipeline(vae=sd.vae, unet=sd.unet, scheduler=sd.scheduler, mae=mae,
                             aligner=PriorAligner(in_dim=mae.feature_dim, cross_attention_dim=128, num_blocks=1))


@pytest.mark.parametrize("kwargs, match", [
    (dict(height=60), "height=60"),
    (dict(output_type="jpg"), "output_type"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(callback_on_step_end_tensor_inputs=["noise"]), "callback_on_step_end_tensor_inputs"),
])
def test_bad_arguments(asuka, kwargs, match):
    with pytest.raises(InputError, match=match):
        asuka(_photo(data.astronaut), _box_mask(), **kwargs)


def test_mask_count_mismatch(asuka):
    with pytest.raises(InputError, match="batch size"):
        asuka([_photo(data.astronaut)] * 3, [_box_mask()] * 2, num_inference_steps=1)


def test_cli_inpaints_a_folder_with_one_mask(tmp_path, asuka):
    from asuka.cli import main

    asuka.save_pretrained(tmp_path / "model")
    images = tmp_path / "images"
    images.mkdir()
    for name, fn in (("a", data.astronaut), ("b", data.chelsea)):
        _photo(fn).save(images / f"{name}.png")
    _box_mask().save(tmp_path / "mask.png")
    code = main(["inpaint", "--method", "asuka", "--model", str(tmp_path / "model"), "--image", str(images),
                 "--mask", str(tmp_path / "mask.png"), "--out", str(tmp_path / "out"), "--steps", "2"])
    assert code == 0
    known = np.asarray(_box_mask()) < 128
    for name in ("a", "b"):
        out = np.asarray(Image.open(tmp_path / "out" / f"{name}.png"))
        assert out.shape == (SIZE, SIZE, 3)
        np.testing.assert_array_equal(out[known], np.asarray(Image.open(images / f"{name}.png"))[known])
    # The runner drives the same pipeline: it equals a direct call without paste-back inside the hole.
    direct = asuka(_photo(data.astronaut), _box_mask(), num_inference_steps=2, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images[0]
    out = np.asarray(Image.open(tmp_path / "out" / "a.png"))
    assert np.abs(out[~known].astype(int) - np.round(direct[~known] * 255).astype(int)).max() <= 1


def test_cli_bad_model_folder_is_one_line_error(tmp_path, capsys):
    from asuka.cli import main

    _photo(data.astronaut).save(tmp_path / "a.png")
    _box_mask().save(tmp_path / "m.png")
    code = main(["inpaint", "--method", "asuka", "--model", str(tmp_path), "--image", str(tmp_path / "a.png"),
                 "--mask", str(tmp_path / "m.png"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "model_index.json" in err and len(err.splitlines()) == 1

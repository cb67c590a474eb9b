"""HD-Painter's inpainting-specialised super-resolution on a tiny real x4 upscaler (oracles S2, S4 end to end)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionUpscalePipeline

from asuka.errors import InputError
from asuka.pipelines.hd_painter.sr import InpaintSRPipeline

SIZE = 64      # output long side in these tests (2048 by default)
PAD = 32       # canvas multiple (256 by default)


@pytest.fixture(scope="module")
def upscaler_dir(tmp_path_factory):
    from asuka.models.tiny_upscaler import save_tiny_upscaler

    return save_tiny_upscaler(tmp_path_factory.mktemp("tiny-x4"))


@pytest.fixture(scope="module")
def sr_pipe(upscaler_dir):
    pipe = InpaintSRPipeline.from_pretrained(upscaler_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _inputs(batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, 3, 48, SIZE, generator=g) * 2 - 1
    mask = torch.zeros(batch, 1, 48, SIZE)
    mask[..., 12:36, 20:44] = 1
    low = torch.rand(batch, 3, 12, SIZE // 4, generator=g) * 2 - 1
    return image, mask, low


def _run(pipe, image, mask, low, seed=0, **kw):
    kw = dict(prompt="a boat", num_inference_steps=2, output_long_side=SIZE, pad_multiple=PAD, output_type="pt") | kw
    gen = [torch.Generator().manual_seed(seed + i) for i in range(image.shape[0])]
    return pipe(image, mask, low, generator=gen, **kw).images


def test_loads_upscaler_folder_and_round_trips(sr_pipe, tmp_path):
    from asuka.models.tiny_upscaler import UPSCALER_SCALING_FACTOR

    assert sr_pipe.unet.config.in_channels == 7 and sr_pipe.vae.config.scaling_factor == UPSCALER_SCALING_FACTOR
    sr_pipe.save_pretrained(tmp_path)
    again = InpaintSRPipeline.from_pretrained(tmp_path)
    again.set_progress_bar_config(disable=True)
    image, mask, low = _inputs()
    assert torch.equal(_run(sr_pipe, image, mask, low, num_inference_steps=1),
                       _run(again, image, mask, low, num_inference_steps=1))


def test_s2_full_mask_equals_vanilla_diffusers_upscaler(upscaler_dir, sr_pipe):
    image, _, low = _inputs()
    image = torch.cat([image, image[..., :16, :]], dim=2)          # square: no canvas padding, like diffusers
    low = torch.cat([low, low[..., :4, :]], dim=2)
    ours = _run(sr_pipe, image, torch.ones(1, 1, SIZE, SIZE), low, poisson=False, num_inference_steps=2)
    ref = StableDiffusionUpscalePipeline.from_pretrained(upscaler_dir)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True)
    expected = ref(prompt="a boat, high resolution professional photo", negative_prompt="", image=(low + 1) / 2,
                   num_inference_steps=2, guidance_scale=7.5, noise_level=20, output_type="pt",
                   generator=[torch.Generator().manual_seed(0)]).images
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_s2_empty_mask_reconstructs_the_original(sr_pipe):
    image, _, low = _inputs()
    ours = _run(sr_pipe, image, torch.zeros(1, 1, 48, SIZE), low, poisson=False, num_inference_steps=1)
    canvas = torch.nn.functional.pad(image, (0, 0, 0, 16), mode="reflect")
    vae = sr_pipe.vae
    z0 = vae.encode(canvas).latent_dist.mean * vae.config.scaling_factor
    recon = vae.decode(z0 / vae.config.scaling_factor).sample.clamp(-1, 1)[..., :48, :]
    torch.testing.assert_close(ours, (recon + 1) / 2, atol=1e-5, rtol=0)
    # with Poisson blending an empty mask returns the original itself
    out = _run(sr_pipe, image, torch.zeros(1, 1, 48, SIZE), low, num_inference_steps=1)
    torch.testing.assert_close(out * 2 - 1, image, atol=1 / 255, rtol=0)


def test_s4_output_size_and_outside_pixels(sr_pipe):
    image, mask, low = _inputs()
    out = _run(sr_pipe, image, mask, low, output_long_side=128, num_inference_steps=1)
    assert out.shape == (1, 3, 96, 128)
    small = _run(sr_pipe, image[..., :40, :50], mask[..., :40, :50], low, num_inference_steps=1)   # resized low-res
    assert small.shape == (1, 3, 51, 64)


def test_batch_equals_single_runs(sr_pipe):
    image, mask, low = _inputs(batch=2)
    mask[1] = 0
    mask[1, :, 0:20, 0:30] = 1
    kw = dict(poisson=False, num_inference_steps=1)   # Poisson is per sample on uint8 (rounding may flip by 1/255)
    both = _run(sr_pipe, image, mask, low, prompt=["a boat", "a cat"], **kw)
    one = _run(sr_pipe, image[:1], mask[:1], low[:1], prompt="a boat", **kw)
    two = _run(sr_pipe, image[1:], mask[1:], low[1:], seed=1, prompt="a cat", **kw)
    torch.testing.assert_close(both, torch.cat([one, two]), atol=1e-4, rtol=0)   # float batching effects


def test_errors(sr_pipe):
    image, mask, low = _inputs()
    with pytest.raises(InputError, match="pad_multiple"):
        _run(sr_pipe, image, mask, low, pad_multiple=48)
    with pytest.raises(InputError, match="noise_level"):
        _run(sr_pipe, image, mask, low, noise_level=400)
    with pytest.raises(InputError, match="prompt"):
        _run(sr_pipe, image, mask, low, prompt=["a", "b"])
    with pytest.raises(InputError, match="low_res"):
        _run(sr_pipe, image, mask, torch.cat([low, low, low]))


def test_super_resolve_after_any_method_loads_only_for_holes(upscaler_dir):
    from asuka.pipelines.hd_painter.sr import load_sr, super_resolve

    image, mask, low = _inputs(batch=2)
    mask[1] = 0
    calls = []

    def loader():
        calls.append(1)
        return load_sr(upscaler_dir)

    result = torch.nn.functional.interpolate(low, size=(48, SIZE))          # any method's output at the input size
    out = super_resolve(loader, result, image, mask, ["a boat", "x"], seed=0, output_long_side=128, pad_multiple=PAD,
                        num_inference_steps=1)
    assert out.shape == (2, 3, 96, 128) and calls == [1]
    torch.testing.assert_close(out[1], torch.nn.functional.interpolate(image[1:], size=(96, 128), mode="bicubic",
                                                                       antialias=True).clamp(-1, 1)[0])
    assert super_resolve(loader, result, image, torch.zeros_like(mask), None, output_long_side=128).shape[-1] == 128
    assert calls == [1]                                                     # no hole: nothing loaded
    with pytest.raises(InputError) as err:
        load_sr(upscaler_dir / "unet")
    assert err.value.field == "sr"

"""The shared denoising loop (asuka.pipelines._sampling) against diffusers' own pipelines and the written-out formulas."""

from __future__ import annotations

import pytest
import torch
from diffusers import AsymmetricAutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionInpaintPipeline

from asuka.models.tiny import tiny_sd_components
from asuka.pipelines._sampling import (AlphaBar, Step, cfg_noise, ddim_sigma, ddim_without_clipping, decode, denoise,
                                       latent_gradient, predicted_x0, previous_timestep, unet_input)

SIZE = 64


@pytest.fixture(scope="module")
def pipe():
    parts = tiny_sd_components()
    pipe = StableDiffusionInpaintPipeline(**parts, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _inputs(batch: int = 2):
    g = torch.Generator().manual_seed(3)
    image = torch.rand(batch, 3, SIZE, SIZE, generator=g) * 2 - 1
    mask = torch.zeros(batch, 1, SIZE, SIZE)
    mask[0, :, 8:40, 16:48] = 1
    mask[-1, :, 24:60, 4:30] = 1
    return image, mask


def _prepare(pipe, image, mask, prompt, guidance_scale, steps, seed):
    """The conditioning tensors and initial latent exactly as diffusers' pipeline makes them."""
    batch = image.shape[0]
    cfg = guidance_scale > 1
    embeds, negative = pipe.encode_prompt(prompt, "cpu", 1, cfg, negative_prompt=None)
    if cfg:
        embeds = torch.cat([negative, embeds])
    pipe.scheduler.set_timesteps(steps)
    timesteps = pipe.scheduler.timesteps
    generator = [torch.Generator().manual_seed(seed + i) for i in range(batch)]
    init = pipe.image_processor.preprocess((image + 1) / 2, height=SIZE, width=SIZE)
    mask_condition = pipe.mask_processor.preprocess(mask, height=SIZE, width=SIZE)
    latents = pipe.prepare_latents(batch, 4, SIZE, SIZE, embeds.dtype, torch.device("cpu"), generator, None,
                                   image=init, timestep=timesteps[:1].repeat(batch), is_strength_max=True,
                                   return_noise=True, return_image_latents=False)[0]
    masked = init * (mask_condition < 0.5)
    mask_latent, masked_latents = pipe.prepare_mask_latents(mask_condition, masked, batch, SIZE, SIZE, embeds.dtype,
                                                            torch.device("cpu"), generator, cfg)
    return embeds, timesteps, latents, mask_latent, masked_latents, generator


@pytest.mark.parametrize("guidance_scale", [1.0, 7.5])
def test_loop_with_cfg_noise_equals_diffusers_inpaint_pipeline_bit_for_bit(pipe, guidance_scale):
    image, mask = _inputs()
    prompt = ["a red boat", "a cat"]
    expected = pipe(prompt=prompt, image=(image + 1) / 2, mask_image=mask, height=SIZE, width=SIZE,
                    num_inference_steps=3, guidance_scale=guidance_scale, output_type="latent",
                    generator=[torch.Generator().manual_seed(5 + i) for i in range(2)]).images
    embeds, timesteps, latents, mask_latent, masked_latents, generator = _prepare(pipe, image, mask, prompt,
                                                                                   guidance_scale, 3, 5)
    cfg = guidance_scale > 1

    def noise(step, z, tensors):
        x = unet_input(pipe.scheduler, z, step.timestep, cfg=cfg,
                       extra_channels=(tensors["mask"], tensors["masked_image_latents"]))
        return cfg_noise(pipe.unet, x, step.timestep, tensors["prompt_embeds"], guidance_scale, cfg=cfg)

    got = denoise(pipe, latents, timesteps, noise,
                  tensors={"prompt_embeds": embeds, "mask": mask_latent, "masked_image_latents": masked_latents},
                  extra_step_kwargs=pipe.prepare_extra_step_kwargs(generator, 0.0))
    assert torch.equal(got, expected)


def test_hooks_run_in_order_and_callback_replaces_tensors(pipe):
    calls = []
    timesteps = torch.tensor([900, 500, 100])
    pipe.scheduler.set_timesteps(3)

    def before(step, z, tensors):
        calls.append(("before", step.index))
        return z + 1

    def noise(step, z, tensors):
        calls.append(("noise", step.index, float(tensors["scale"])))
        return torch.zeros_like(z)

    def update(step, eps, z, tensors):
        calls.append(("update", step.index, step.is_last))
        return z * tensors["scale"]

    def after(step, z, tensors):
        calls.append(("after", step.index))
        return z

    def callback(p, i, t, kwargs):
        assert set(kwargs) == {"latents", "scale"}
        return {"latents": kwargs["latents"] - 1, "scale": kwargs["scale"] * 2}

    out = denoise(pipe, torch.zeros(1, 1), timesteps, noise, tensors={"scale": torch.tensor(1.0)}, before=before,
                  update=update, after=after, callback_on_step_end=callback,
                  callback_on_step_end_tensor_inputs=("latents", "scale"))
    # z: ((0+1)*1 - 1) = 0 -> ((0+1)*2 - 1) = 1 -> ((1+1)*4 - 1) = 7
    assert out.item() == 7
    assert calls[:4] == [("before", 0), ("noise", 0, 1.0), ("update", 0, False), ("after", 0)]
    assert calls[-3:] == [("noise", 2, 4.0), ("update", 2, True), ("after", 2)]


def test_alpha_bar_sigma_and_x0_equal_ddim_step():
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    scheduler.set_timesteps(10)
    table = AlphaBar(scheduler, "cpu")
    g = torch.Generator().manual_seed(0)
    x, eps, noise = (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    for t in scheduler.timesteps:
        prev = previous_timestep(scheduler, t)
        a_t, a_prev = table(t).double(), table(prev).double()
        assert torch.equal(a_t, scheduler.alphas_cumprod[t].double())
        sigma = ddim_sigma(a_t, a_prev, eta=1.0)
        x0 = predicted_x0(x, eps, a_t)
        manual = a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).sqrt() * eps + sigma * noise
        expected = scheduler.step(eps, t, x, eta=1.0, variance_noise=noise).prev_sample
        torch.testing.assert_close(manual, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(table(-19), torch.tensor(float(scheduler.final_alpha_cumprod)))


def test_latent_gradient_reaches_only_the_latent_and_frees_the_graph(pipe):
    unet = pipe.unet
    z = torch.randn(1, 4, 8, 8)
    extra = torch.randn(1, 5, 8, 8)
    context = torch.randn(1, 77, unet.config.cross_attention_dim)

    def loss_of(x):
        return unet(torch.cat([x, extra], 1), 500, encoder_hidden_states=context).sample.pow(2).sum()

    with torch.no_grad():
        grad, loss = latent_gradient(loss_of, z)
    assert grad.shape == z.shape and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert not loss.requires_grad and not grad.requires_grad
    assert all(p.grad is None for p in unet.parameters())
    # central finite difference along the gradient direction, float64
    unet64 = unet.double()
    try:
        direction = torch.randn(1, 4, 8, 8, dtype=torch.float64)
        grad64, _ = latent_gradient(lambda x: unet64(torch.cat([x, extra.double()], 1), 500,
                                                      encoder_hidden_states=context.double()).sample.pow(2).sum(),
                                    z.double())
        h = 1e-6

        def loss64(x):
            with torch.no_grad():
                return unet64(torch.cat([x, extra.double()], 1), 500,
                              encoder_hidden_states=context.double()).sample.pow(2).sum()

        plus, minus = loss64(z.double() + h * direction), loss64(z.double() - h * direction)
        torch.testing.assert_close((plus - minus) / (2 * h), (grad64 * direction).sum(), rtol=1e-5, atol=1e-6)
    finally:
        unet.float()


def test_decode_hands_image_and_mask_to_an_asymmetric_vae_and_applies_shift():
    parts = tiny_sd_components()
    vae = parts["vae"]
    latents = torch.randn(1, 4, 8, 8)
    expected = vae.decode(latents / vae.config.scaling_factor).sample
    assert torch.equal(decode(vae, latents), expected)
    vae.register_to_config(shift_factor=0.25)
    assert torch.equal(decode(vae, latents), vae.decode(latents / vae.config.scaling_factor + 0.25).sample)

    asym = AsymmetricAutoencoderKL(down_block_out_channels=(8, 16), up_block_out_channels=(8, 16),
                                   down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, layers_per_down_block=1,
                                   layers_per_up_block=1, norm_num_groups=4, latent_channels=4, sample_size=16)
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    z = torch.randn(1, 4, 8, 8)
    got = decode(asym, z, image=image, mask=mask)
    assert torch.equal(got, asym.decode(z / asym.config.scaling_factor, image=image, mask=mask).sample)
    with pytest.raises(ValueError, match="image and the mask"):
        decode(asym, z)


def test_step_is_last():
    assert Step(2, torch.tensor(1), 3).is_last and not Step(1, torch.tensor(1), 3).is_last


def test_ddim_without_clipping_keeps_the_schedule_and_drops_clipping():
    """The sampler of the PILOT, HarmonPaint and CorrFill runners: DDIM on the folder's noise schedule and spacing,
    never clipping x0 (also when the folder ships a DDIM that clips, or another sampler)."""
    schedule = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
    for source in (PNDMScheduler(**schedule), DDIMScheduler(**schedule, clip_sample=True)):
        ddim = ddim_without_clipping(source)
        assert isinstance(ddim, DDIMScheduler) and ddim.config.clip_sample is False
        assert torch.equal(ddim.alphas_cumprod, source.alphas_cumprod)
        assert ddim.config.steps_offset == 1 and ddim.config.timestep_spacing == source.config.timestep_spacing

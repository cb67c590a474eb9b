"""A tiny, seeded, *real* Stable Diffusion x4 upscaler (``StableDiffusionUpscalePipeline``) for tests and demos.

The classes and the layout are those of ``stabilityai/stable-diffusion-x4-upscaler``: a 7-channel UNet (4 latent +
3 noisy low-resolution RGB channels) with a noise-level class embedding (``num_class_embeds=1000``), cross-attention
only in the three lower-resolution down blocks' mirror (``only_cross_attention=[True, True, True, False]``) and linear
projections; a 3-level VAE (downsampling factor 4, 4 latent channels, ``scaling_factor=0.08333``); a CLIP text
encoder; DDIM with v-prediction and the upscaler's scaled-linear schedule (1e-4 .. 0.02) as ``scheduler`` and DDPM
with the same betas as ``low_res_scheduler``; ``max_noise_level=350``. Random weights, tiny widths; no download.

``sd_x4_upscaler_unet`` / ``sd_x4_upscaler_vae`` build the same classes at the real widths (random weights) for
benchmarks.
"""

from __future__ import annotations

from pathlib import Path

from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline, UNet2DConditionModel

from asuka.models.seeding import seeded
from asuka.models.tiny import cached_pipeline_dir, tiny_text_encoder, tiny_tokenizer

UPSCALER_SCALING_FACTOR = 0.08333
UPSCALER_MAX_NOISE_LEVEL = 350
TINY_UPSCALER_CROSS_ATTENTION_DIM = 32
# x4-upscaler's scheduler config: scaled_linear betas 1e-4 .. 0.02 over 1000 steps.
UPSCALER_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear")

_DOWN = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
_UP = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")


def _unet(widths: tuple[int, ...], groups: int, head_dim: int, cross_attention_dim: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=128,
        in_channels=7,
        out_channels=4,
        down_block_types=_DOWN,
        up_block_types=_UP,
        block_out_channels=widths,
        layers_per_block=2,
        norm_num_groups=groups,
        attention_head_dim=head_dim,
        cross_attention_dim=cross_attention_dim,
        num_class_embeds=1000,
        only_cross_attention=[True, True, True, False],
        use_linear_projection=True,
    )


def _vae(widths: tuple[int, ...], groups: int) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=widths,
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=groups,
        scaling_factor=UPSCALER_SCALING_FACTOR,
    )


def tiny_upscaler_unet(seed: int = 0, cross_attention_dim: int = TINY_UPSCALER_CROSS_ATTENTION_DIM) -> UNet2DConditionModel:
    """The x4 upscaler's UNet layout at widths (16, 16, 32, 32) (head dim 8)."""
    with seeded(seed):
        return _unet((16, 16, 32, 32), 8, 8, cross_attention_dim).eval()


def tiny_upscaler_vae(seed: int = 0) -> AutoencoderKL:
    """The x4 upscaler's VAE layout (3 levels, factor 4, scaling 0.08333) at widths (8, 16, 32)."""
    with seeded(seed):
        return _vae((8, 16, 32), 4).eval()


def sd_x4_upscaler_unet(seed: int = 0, cross_attention_dim: int = 1024) -> UNet2DConditionModel:
    """The x4 upscaler's UNet at its real widths (256, 512, 512, 1024), random weights, for benchmarks."""
    with seeded(seed):
        return _unet((256, 512, 512, 1024), 32, 8, cross_attention_dim).eval()


def sd_x4_upscaler_vae(seed: int = 0) -> AutoencoderKL:
    """The x4 upscaler's VAE at its real widths (128, 256, 512), random weights, for benchmarks."""
    with seeded(seed):
        return _vae((128, 256, 512), 32).eval()


def upscaler_scheduler() -> DDIMScheduler:
    """The x4 upscaler's sampling scheduler: DDIM, v-prediction, scaled-linear 1e-4 .. 0.02."""
    return DDIMScheduler(**UPSCALER_SCHEDULE, prediction_type="v_prediction", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def upscaler_low_res_scheduler() -> DDPMScheduler:
    """The x4 upscaler's low-resolution noise-augmentation scheduler (DDPM, same betas)."""
    return DDPMScheduler(**UPSCALER_SCHEDULE)


def tiny_upscaler_pipeline(seed: int = 0) -> StableDiffusionUpscalePipeline:
    """A complete tiny ``StableDiffusionUpscalePipeline`` (in memory)."""
    tokenizer = tiny_tokenizer()
    return StableDiffusionUpscalePipeline(
        vae=tiny_upscaler_vae(seed),
        text_encoder=tiny_text_encoder(TINY_UPSCALER_CROSS_ATTENTION_DIM, vocab_size=len(tokenizer), seed=seed),
        tokenizer=tokenizer,
        unet=tiny_upscaler_unet(seed),
        low_res_scheduler=upscaler_low_res_scheduler(),
        scheduler=upscaler_scheduler(),
        max_noise_level=UPSCALER_MAX_NOISE_LEVEL,
    )


def save_tiny_upscaler(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny ``StableDiffusionUpscalePipeline`` folder (safetensors) that ``from_pretrained`` loads."""
    path = Path(path)
    tiny_upscaler_pipeline(seed).save_pretrained(path, safe_serialization=True)
    return path


def default_tiny_upscaler_dir() -> Path:
    """The tiny upscaler folder used by demos, written once to the cache folder under ``tiny-sd-x4-upscaler``."""
    return cached_pipeline_dir("tiny-sd-x4-upscaler", save_tiny_upscaler)

"""HD-Painter's inpainting-specialised x4 super-resolution (paper §3.5, Eq. 10; official ``src/methods/sr.py`` and
``hd_inpaint.py::get_inpainting_sr_function``) on the components of diffusers' ``StableDiffusionUpscalePipeline``.

The x4 upscaler runs from noise, conditioned on the (noise-augmented) low-resolution inpainted image; after each
step the predicted clean latent is blended with the encoding of the original high-resolution image outside the
(soft) mask, and the deterministic DDIM step uses the epsilon derived from the model's v-prediction *before* the
blend. The decoded result is Poisson-blended into the original. Works after any inpainting method: it only needs
the low-resolution result, the original image, the mask and a prompt.

Official settings (defaults here): 20 trailing DDIM steps (999, 949, ..., 49), CFG 7.5, noise level 20, prompt
``"{prompt}, high resolution professional photo"`` with an empty negative prompt, output long side 2048 (also when
the input is smaller), original padded (reflect) to a multiple of 256, blend mask = the 2048-scale mask dilated by an
L1 diamond of radius 19, bicubic-resized to the latent grid and Gaussian-blurred (kernel 19, sigma 3.2), Poisson
blending with a 48-px box dilation. Ours differs on purpose in: fp32 latents and blending around a UNet in any dtype
(the official code runs bf16 under autocast), batches with per-sample prompts and masks, torch's antialiased bicubic
for PIL's, and an output size option (``output_long_side``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, DiffusionPipeline, ImagePipelineOutput
from diffusers import StableDiffusionUpscalePipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor
from torchvision.transforms.functional import gaussian_blur
from transformers import CLIPTextModel, CLIPTokenizer

from asuka.errors import InputError
from asuka.pipelines._common import load_image, per_image, prepare_inputs
from asuka.tensors import resize_image, to_numpy_uint8
from asuka.pipelines._sampling import check_callback_inputs
from asuka.pipelines.hd_painter.blend import poisson_blend
from asuka.pipelines.hd_painter.preprocess import dilate, pad_bottom_right, working_size

SR_OUTPUT_LONG_SIDE = 2048
SR_PAD_MULTIPLE = 256           # the high-resolution canvas; the low-resolution one is a quarter of it
SR_STEPS = 20
SR_GUIDANCE = 7.5
SR_NOISE_LEVEL = 20
SR_PROMPT_SUFFIX = "high resolution professional photo"
SR_MASK_DILATION = 19
SR_MASK_BLUR = 19               # torchvision's default sigma for kernel 19: 0.3 * ((19 - 1) / 2 - 1) + 0.8 = 3.2


# ------------------------------------------------------------------------------------------------ pure math
def v_to_eps_x0(v: torch.Tensor, sample: torch.Tensor, alpha_prod_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """v-prediction -> ``(eps, x0)``: ``eps = sqrt(ab) v + sqrt(1-ab) z``, ``x0 = sqrt(ab) z - sqrt(1-ab) v``."""
    a, b = alpha_prod_t ** 0.5, (1 - alpha_prod_t) ** 0.5
    return a * v + b * sample, a * sample - b * v


def blend_x0(x0: torch.Tensor, known: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Paper Eq. 10 with a soft mask: ``m * x0 + (1 - m) * Z0`` (``known`` = ``Z0``, the original's latent)."""
    return mask * x0 + (1 - mask) * known


def deterministic_step(x0: torch.Tensor, eps: torch.Tensor, alpha_prod_t_prev: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM (eta = 0): ``sqrt(ab_prev) x0 + sqrt(1 - ab_prev) eps``."""
    return alpha_prod_t_prev ** 0.5 * x0 + (1 - alpha_prod_t_prev) ** 0.5 * eps


def soft_blend_mask(mask_hr: torch.Tensor, size: tuple[int, int], dilation: int = SR_MASK_DILATION,
                    blur: int = SR_MASK_BLUR) -> torch.Tensor:
    """The SR blend mask at latent ``size`` from the padded high-resolution mask (B,1,H,W) in {0,1}: dilated by an
    L1 diamond of radius ``dilation``, bicubic-resized (antialiased), Gaussian-blurred with kernel ``blur`` (sigma
    ``0.3 * ((blur - 1) / 2 - 1) + 0.8``, reflect padding), clamped to [0, 1]."""
    m = dilate(mask_hr.float(), dilation)
    m = F.interpolate(m, size=size, mode="bicubic", antialias=True, align_corners=False)
    if blur > 1:
        m = gaussian_blur(m, [blur, blur])
    return m.clamp(0, 1)


def sr_sizes(height: int, width: int, long_side: int = SR_OUTPUT_LONG_SIDE,
             multiple: int = SR_PAD_MULTIPLE) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(output size, padded canvas size)`` of the high-resolution stage for an input of ``height x width``."""
    h, w = working_size(height, width, long_side)
    return (h, w), (h + (-h) % multiple, w + (-w) % multiple)


def _low_res_canvas(low_res: torch.Tensor, hr_size: tuple[int, int], canvas: tuple[int, int]) -> torch.Tensor:
    """The low-resolution input on the latent canvas: used as is when within 1 px of a quarter of the output size
    (the official code pads the 512-scale result directly), resized otherwise; reflect-padded to ``canvas``."""
    target = (hr_size[0] // 4, hr_size[1] // 4)
    h, w = low_res.shape[-2:]
    if abs(h - target[0]) > 1 or abs(w - target[1]) > 1 or h > canvas[0] or w > canvas[1]:
        low_res = resize_image(low_res, target)
    pad = (0, canvas[1] - low_res.shape[-1], 0, canvas[0] - low_res.shape[-2])
    mode = "reflect" if pad[1] < low_res.shape[-1] and pad[3] < low_res.shape[-2] else "replicate"
    return F.pad(low_res, pad, mode=mode)


def _prompts(prompt: str | list[str], batch: int, suffix: str) -> list[str]:
    prompts = per_image(prompt, batch, "prompt")
    if not suffix:
        return prompts
    return [f"{p}, {suffix}" if p else suffix for p in prompts]


# ------------------------------------------------------------------------------------------------ pipeline
class InpaintSRPipeline(DiffusionPipeline):
    """HD-Painter's inpainting-specialised x4 super-resolution on ``StableDiffusionUpscalePipeline`` components.

    ``InpaintSRPipeline.from_pretrained(folder)`` loads any x4-upscaler folder (e.g. a local copy of
    ``stabilityai/stable-diffusion-x4-upscaler``); ``from_upscaler(pipe)`` wraps a loaded upscaler.
    ``pipe(image, mask_image, low_res, prompt)`` returns the original image with the hole taken from the
    super-resolved low-resolution result, long side ``output_long_side`` (2048).
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["safety_checker", "feature_extractor", "watermarker"]
    _callback_tensor_inputs = ["latents", "x0"]

    encode_prompt = StableDiffusionUpscalePipeline.encode_prompt

    def __init__(self, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                 unet: UNet2DConditionModel, low_res_scheduler: DDPMScheduler, scheduler: DDIMScheduler,
                 safety_checker: Any = None, feature_extractor: Any = None, watermarker: Any = None,
                 max_noise_level: int = 350):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                              low_res_scheduler=low_res_scheduler, scheduler=scheduler, safety_checker=None,
                              feature_extractor=None, watermarker=None)
        self.register_to_config(max_noise_level=max_noise_level)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @classmethod
    def from_upscaler(cls, pipe: StableDiffusionUpscalePipeline) -> "InpaintSRPipeline":
        """Wrap the components of a loaded ``StableDiffusionUpscalePipeline`` (shared, not copied)."""
        return cls(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
                   low_res_scheduler=pipe.low_res_scheduler, scheduler=pipe.scheduler,
                   max_noise_level=pipe.config.max_noise_level)

    def sampling_scheduler(self) -> DDIMScheduler:
        """The official sampler: the folder's DDIM schedule with trailing timesteps and ``set_alpha_to_one`` (the
        last step returns its x0), v-prediction, no clipping."""
        return DDIMScheduler.from_config(self.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True,
                                         clip_sample=False, thresholding=False, prediction_type="v_prediction")

    @torch.no_grad()
    def __call__(
        self,
        image: Any,
        mask_image: Any,
        low_res: Any,
        prompt: str | list[str] = "",
        num_inference_steps: int = SR_STEPS,
        guidance_scale: float = SR_GUIDANCE,
        noise_level: int = SR_NOISE_LEVEL,
        prompt_suffix: str = SR_PROMPT_SUFFIX,
        negative_prompt: str | list[str] = "",
        output_long_side: int = SR_OUTPUT_LONG_SIDE,
        pad_multiple: int = SR_PAD_MULTIPLE,
        blend: bool = True,
        poisson: bool = True,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | tuple[str, ...] = ("latents",),
    ) -> ImagePipelineOutput | tuple:
        """Super-resolve ``low_res`` (the inpainted image at about a quarter of the output size) into ``image``.

        Args:
            image, mask_image: the original image(s) and mask(s), any form ``asuka.pipelines.common.prepare_inputs``
                takes (white / 1 = hole).
            low_res: the inpainted low-resolution result(s): path, PIL, numpy or a (B,3,h,w) tensor in [-1, 1]; used
                as is when it is a quarter of the output size (the official 512 -> 2048 case), resized otherwise.
            prompt: one prompt or one per image; ``prompt_suffix`` is appended (official: ", high resolution
                professional photo"); ``negative_prompt`` defaults to "" (official).
            num_inference_steps: trailing DDIM steps (official 20: 999, 949, ..., 49).
            guidance_scale: CFG scale (official 7.5; <= 1 runs without the unconditional pass).
            noise_level: noise augmentation of the low-resolution input (official 20; at most max_noise_level).
            output_long_side: long side of the output (official 2048, also when the input is smaller).
            pad_multiple: the output is reflect-padded to this multiple while sampling (official 256; any multiple
                of 32 for the x4 upscaler).
            blend: blend the predicted x0 with the original's latent outside the soft mask at every step (paper
                Eq. 10); ``False`` is the official ``--sr-method baseline`` (vanilla x4 upscaling).
            poisson: Poisson-blend the result into the original (official); ``False`` returns the raw decode.
            generator, latents: randomness (a list gives one generator per image) / the initial latent.
            output_type: "pil", "np" or "pt" ([0, 1] like diffusers).
        """
        if output_type not in ("pil", "np", "pt"):
            raise InputError(f"{output_type!r} is not one of 'pil', 'np', 'pt'", "output_type")
        if num_inference_steps < 1:
            raise InputError(f"must be >= 1, got {num_inference_steps}", "num_inference_steps")
        if not 0 <= noise_level <= self.config.max_noise_level:
            raise InputError(f"{noise_level} is outside [0, {self.config.max_noise_level}] (the upscaler's "
                             "max_noise_level); the official value is 20", "noise_level")
        if output_long_side < 32:
            raise InputError(f"{output_long_side} is too small; pass at least 32 (default 2048)", "output_long_side")
        unit = self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
        if pad_multiple < unit or pad_multiple % unit:
            raise InputError(f"{pad_multiple} is not a multiple of {unit} (VAE factor x UNet downsampling); "
                             "default 256", "pad_multiple")
        names = check_callback_inputs(callback_on_step_end_tensor_inputs, self._callback_tensor_inputs)
        image, mask = prepare_inputs(image, mask_image)
        batch = image.shape[0]
        low = load_image(low_res, name="low_res")
        if low.shape[0] == 1 and batch > 1:
            low = low.expand(batch, -1, -1, -1)
        if low.shape[0] != batch:
            raise InputError(f"batch {low.shape[0]} differs from the image batch {batch}; pass one low-resolution "
                             "result per image", "low_res")
        device = self._execution_device
        dtype = self.unet.dtype

        hr_size, canvas = sr_sizes(*image.shape[-2:], output_long_side, pad_multiple)
        hr_image = resize_image(image, hr_size)
        hr_mask = F.interpolate(mask, size=hr_size, mode="bicubic", antialias=True, align_corners=False).gt(0.5)
        hr_mask = hr_mask.float()
        latent_size = (canvas[0] // self.vae_scale_factor, canvas[1] // self.vae_scale_factor)
        low_canvas = _low_res_canvas(low, hr_size, latent_size).to(device, dtype)

        # text: [negative, positive] like diffusers
        do_cfg = guidance_scale > 1
        prompts = _prompts(prompt, batch, prompt_suffix)
        negatives = per_image(negative_prompt, batch, "negative_prompt")
        prompt_embeds, negative_embeds = self.encode_prompt(prompts, device, 1, do_cfg, negatives)
        text = torch.cat([negative_embeds, prompt_embeds]) if do_cfg else prompt_embeds

        # noise augmentation of the low-resolution input, then the initial latent (diffusers' order of draws)
        levels = torch.full((batch,), noise_level, dtype=torch.long, device=device)
        noise = randn_tensor(low_canvas.shape, generator=generator, device=device, dtype=dtype)
        low_noisy = self.low_res_scheduler.add_noise(low_canvas, noise, levels)
        if latents is None:
            latents = randn_tensor((batch, self.vae.config.latent_channels, *latent_size), generator=generator,
                                   device=device, dtype=torch.float32)
        latents = latents.to(device, torch.float32)
        if do_cfg:
            low_noisy, levels = torch.cat([low_noisy] * 2), torch.cat([levels] * 2)

        blend_mask = known = None
        if blend:
            hr_canvas, _ = pad_bottom_right(hr_image, pad_multiple, mode="reflect")
            mask_canvas = F.pad(hr_mask, (0, canvas[1] - hr_size[1], 0, canvas[0] - hr_size[0]))
            blend_mask = soft_blend_mask(mask_canvas, latent_size).to(device)
            posterior = self.vae.encode(hr_canvas.to(device, self.vae.dtype)).latent_dist
            known = posterior.mean.float() * self.vae.config.scaling_factor

        scheduler = self.sampling_scheduler()
        scheduler.set_timesteps(num_inference_steps, device=device)
        alphas_cumprod = scheduler.alphas_cumprod.to(device)
        step = scheduler.config.num_train_timesteps // num_inference_steps
        x0 = latents
        self._num_timesteps = len(scheduler.timesteps)
        with self.progress_bar(total=len(scheduler.timesteps)) as bar:
            for i, t in enumerate(scheduler.timesteps):
                model_in = torch.cat([latents] * 2) if do_cfg else latents
                model_in = torch.cat([model_in.to(dtype), low_noisy], dim=1)
                v = self.unet(model_in, t, encoder_hidden_states=text, class_labels=levels, return_dict=False)[0]
                v = v.float()
                if do_cfg:
                    v_uncond, v_text = v.chunk(2)
                    v = v_uncond + guidance_scale * (v_text - v_uncond)
                eps, x0 = v_to_eps_x0(v, latents, alphas_cumprod[t])
                if blend:
                    x0 = blend_x0(x0, known, blend_mask)
                t_prev = int(t) - step
                alpha_prev = alphas_cumprod[t_prev] if t_prev >= 0 else scheduler.final_alpha_cumprod.to(device)
                latents = deterministic_step(x0, eps, alpha_prev)
                if callback_on_step_end is not None:
                    tensors = {"latents": latents, "x0": x0}
                    out = callback_on_step_end(self, i, t, {k: tensors[k] for k in names})
                    latents = out.pop("latents", latents)
                bar.update()

        decoded = self.vae.decode((x0 / self.vae.config.scaling_factor).to(self.vae.dtype), return_dict=False)[0]
        decoded = decoded.float().clamp(-1, 1)[..., :hr_size[0], :hr_size[1]]
        if poisson:
            decoded = self._poisson(decoded, hr_image, hr_mask)
        self.maybe_free_model_hooks()
        result = self.image_processor.postprocess(decoded, output_type=output_type, do_denormalize=[True] * batch)
        return ImagePipelineOutput(images=result) if return_dict else (result,)

    @staticmethod
    def _poisson(decoded: torch.Tensor, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Poisson-blend each decoded sample into the resized original (uint8, on the CPU: OpenCV)."""
        fakes, origs = to_numpy_uint8(decoded), to_numpy_uint8(image)
        holes = (mask[:, 0] > 0.5).cpu().numpy()
        out = np.stack([poisson_blend(o, f, m) for o, f, m in zip(origs, fakes, holes)])
        return torch.from_numpy(out).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(decoded.device)


# ------------------------------------------------------------------------------------------------ after any method
def load_sr(folder: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
            field: str = "sr") -> InpaintSRPipeline:
    """Load an x4-upscaler folder or hub id (``StableDiffusionUpscalePipeline`` layout, e.g. a local copy of
    ``stabilityai/stable-diffusion-x4-upscaler``) as :class:`InpaintSRPipeline`; one-line errors name ``field``."""
    from asuka.pipelines._registry import load_pipeline

    try:
        pipe = load_pipeline(InpaintSRPipeline, folder, dtype)
    except InputError as err:
        raise InputError(err.message, field) from None
    except (ValueError, OSError, KeyError, TypeError) as err:
        raise InputError(f"cannot load {str(folder)!r} as an x4 upscaler: {' '.join(str(err).split())}", field) from err
    if pipe.unet.config.in_channels != 7:
        raise InputError(f"{str(folder)!r} holds a UNet with {pipe.unet.config.in_channels} input channels; the x4 "
                         "upscaler's has 7 (4 latent + 3 low-resolution RGB)", field)
    return pipe.to(device)


def super_resolve(pipe: InpaintSRPipeline | Callable[[], InpaintSRPipeline], result: torch.Tensor,
                  image: torch.Tensor, mask: torch.Tensor, prompts: list[str] | None = None, *, seed: int = 0,
                  progress_bar: bool = False, **options: Any) -> torch.Tensor:
    """HD-Painter's SR stage after any inpainting method: ``result`` (B,3,h,w) in [-1,1] (the method's output),
    ``image`` / ``mask`` the originals -> (B,3,H',W') in [-1,1], long side ``output_long_side`` (2048).

    ``pipe`` may be a callable that loads the pipeline: it is called only when some item has a hole (items without
    one are the original, bicubic-resized, which is what the Poisson blend returns for them). Each item's generator
    is seeded with ``seed`` (the inpainting step's seed rule). ``options`` go to :class:`InpaintSRPipeline`.
    """
    batch = image.shape[0]
    long_side = options.get("output_long_side", SR_OUTPUT_LONG_SIDE)
    hr_size, _ = sr_sizes(*image.shape[-2:], long_side)
    out = resize_image(image.float(), hr_size)
    holes = (mask.flatten(1) >= 0.5).any(dim=1).tolist()
    todo = [i for i in range(batch) if holes[i]]
    if not todo:
        return out
    sr = pipe() if callable(pipe) and not isinstance(pipe, InpaintSRPipeline) else pipe
    sr.set_progress_bar_config(disable=not progress_bar)
    texts = list(prompts) if prompts else [""] * batch
    generators = [torch.Generator().manual_seed(seed) for _ in todo]
    upscaled = sr(image[todo], mask[todo], result[todo], prompt=[texts[i] for i in todo], generator=generators,
                  output_type="pt", **options).images
    out[todo] = upscaled.to(out.device, torch.float32) * 2 - 1
    return out

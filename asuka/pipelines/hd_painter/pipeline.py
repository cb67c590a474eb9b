"""``HDPainterPipeline``: PAIntA + RASG on any 9-channel Stable Diffusion inpainting model (paper §3; official
``hd_inpaint.py``, ``src/methods/rasg.py``), a diffusers ``DiffusionPipeline``.

Stages (official defaults): resize so the long side is ``working_long_side`` (512; bicubic, aspect kept), mask
bicubic-resized, any coverage, dilated by ``mask_dilation`` (1) px with the 4-neighbourhood; pad bottom/right to a
multiple of 64 (black image, known mask); text condition ``[negative_prompt, f"{prompt}, {positive_prompt}"]`` with
the official prompt pair; DDIM with 50 trailing steps (999 ... 19), CFG 7.5; PAIntA on the self-attention at latent/2
and latent/4 while t > 500; RASG with eta 0.1 and the official sigma at every step (final sigma 0); decode of the
last step's x0 through any VAE (an ``AsymmetricAutoencoderKL`` such as asuka's ``HarmonizingDecoderKL`` receives the
image and the mask); crop; optional paste-back (off by default, as the official code).

With ``painta=False`` and ``rasg=False`` the loop is diffusers' ``StableDiffusionInpaintPipeline`` loop with that DDIM
configuration, bit for bit, given the same conditioning tensors and initial latent.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable

import torch
from diffusers import AsymmetricAutoencoderKL, AutoencoderKL, DDIMScheduler, DiffusionPipeline, ImagePipelineOutput
from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import StableDiffusionMixin
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer

from asuka.errors import InputError
from asuka.models import decoder as _decoder  # noqa: F401  (from_pretrained resolves a saved HarmonizingDecoderKL)
from asuka.pipelines._common import per_image, prepare_inputs
from asuka.pipelines._sampling import (AlphaBar, Step, check_callback_inputs, decode, denoise, finish, frozen,
                                       guide, latent_gradient, previous_timestep, unet_input)
from asuka.pipelines.hd_painter import rasg as rasg_math
from asuka.pipelines.hd_painter.controls import HDPainterControls
from asuka.pipelines.hd_painter.defaults import NEGATIVE_PROMPT, POSITIVE_PROMPT
from asuka.pipelines.hd_painter.preprocess import (dilate, latent_mask, pad_bottom_right, resize_mask_bicubic,
                                                   token_weights, working_size)
from asuka.tensors import resize_image

WORKING_LONG_SIDE = 512
PAD_MULTIPLE = 64


def _outside_inference_mode(fn: Callable) -> Callable:
    """Run ``fn`` with inference mode off: RASG differentiates through the UNet, which tensors made in inference mode
    cannot join, so a call under ``torch.inference_mode()`` still works (gradients stay off through ``no_grad``)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.inference_mode(False):
            return fn(*args, **kwargs)

    return wrapper


class SmallMaskWarning(UserWarning):
    """The mask vanishes at PAIntA's / RASG's latent/4 grid (holes thinner than about 32 px at the working size)."""


class HDPainterPipeline(DiffusionPipeline, StableDiffusionMixin):
    """HD-Painter's low-resolution stage on any SD inpainting model (SD-1.5/2 inpainting, DreamShaper-8-inpainting).

    ``HDPainterPipeline.from_pretrained(folder_or_hub_id)`` loads a ``StableDiffusionInpaintPipeline`` folder (pass
    ``vae=`` to swap the decoder, e.g. a ``HarmonizingDecoderKL``); ``save_pretrained`` writes a folder that loads
    back. The loaded ``scheduler`` supplies the training noise schedule; sampling always uses DDIM with trailing
    timesteps, ``set_alpha_to_one`` and no clipping (the official sampler).
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["safety_checker", "feature_extractor"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "mask", "masked_image_latents"]

    encode_prompt = StableDiffusionInpaintPipeline.encode_prompt

    def __init__(self, vae: AutoencoderKL | AsymmetricAutoencoderKL, text_encoder: CLIPTextModel,
                 tokenizer: CLIPTokenizer, unet: UNet2DConditionModel, scheduler: Any, safety_checker: Any = None,
                 feature_extractor: Any = None, requires_safety_checker: bool = False):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                              safety_checker=None, feature_extractor=None)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    # ------------------------------------------------------------------ pieces
    def sampling_scheduler(self) -> DDIMScheduler:
        """The official sampler on the loaded noise schedule: DDIM, trailing timesteps (999, 979, ... for 50 steps),
        ``set_alpha_to_one`` (the last step returns its x0), no clipping or thresholding."""
        return DDIMScheduler.from_config(self.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True,
                                         clip_sample=False, thresholding=False)

    def prompt_tokens(self, prompts: list[str], full_prompts: list[str]) -> torch.Tensor:
        """PAIntA's / RASG's token weights (B, 77): the words of each prompt + the EOT of its full prompt."""
        def ids(texts: list[str]) -> torch.Tensor:
            return self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt").input_ids
        return token_weights(ids(prompts), ids(full_prompts), self.tokenizer.eos_token_id)

    def prepare_image_and_mask(self, image: torch.Tensor, mask: torch.Tensor, long_side: int, dilation: int,
                               ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Official pre-processing: resize (long side), mask any-coverage + dilation, pad to 64 (black / known).
        Returns the padded image (B,3,Hp,Wp) in [-1,1], the padded mask (B,1,Hp,Wp) and the unpadded size."""
        size = working_size(*image.shape[-2:], long_side)
        image = resize_image(image, size)
        mask = dilate(resize_mask_bicubic(mask, size), dilation)
        image, size = pad_bottom_right(image, PAD_MULTIPLE, value=-1.0)
        mask, _ = pad_bottom_right(mask, PAD_MULTIPLE, value=0.0)
        return image, mask, size

    # ------------------------------------------------------------------ call
    @_outside_inference_mode
    @torch.no_grad()
    def __call__(
        self,
        image: Any,
        mask_image: Any,
        prompt: str | list[str] = "",
        negative_prompt: str | list[str] = NEGATIVE_PROMPT,
        positive_prompt: str = POSITIVE_PROMPT,
        painta: bool = True,
        rasg: bool = True,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        eta: float = 0.1,
        sigma_mode: str = "official",
        painta_smoothing: bool = True,
        rasg_low_memory: bool = True,
        working_long_side: int = WORKING_LONG_SIDE,
        mask_dilation: int = 1,
        paste_back: bool = False,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | tuple[str, ...] = ("latents",),
    ) -> ImagePipelineOutput | tuple:
        """Inpaint ``image`` where ``mask_image`` is white / 1 so that the hole shows ``prompt``.

        Args:
            image, mask_image: one image or a list / batch (path, PIL, numpy, tensor in [-1, 1]); one mask for all
                or one per image (white / 1 = hole).
            prompt: one prompt or one per image (what to put in the hole).
            negative_prompt, positive_prompt: the official pair (``hd_inpaint.py``); the text condition is
                ``[negative_prompt, f"{prompt}, {positive_prompt}"]``; pass "" to switch either off (the official
                evaluation script uses neither).
            painta, rasg: the two methods, independent switches (both off = the base inpainting model).
            num_inference_steps, guidance_scale: DDIM steps (trailing) and CFG scale (official 50 / 7.5).
            eta, sigma_mode: RASG's eta (official 0.1; the evaluation script uses 0.25) and its sigma formula:
                "official" (per-step alphas, as the released code) or "paper" (DDIM's cumulative-alpha sigma).
            painta_smoothing: the official 3x3 Gaussian smoothing of PAIntA's c (not in the paper).
            rasg_low_memory: with RASG, run the conditional half with the autograd graph and the unconditional half
                as a separate pass without one (on by default: about half the activation memory and less backward
                work); off = one CFG batch with a graph, as the official code. Equal up to float batching effects.
            working_long_side: long side of the working resolution (official 512; a multiple of 64).
            mask_dilation: pixels of 4-neighbourhood dilation of the working-size mask (official 1).
            paste_back: copy the known pixels of the (resized) input into the output (the official code does not).
            generator, latents: randomness (a list: one generator per image) / the initial latent (B,4,Hp/8,Wp/8).
            prompt_embeds, negative_prompt_embeds: precomputed text conditions (then ``prompt`` only selects PAIntA's
                and RASG's tokens).
            output_type: "pil", "np", "pt" ([0, 1]) or "latent".
            callback_on_step_end: diffusers' ``f(pipe, step, t, tensors) -> dict`` after each step.

        Returns ``ImagePipelineOutput`` with images at the working size (aspect kept, padding cropped).
        """
        names = check_callback_inputs(callback_on_step_end_tensor_inputs, self._callback_tensor_inputs)
        self._check_options(output_type, num_inference_steps, guidance_scale, eta, sigma_mode, working_long_side,
                            mask_dilation)
        image, mask = prepare_inputs(image, mask_image)
        batch = image.shape[0]
        prompts = per_image(prompt, batch, "prompt")
        negatives = per_image(negative_prompt, batch, "negative_prompt")
        full_prompts = [f"{p}, {positive_prompt}" if positive_prompt else p for p in prompts]
        device = self._execution_device
        dtype = self.unet.dtype
        cfg = guidance_scale > 1

        image, mask, size = self.prepare_image_and_mask(image, mask, working_long_side, mask_dilation)
        image, mask = image.to(device), mask.to(device)
        height, width = image.shape[-2:]
        latent_size = (height // self.vae_scale_factor, width // self.vae_scale_factor)

        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            full_prompts, device, 1, cfg, negatives, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds)
        text = torch.cat([negative_prompt_embeds, prompt_embeds]) if cfg else prompt_embeds
        weights = self.prompt_tokens(prompts, full_prompts).to(device)

        latents = _initial_latents(latents, (batch, 4, *latent_size), generator, device, dtype)
        mask_latent = latent_mask(mask, latent_size).to(dtype)
        masked = image * (mask < 0.5)
        masked_latents = self.vae.encode(masked.to(self.vae.dtype)).latent_dist.mean * self.vae.config.scaling_factor
        masked_latents = masked_latents.to(dtype)
        if cfg:
            mask_latent, masked_latents = torch.cat([mask_latent] * 2), torch.cat([masked_latents] * 2)
        tensors = {"prompt_embeds": text, "mask": mask_latent, "masked_image_latents": masked_latents}

        sampler = self.sampling_scheduler()
        sampler.set_timesteps(num_inference_steps, device=device)
        timesteps = sampler.timesteps
        steps = [int(t) for t in sampler.timesteps.cpu()]
        controls = HDPainterControls(self.unet, mask, weights, use_painta=painta, use_rasg=rasg,
                                     smooth=painta_smoothing)
        if painta or rasg:
            _warn_small_mask(controls, latent_size)
        loop = _Loop(self, sampler, controls, steps, guidance_scale, cfg, rasg, rasg_low_memory,
                     eta, sigma_mode, latent_size)

        self._num_timesteps = len(timesteps)
        with frozen(self.unet), controls:
            latents = denoise(self, latents, timesteps, loop.noise, tensors=tensors, update=loop.update,
                              callback_on_step_end=callback_on_step_end, callback_on_step_end_tensor_inputs=names)

        if output_type == "latent":
            result = latents
        else:
            decoded = decode(self.vae, latents.to(self.vae.dtype), image=image.to(self.vae.dtype),
                             mask=mask.to(self.vae.dtype), generator=generator).float()
            result = finish(self, decoded, image=image.float(), mask=mask, paste_back=paste_back,
                            output_type=output_type, pad=(0, width - size[1], 0, height - size[0]))
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=result) if return_dict else (result,)

    def _check_options(self, output_type, steps, guidance_scale, eta, sigma_mode, long_side, dilation) -> None:
        if output_type not in ("pil", "np", "pt", "latent"):
            raise InputError(f"{output_type!r} is not one of 'pil', 'np', 'pt', 'latent'", "output_type")
        if steps < 1:
            raise InputError(f"must be >= 1, got {steps}", "num_inference_steps")
        if guidance_scale < 0:
            raise InputError(f"must be >= 0, got {guidance_scale}", "guidance_scale")
        if eta < 0:
            raise InputError(f"must be >= 0, got {eta}", "eta")
        if sigma_mode not in rasg_math.SIGMA_MODES:
            raise InputError(f"{sigma_mode!r} is not 'official' or 'paper'", "sigma_mode")
        if long_side < PAD_MULTIPLE or long_side % PAD_MULTIPLE:
            raise InputError(f"{long_side} is not a positive multiple of {PAD_MULTIPLE} (default 512)",
                             "working_long_side")
        if dilation < 0:
            raise InputError(f"must be >= 0, got {dilation}", "mask_dilation")
        if self.unet.config.in_channels != 9:
            raise InputError(f"in_channels={self.unet.config.in_channels}; HD-Painter needs a 9-channel SD "
                             "inpainting UNet (latent + mask + masked-image latent)", "unet")
        if getattr(self.scheduler.config, "prediction_type", "epsilon") != "epsilon":
            raise InputError(f"prediction_type {self.scheduler.config.prediction_type!r}: HD-Painter's sampler needs "
                             "an epsilon-prediction inpainting model", "scheduler")


class _Loop:
    """The noise / update hooks of :func:`asuka.pipelines._sampling.denoise` for one call."""

    def __init__(self, pipe: HDPainterPipeline, sampler: DDIMScheduler, controls: HDPainterControls, steps: list[int],
                 guidance_scale: float, cfg: bool, rasg: bool, low_memory: bool, eta: float, sigma_mode: str,
                 latent_size: tuple[int, int]):
        self.pipe, self.sampler, self.controls, self.steps = pipe, sampler, controls, steps
        self.guidance_scale, self.cfg, self.rasg, self.low_memory = guidance_scale, cfg, rasg, low_memory
        self.latent_size = latent_size
        self.alpha_bar = AlphaBar(sampler, pipe._execution_device)
        step_ratio = sampler.config.num_train_timesteps // sampler.num_inference_steps
        self.sigmas = [rasg_math.sigma(sampler.alphas, sampler.alphas_cumprod, t, t - step_ratio, eta, sigma_mode)
                       for t in steps]
        self.gradient: torch.Tensor | None = None

    def _model(self, latents, t, tensors, cfg: bool, half: slice | None = None) -> torch.Tensor:
        """The UNet's noise prediction (guided when ``cfg``); ``half`` selects one CFG half of the conditioning."""
        extra = (tensors["mask"], tensors["masked_image_latents"])
        text = tensors["prompt_embeds"]
        if half is not None:
            extra, text = tuple(x[half] for x in extra), text[half]
        model_input = unet_input(self.sampler, latents, t, cfg=cfg, extra_channels=extra)
        noise_pred = self.pipe.unet(model_input, t, encoder_hidden_states=text, return_dict=False)[0]
        return guide(noise_pred, self.guidance_scale) if cfg else noise_pred

    def noise(self, step: Step, latents: torch.Tensor, tensors: dict) -> torch.Tensor:
        state = self.controls.state
        state.timestep, state.step, state.phase, state.cfg = self.steps[step.index], step.index, "main", self.cfg
        t = step.timestep
        if not self.rasg:
            return self._model(latents, t, tensors, self.cfg)
        store, painta = self.controls.store, self.controls.painta
        batch = latents.shape[0]
        split = self.cfg and self.low_memory
        cond = slice(batch, 2 * batch) if split else None
        out: dict[str, torch.Tensor] = {}

        def loss_of(z: torch.Tensor) -> torch.Tensor:
            store.clear()
            if split:
                state.cfg = False
                if painta is not None:
                    painta.mode = "store"
            out["eps"] = self._model(z, t, tensors, self.cfg and not split, cond)
            return self.controls.rasg_loss(self.latent_size)

        try:
            grad, _ = latent_gradient(loss_of, latents)
            eps = out["eps"].detach()
            if split:                                     # the unconditional half without a graph, PAIntA's c kept
                state.phase = "uncond"
                if painta is not None:
                    painta.mode = "reuse"
                eps_uncond = self._model(latents, t, tensors, False, slice(0, batch))
                eps = guide(torch.cat([eps_uncond, eps]), self.guidance_scale)
        finally:
            store.clear()
            if painta is not None:
                painta.mode = "batch"
                painta.clear()
        self.gradient = -grad                             # descent on the BCE (official sign)
        return eps

    def update(self, step: Step, eps: torch.Tensor, latents: torch.Tensor, tensors: dict) -> torch.Tensor:
        if not self.rasg:
            return self.sampler.step(eps, step.timestep, latents, return_dict=False)[0]
        t = step.timestep
        sigma_t = self.sigmas[step.index]
        noise = rasg_math.standardise(self.gradient.float()).to(latents.dtype)
        self.gradient = None
        prev, _ = rasg_math.ddim_step(latents, eps, self.alpha_bar(t), self.alpha_bar(previous_timestep(self.sampler, t)),
                                      sigma_t, noise)
        return prev


def _initial_latents(latents, shape, generator, device, dtype) -> torch.Tensor:
    if latents is None:
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    if tuple(latents.shape) != tuple(shape):
        raise InputError(f"shape {tuple(latents.shape)} differs from {tuple(shape)} (batch, 4, padded working "
                         "size / 8)", "latents")
    return latents.to(device, dtype)


def _warn_small_mask(controls: HDPainterControls, latent_size: tuple[int, int]) -> None:
    """One host sync before the loop: warn when a sample's hole vanishes at the latent/4 grid."""
    grid = ((latent_size[0] + 3) // 4, (latent_size[1] + 3) // 4)
    empty = controls.masks.at(grid).amax(dim=1) < 0.5
    if bool(empty.any()):
        warnings.warn(f"the mask of sample(s) {empty.nonzero().flatten().tolist()} vanishes at the latent/4 grid "
                      f"{grid[0]}x{grid[1]} (holes thinner than ~32 px at the working size): PAIntA does nothing and "
                      "RASG pushes towards an empty mask there; enlarge the mask or raise working_long_side",
                      SmallMaskWarning, stacklevel=5)   # the caller of HDPainterPipeline.__call__ (2 decorators)

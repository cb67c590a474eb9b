"""``HarmonPaintPipeline``: HarmonPaint (arXiv:2507.16732) on any 9-channel Stable Diffusion inpainting model.

Per step ``i`` at timestep ``t`` (paper §IV, Fig. 4; the loop is :func:`asuka.pipelines._sampling.denoise`):

1. structure phase (``t >= division_eta * T``): SAMS on self-attention layers 2-6, and, before the model call,
   ``steer_iterations`` gradient steps ``z <- z - a_i grad_z L_s`` of the attention steer loss (Eqs. 8-9) from a
   conditional-branch pass whose cross-attention maps at latent/4 and latent/2 are read with autograd;
2. style phase (``t < division_eta * T``): MAKVS on self-attention layers 8-15;
3. the classifier-free-guided noise prediction and the scheduler step, exactly as diffusers'
   ``StableDiffusionInpaintPipeline`` does them.

With ``use_sams=use_steer=use_makvs=False`` no control is installed and the output equals diffusers' pipeline bit
for bit.

Cost. The steer pass is an extra U-Net pass and none of it is reused for ε: the paper extracts the maps with "a
denoising process" at each timestep (§IV-A) and the loss "refines the noise map" (Appendix B), i.e. the latent is
updated *before* the step's noise prediction, as in the Attend-and-Excite / Predicated-Diffusion code the loss comes
from (gradient pass at ``z_t``, update, then the CFG pass at the updated ``z_t``). Every activation depends on the
latent the update changes (only the prompt's cross-attention keys and values do not, a negligible share). What the
pass does need is cut to the minimum: the conditional half only (batch 1, not the CFG batch); the U-Net stops right
after the last cross-attention layer the loss reads (``up_blocks.2`` at latent/2; the later layers cannot change the
loss), so neither the rest of the forward pass nor its backward pass runs; the backward pass computes no parameter
gradients (the U-Net is frozen) and reaches the latent only; SAMS and MAKVS run on SDPA (no N x N map); the phase and
step sizes are host numbers planned before the loop (no host sync per step).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from diffusers import StableDiffusionInpaintPipeline
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint import retrieve_timesteps

from asuka.attention import AttentionController, TokenMasks
from asuka.errors import InputError
from asuka.pipelines._sampling import (Step, cfg_noise, check_callback_inputs, decode, denoise, finish, frozen,
                                       latent_gradient, unet_input)
from asuka.pipelines.harmonpaint.config import HarmonPaintConfig
from asuka.pipelines.harmonpaint.controls import MAIN, MAKVS, SAMS, STEER, maps_by_grid, steer_store
from asuka.pipelines.harmonpaint.diagnostics import DiagnosticsRecorder
from asuka.pipelines.harmonpaint.masks import resize_mask_to_grid
from asuka.pipelines.harmonpaint.schedule import plan_steps
from asuka.pipelines.harmonpaint.steer import prompt_token_mask, steer_loss, steer_step_sizes


class _StopForward(Exception):
    """Raised after the last layer a pass needs (caught by :func:`forward_until`)."""


def forward_until(module: torch.nn.Module, last: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
    """Run ``module(*args, **kwargs)`` only up to the end of submodule ``last`` (its output is discarded)."""

    def stop(*_):
        raise _StopForward

    handle = last.register_forward_hook(stop)
    try:
        module(*args, **kwargs)
    except _StopForward:
        pass
    finally:
        handle.remove()


def _no_grad_outside_inference_mode(method: Callable) -> Callable:
    """``torch.no_grad`` with ``torch.inference_mode`` switched off: the steer loss differentiates through the U-Net
    with respect to the latent, which tensors made in inference mode cannot join."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any):
        with torch.inference_mode(False), torch.no_grad():
            return method(*args, **kwargs)

    return wrapper


class HarmonPaintPipeline(StableDiffusionInpaintPipeline):
    """HarmonPaint: SAMS + attention steer loss (structure phase) and MAKVS (style phase) on an SD inpainting UNet.

    Load it like diffusers' pipeline (``HarmonPaintPipeline.from_pretrained(folder_or_hub_id)``, ``vae=`` any
    ``AutoencoderKL`` or ``AsymmetricAutoencoderKL`` such as asuka's ``HarmonizingDecoderKL``) and call it like
    ``StableDiffusionInpaintPipeline`` (the paper: 50 DDIM steps, guidance 7.5) with HarmonPaint's options as keywords
    (:class:`~asuka.pipelines.harmonpaint.config.HarmonPaintConfig`), plus ``paste_back`` (copy the known pixels
    of the input into the output; off, as in the paper).
    """

    _callback_tensor_inputs = ["latents", "prompt_embeds", "mask", "masked_image_latents"]

    @_no_grad_outside_inference_mode
    def __call__(self, prompt: str | list[str] | None = None, image: Any = None, mask_image: Any = None,
                 height: int | None = None, width: int | None = None, strength: float = 1.0,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5,
                 negative_prompt: str | list[str] | None = None, num_images_per_prompt: int = 1, eta: float = 0.0,
                 generator: torch.Generator | list[torch.Generator] | None = None, latents: torch.Tensor | None = None,
                 prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                 output_type: str = "pil", return_dict: bool = True, paste_back: bool = False,
                 callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | None = None,
                 callback_on_step_end_tensor_inputs: list[str] | tuple[str, ...] = ("latents",),
                 **options: Any):
        config = HarmonPaintConfig.from_options(**options)
        check_callback_inputs(callback_on_step_end_tensor_inputs, self._callback_tensor_inputs)
        if self.unet.config.in_channels != 9:
            raise InputError(f"HarmonPaint needs a 9-channel SD inpainting UNet, got in_channels="
                             f"{self.unet.config.in_channels}", "model")
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        try:
            self.check_inputs(prompt, image, mask_image, height, width, strength, None, output_type, negative_prompt,
                              prompt_embeds, negative_prompt_embeds, None, None, callback_on_step_end_tensor_inputs,
                              None)
        except ValueError as err:
            raise InputError(" ".join(str(err).split())) from err
        self._guidance_scale = guidance_scale
        self._interrupt = False
        cfg = self.do_classifier_free_guidance
        device = self._execution_device

        cond_embeds, negative = self.encode_prompt(prompt, device, num_images_per_prompt, cfg, negative_prompt,
                                                   prompt_embeds=prompt_embeds,
                                                   negative_prompt_embeds=negative_prompt_embeds)
        embeds = torch.cat([negative, cond_embeds]) if cfg else cond_embeds
        total = cond_embeds.shape[0]

        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device)
        timesteps, num_inference_steps = self.get_timesteps(num_inference_steps, strength, device)
        if num_inference_steps < 1:
            raise InputError(f"strength={strength} leaves no denoising step; raise strength or num_inference_steps",
                             "strength")
        init_image = self.image_processor.preprocess(image, height=height, width=width).to(dtype=torch.float32)
        latents = self.prepare_latents(total, self.vae.config.latent_channels, height, width, embeds.dtype, device,
                                       generator, latents, image=init_image, timestep=timesteps[:1].repeat(total),
                                       is_strength_max=strength == 1.0, return_noise=True,
                                       return_image_latents=False)[0]
        mask_condition = self.mask_processor.preprocess(mask_image, height=height, width=width)
        mask, masked_image_latents = self.prepare_mask_latents(
            mask_condition, init_image * (mask_condition < 0.5), total, height, width, embeds.dtype, device,
            generator, cfg)
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
        self._num_timesteps = len(timesteps)

        timestep_values = timesteps.tolist()  # host copies, read once: the phase follows the timestep value
        plans = plan_steps(timestep_values, eta=config.division_eta,
                           num_train_timesteps=self.scheduler.config.num_train_timesteps, use_sams=config.use_sams,
                           use_steer=config.use_steer and config.steer_step_size > 0, use_makvs=config.use_makvs,
                           sams_all_steps=config.sams_all_steps, makvs_all_steps=config.makvs_all_steps)
        latent_size = tuple(latents.shape[-2:])
        token_masks = TokenMasks(mask[-total:], resize=lambda m, size: resize_mask_to_grid(m, size,
                                                                                           config.mask_resize))
        controller = AttentionController(self.unet)
        self_layers = controller.layers.select(kind="self")
        if any(p.sams for p in plans):
            controller.add(SAMS(token_masks, plans, config.tau, config.sams_variant, config.steer_with_sams),
                           self_layers.select(indices=config.sams_layers))
        if config.lam != 0 and any(p.makvs for p in plans):
            layers = self_layers.select(indices=config.makvs_layers)
            controller.add(MAKVS(token_masks, plans, config.lam, config.makvs_mode, layers, latent_size), layers)
        lengths = self._prompt_lengths(prompt, num_images_per_prompt)
        num_tokens = cond_embeds.shape[1]
        steer = None
        if any(p.steer for p in plans):
            steer = self._steer_hook(controller, config, plans, token_masks, lengths, num_tokens, timestep_values,
                                     latent_size, total, cfg)
        recorder = None
        if config.diagnostics_dir is not None:
            shown = prompt_token_mask(lengths or [0] * total, num_tokens, config.steer_token_indices)
            recorder = DiagnosticsRecorder(controller, config, plans, token_masks, latent_size,
                                           [row.nonzero().flatten().tolist() for row in shown])

        def noise(step: Step, z: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
            _set_state(controller, step.index, timestep_values, MAIN, cfg)
            x = unet_input(self.scheduler, z, step.timestep, cfg=cfg,
                           extra_channels=(tensors["mask"], tensors["masked_image_latents"]))
            eps = cfg_noise(self.unet, x, step.timestep, tensors["prompt_embeds"], guidance_scale, cfg=cfg)
            if recorder is not None:
                recorder.write(step.index, timestep_values[step.index])
            return eps

        with controller, frozen(self.unet):
            latents = denoise(self, latents, timesteps, noise, before=steer, extra_step_kwargs=extra_step_kwargs,
                              tensors={"prompt_embeds": embeds, "mask": mask,
                                       "masked_image_latents": masked_image_latents},
                              callback_on_step_end=callback_on_step_end,
                              callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs)

        if output_type == "latent":
            images = latents
        else:
            decoded = decode(self.vae, latents, image=init_image, mask=mask_condition, generator=generator)
            images = finish(self, decoded, image=init_image, mask=mask_condition, paste_back=paste_back,
                            output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, None
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=None)

    def _prompt_lengths(self, prompt, num_images_per_prompt: int) -> list[int] | None:
        """Each sample's number of real prompt tokens (``<sot>``, ``<eot>`` and padding excluded); None without
        prompt text."""
        if prompt is None:
            return None
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        ids = self.tokenizer(prompts, truncation=True, max_length=self.tokenizer.model_max_length).input_ids
        return [len(i) - 2 for i in ids for _ in range(num_images_per_prompt)]

    def _steer_hook(self, controller, config: HarmonPaintConfig, plans, token_masks: TokenMasks,
                    lengths: list[int] | None, num_tokens: int, timestep_values: list, latent_size, total: int,
                    cfg: bool) -> "SteerHook | None":
        """The steer loss's ``before`` hook, or None when no token is steered (e.g. an empty prompt)."""
        if config.steer_token_indices is None and lengths is None:
            raise InputError("the steer loss needs the prompt text to find its tokens; pass prompt, set "
                             "steer_token_indices, or set use_steer=False", "options.steer_token_indices")
        lengths = lengths or [0] * total
        try:
            weights = prompt_token_mask(lengths, num_tokens, config.steer_token_indices)
        except ValueError as err:
            raise InputError(str(err).removeprefix("steer_token_indices "), "options.steer_token_indices") from err
        if not weights.any():  # host check, once
            return None
        device = self._execution_device
        return SteerHook(self, controller, config, plans, token_masks, weights.to(device),
                         prompt_token_mask(lengths, num_tokens).to(device), timestep_values, latent_size,
                         cond=slice(total, None) if cfg else slice(None))


class SteerHook:
    """The steer loss's latent update (the ``before`` hook of :func:`~asuka.pipelines._sampling.denoise`):
    on structure-phase steps, ``steer_iterations`` times ``z <- z - a_i grad_z L_s``, where ``L_s`` (Eq. 9, summed
    over the samples) comes from a conditional-branch pass stopped after the last cross-attention layer it reads.
    ``cond`` selects the conditional half of the doubled mask, masked-image latents and prompt embeddings."""

    def __init__(self, pipe, controller: AttentionController, config: HarmonPaintConfig, plans, token_masks,
                 weights: torch.Tensor, prompt_tokens: torch.Tensor, timestep_values: list, latent_size, cond: slice):
        self.pipe, self.controller, self.config, self.plans = pipe, controller, config, plans
        self.token_masks, self.weights, self.prompt_tokens = token_masks, weights, prompt_tokens
        self.timestep_values, self.latent_size, self.cond = timestep_values, latent_size, cond
        self.store = steer_store(controller, config.steer_levels)
        layers = controller.layers.select(kind="cross", levels=config.steer_levels)
        self.last = max(layers, key=lambda layer: layer.index).module
        self.alphas = steer_step_sizes(config.steer_step_size, len(plans))

    def loss(self, z: torch.Tensor, t: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """``L_s`` (a scalar, float32) at latent ``z``; the controller must be installed with phase ``steer``."""
        self.store.clear()
        pipe, cond = self.pipe, self.cond
        x = unet_input(pipe.scheduler, z, t, cfg=False,
                       extra_channels=(tensors["mask"][cond], tensors["masked_image_latents"][cond]))
        forward_until(pipe.unet, self.last, x, t, encoder_hidden_states=tensors["prompt_embeds"][cond])
        maps = maps_by_grid(self.store, self.latent_size)
        masks = {grid: self.token_masks.at(grid) for grid in maps}
        return steer_loss(maps, masks, self.weights, normalize=self.config.steer_normalize,
                          prompt_tokens=self.prompt_tokens).sum()

    def __call__(self, step: Step, z: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        if not self.plans[step.index].steer:
            return z
        _set_state(self.controller, step.index, self.timestep_values, STEER, False)
        try:
            for _ in range(self.config.steer_iterations):
                grad, _ = latent_gradient(lambda zz: self.loss(zz, step.timestep, tensors), z)
                z = z - self.alphas[step.index] * grad
        finally:
            self.store.clear()
            self.controller.state.phase = MAIN
        return z


def _set_state(controller: AttentionController, index: int, timestep_values: list, phase: str, cfg: bool) -> None:
    state = controller.state
    state.step, state.timestep, state.phase, state.cfg = index, timestep_values[index], phase, cfg

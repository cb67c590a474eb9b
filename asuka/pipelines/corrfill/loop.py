"""CorrFill's denoising loop on the shared sampler (:func:`asuka.pipelines._sampling.denoise`), the same for every
baseline; only the model input differs (channel order, conditioning).

Per step ``i`` (official ``cg_pipeline.py``; paper Sec. 3.4-3.5):

1. ``i < step_optimize``: the gradient pass -- the UNet on the conditional half only (the unconditional half does not
   influence the conditional attention), masking off, votes kept, target-row probabilities of all self-attention
   layers kept with autograd; ``g = dS/dz_t`` on the target half, normalised by its std.
2. The main pass (``cfg_noise``) with the attention mask while ``i < step_masking``; then rho_adapt.
3. ``scheduler.step``; then ``z_{t-1}[target] -= 0.03 * rho * sigma_t * Str_o * g / std(g)`` (sigma_t: DDIM's eta
   noise std from the scheduler's own tables; 0 without eta, e.g. PNDM, as in the code).

At step 0 the state is reset at the start of each pass (the code's behaviour: only the main pass's votes survive).
Passes after the last step that uses an estimate run the stock processors (SDPA). The extra pass draws no random
numbers, so the eta noise sequence is the baseline's.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Sequence

import torch

from asuka.attention import AttentionController
from asuka.pipelines._sampling import (AlphaBar, cfg_noise, ddim_sigma, denoise, frozen, previous_timestep,
                                       unet_input)
from asuka.pipelines.corrfill import guidance
from asuka.pipelines.corrfill.config import CorrFillConfig
from asuka.pipelines.corrfill.control import GRAD, MAIN, OFF, CorrespondenceMask, CorrFillState, MatchReader


def _autograd_ready(value: Any) -> Any:
    """Inference-mode tensors (a caller under ``torch.inference_mode()``) cloned into normal ones, so the gradient
    pass can record a graph; other values unchanged."""
    if isinstance(value, torch.Tensor):
        return value.clone() if value.is_inference() else value
    if isinstance(value, (list, tuple)):
        return type(value)(_autograd_ready(v) for v in value)
    if isinstance(value, dict):
        return {k: _autograd_ready(v) for k, v in value.items()}
    return value


def _cond_half(value: Any, cfg: bool) -> Any:
    """The conditional half of a CFG-doubled tensor (or of the tensors in a list/dict)."""
    if not cfg:
        return value
    if isinstance(value, torch.Tensor):
        return value[value.shape[0] // 2:]
    if isinstance(value, (list, tuple)):
        return type(value)(_cond_half(v, cfg) for v in value)
    if isinstance(value, dict):
        return {k: _cond_half(v, cfg) for k, v in value.items()}
    return value


@contextmanager
def _checkpointing(unet: Any, on: bool):
    """diffusers' gradient checkpointing on ``unet`` inside the block (when ``on`` and not already on), restored."""
    switch = on and not unet.is_gradient_checkpointing
    if switch:
        unet.enable_gradient_checkpointing()
    try:
        yield
    finally:
        if switch:
            unet.disable_gradient_checkpointing()


def step_sigmas(scheduler: Any, timesteps: torch.Tensor, eta: float, device: torch.device) -> list[torch.Tensor]:
    """sigma_t per step as device scalars (no host sync): DDIM's ``ddim_sigma`` from the scheduler's ᾱ table;
    0 for schedulers whose ``step`` takes no ``eta`` (PNDM...), which makes the latent update vanish as in the code."""
    import inspect

    if "eta" not in inspect.signature(scheduler.step).parameters:
        return [torch.zeros((), device=device)] * len(timesteps)
    alpha_bar = AlphaBar(scheduler, device)
    return [ddim_sigma(alpha_bar(t), alpha_bar(previous_timestep(scheduler, t)), eta) for t in timesteps]


def corrfill_denoise(pipe: Any, latents: torch.Tensor, timesteps: torch.Tensor, *, config: CorrFillConfig,
                     guidance_scale: float, tensors: dict[str, torch.Tensor], channels: Sequence[str],
                     unet_kwargs: dict | None = None, eta: float = 1.0, extra_step_kwargs: dict | None = None,
                     callback_on_step_end: Callable | None = None,
                     callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
                     on_grad_pass: Callable[[int], None] | None = None) -> torch.Tensor:
    """Denoise ``latents`` (``(B, 4, h, 2h)`` stitched) with CorrFill on ``pipe.unet``.

    ``tensors``: ``prompt_embeds`` (the UNet's ``encoder_hidden_states``, CFG-doubled ``[uncond, cond]`` when
    ``guidance_scale > 1``) and the extra input channels named in ``channels`` (in the UNet's order, e.g.
    ``("mask", "masked_image_latents")`` for SD inpainting, reversed for Paint-by-Example), CFG-doubled.
    ``unet_kwargs``: further UNet arguments (CFG-doubled), e.g. IP-Adapter ``added_cond_kwargs``.
    ``on_grad_pass(step)`` is called for every gradient pass (tests count them).
    """
    cfg = guidance_scale > 1
    unet_kwargs = unet_kwargs or {}
    batch, _, side, width = latents.shape
    if width != 2 * side:
        raise ValueError(f"CorrFill needs a stitched latent of width 2 x height, got {side}x{width}")
    with torch.inference_mode(False):  # normal tensors: the gradient pass updates them outside inference mode
        state = CorrFillState(config, batch, side, latents.device, latents.dtype)
    sigmas = step_sigmas(pipe.scheduler, timesteps, eta, latents.device)
    if config.optimize_steps:
        guidance.warn_if_no_update(pipe.scheduler, eta, config.optimize_steps)
    controller = AttentionController(pipe.unet)
    self_layers = controller.layers.select(kind="self")
    controller.add(MatchReader(state), self_layers)
    controller.add(CorrespondenceMask(state), self_layers)
    directions: dict[int, torch.Tensor] = {}
    timestep_values = timesteps.tolist()  # Python values for the controls' gates, read once

    def model_input(z, t, tensors, use_cfg):
        """The UNet input: CFG-doubled (``use_cfg``) or the conditional half (``tensors`` already halved)."""
        return unet_input(pipe.scheduler, z, t, cfg=use_cfg, extra_channels=[tensors[name] for name in channels])

    def gradient_pass(step, latents, tensors) -> torch.Tensor:
        """``g / std(g)`` on the target half, from the cond-only pass with masking off."""
        t = step.timestep
        state.collected = []
        controller.state.cfg = False
        with torch.inference_mode(False), torch.enable_grad():
            hidden = _autograd_ready(_cond_half(tensors["prompt_embeds"], cfg))
            kwargs = _autograd_ready(_cond_half(unet_kwargs, cfg))
            extra = _autograd_ready({name: _cond_half(tensors[name], cfg) for name in channels})
            z = _autograd_ready(latents.detach()).requires_grad_(True)
            pipe.unet(model_input(z, t, extra, False), t, encoder_hidden_states=hidden, return_dict=False, **kwargs)
            loss = state.loss().sum() * config.loss_rescale
            with controller.replaying():  # a UNet with gradient checkpointing re-runs its layers now: no second vote
                (grad,) = torch.autograd.grad(loss, z, allow_unused=True)
        state.collected = []
        grad = torch.zeros_like(latents) if grad is None else grad / config.loss_rescale
        return guidance.normalized_gradient(grad[..., side:])

    def noise(step, latents, tensors):
        i = step.index
        controller.state.step, controller.state.timestep = i, timestep_values[i]
        state.step = i
        if i < config.optimize_steps:
            if i == 0:
                state.reset()
            state.begin_pass(GRAD)
            directions[i] = gradient_pass(step, latents, tensors)
            if on_grad_pass is not None:
                on_grad_pass(i)
        if i == 0:
            state.reset()
        estimating = i < config.estimation_steps
        state.begin_pass(MAIN if estimating else OFF, masking=i < config.masking_steps)
        controller.state.cfg = cfg
        eps = cfg_noise(pipe.unet, model_input(latents, step.timestep, tensors, cfg), step.timestep,
                        tensors["prompt_embeds"], guidance_scale, cfg=cfg, **unet_kwargs)
        if estimating:
            state.update_rho()
        state.begin_pass(OFF)
        return eps

    def after(step, latents, tensors):
        direction = directions.pop(step.index, None)
        if direction is None:
            return latents
        return guidance.latent_update(latents, direction, base_lr=config.base_lr, rho=state.rho,
                                      sigma=sigmas[step.index], strength=config.str_optimize)

    run = dict(tensors=tensors, after=after, extra_step_kwargs=dict(extra_step_kwargs or {}),
               callback_on_step_end=callback_on_step_end,
               callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs)
    if config.estimation_steps == 0:  # nothing to estimate: the stock processors, the base loop
        return denoise(pipe, latents, timesteps, noise, **run)
    # the gradient is taken with respect to the latent only; diffusers checkpoints only while autograd is on, so
    # switching checkpointing on for the whole loop (once) affects the gradient passes alone
    with frozen(pipe.unet), controller, _checkpointing(pipe.unet, config.gradient_checkpointing):
        return denoise(pipe, latents, timesteps, noise, **run)

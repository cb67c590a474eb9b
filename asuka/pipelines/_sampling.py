"""The one denoising-loop shape shared by asuka's diffusion pipelines.

As in k-diffusion, where one sampler contract takes any model, the loop is fixed and a method is what it plugs in:

* ``noise(step, latents, tensors) -> eps`` — the (guided) noise prediction, usually :func:`cfg_noise` on a UNet with
  the method's attention controls installed (required);
* ``before(step, latents, tensors) -> latents`` — a latent update before the model call (PILOT's optimisation and
  blend stage, HarmonPaint's steer-loss step, CorrFill's gradient pass) (optional);
* ``update(step, eps, latents, tensors) -> latents`` — the sampler update; default ``scheduler.step`` (HD-Painter's
  RASG replaces DDIM's noise) (optional);
* ``after(step, latents, tensors) -> latents`` — a correction of the new latent (CorrFill applies its gradient to
  ``z_{t-1}``) (optional).

``tensors`` is a dict of the per-call tensors a method reads inside its hooks (``prompt_embeds``, ``mask``,
``masked_image_latents``, ...). diffusers' ``callback_on_step_end(pipe, i, t, kwargs) -> dict`` sees ``latents`` and
any of these by name and may replace them; the hooks read the replaced values on the next step, exactly as the
locals of a diffusers pipeline loop would be replaced.

Small pure helpers every method needs live here too: the UNet input with CFG doubling and the 9-channel inpainting
concatenation (:func:`unet_input`), classifier-free guidance (:func:`cfg_noise`), the scheduler's ᾱ_t
(:class:`AlphaBar`), the one-step x̂₀ (:func:`predicted_x0`), DDIM's σ_t (:func:`ddim_sigma`), the gradient of a loss
with respect to the latent only (:func:`latent_gradient`) with the weights frozen meanwhile (:func:`frozen`), and decoding through any VAE — an
``AsymmetricAutoencoderKL`` such as asuka's ``HarmonizingDecoderKL`` receives the image and the mask (:func:`decode`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch

from asuka.errors import InputError


@dataclass(frozen=True)
class Step:
    """Where the loop is: ``index`` of ``count`` steps at timestep ``timestep`` (a scalar tensor, as diffusers')."""

    index: int
    timestep: torch.Tensor
    count: int

    @property
    def is_last(self) -> bool:
        return self.index == self.count - 1


Tensors = dict[str, torch.Tensor]
NoiseFn = Callable[[Step, torch.Tensor, Tensors], torch.Tensor]
LatentHook = Callable[[Step, torch.Tensor, Tensors], torch.Tensor]
UpdateFn = Callable[[Step, torch.Tensor, torch.Tensor, Tensors], torch.Tensor]
StepCallback = Callable[[Any, int, torch.Tensor, dict], dict]


def check_callback_inputs(names: Iterable[str], allowed: Iterable[str]) -> tuple[str, ...]:
    """``callback_on_step_end_tensor_inputs`` checked against a pipeline's ``_callback_tensor_inputs``."""
    names, allowed = tuple(names), tuple(allowed)
    bad = [name for name in names if name not in allowed]
    if bad:
        raise InputError(f"{bad} cannot be passed to the callback; choose from {list(allowed)}.",
                         field="callback_on_step_end_tensor_inputs")
    return names


def denoise(pipe: Any, latents: torch.Tensor, timesteps: torch.Tensor, noise: NoiseFn, *,
            tensors: Tensors | None = None, before: LatentHook | None = None, update: UpdateFn | None = None,
            after: LatentHook | None = None, extra_step_kwargs: Mapping[str, Any] | None = None,
            callback_on_step_end: StepCallback | None = None,
            callback_on_step_end_tensor_inputs: Iterable[str] = ("latents",)) -> torch.Tensor:
    """Run ``timesteps`` from ``latents`` and return the final latents (see the module docstring for the hooks).

    ``pipe`` provides ``scheduler`` and diffusers' ``progress_bar``; ``extra_step_kwargs`` go to ``scheduler.step``
    (e.g. ``eta``, ``generator``). ``tensors`` is updated in place by ``callback_on_step_end``.
    """
    tensors = {} if tensors is None else tensors
    step_kwargs = dict(extra_step_kwargs or {})
    names = tuple(callback_on_step_end_tensor_inputs)
    count = len(timesteps)
    with pipe.progress_bar(total=count) as progress_bar:
        for index, t in enumerate(timesteps):
            step = Step(index, t, count)
            if before is not None:
                latents = before(step, latents, tensors)
            eps = noise(step, latents, tensors)
            if update is None:
                latents = pipe.scheduler.step(eps, t, latents, **step_kwargs, return_dict=False)[0]
            else:
                latents = update(step, eps, latents, tensors)
            if after is not None:
                latents = after(step, latents, tensors)
            if callback_on_step_end is not None:
                visible = {"latents": latents, **tensors}
                changed = callback_on_step_end(pipe, index, t, {name: visible[name] for name in names})
                latents = changed.pop("latents", latents)
                tensors.update({name: value for name, value in changed.items() if name in tensors})
            progress_bar.update()
    return latents


# ------------------------------------------------------------------------------------------------ model call
def unet_input(scheduler: Any, latents: torch.Tensor, t: torch.Tensor, *, cfg: bool,
               extra_channels: Iterable[torch.Tensor] = ()) -> torch.Tensor:
    """diffusers' UNet input: the latent doubled for CFG (``[uncond, cond]``), scaled by the scheduler, then
    concatenated on channels with ``extra_channels`` (the inpainting ``mask`` and ``masked_image_latents``, already
    doubled by ``prepare_mask_latents`` under CFG)."""
    x = torch.cat([latents] * 2) if cfg else latents
    x = scheduler.scale_model_input(x, t)
    extra = tuple(extra_channels)
    return torch.cat([x, *extra], dim=1) if extra else x


def guide(noise_pred: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance on a ``[uncond, cond]`` batch, in diffusers' exact operation order."""
    noise_uncond, noise_cond = noise_pred.chunk(2)
    return noise_uncond + guidance_scale * (noise_cond - noise_uncond)


def cfg_noise(unet: Any, model_input: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor,
              guidance_scale: float, *, cfg: bool, **unet_kwargs: Any) -> torch.Tensor:
    """ε from ``unet(model_input, t, encoder_hidden_states, **unet_kwargs)``, guided when ``cfg`` (the batch is then
    ``[uncond, cond]``). Equal to the noise diffusers' SD pipelines compute for the same inputs."""
    noise_pred = unet(model_input, t, encoder_hidden_states=encoder_hidden_states, return_dict=False,
                      **unet_kwargs)[0]
    return guide(noise_pred, guidance_scale) if cfg else noise_pred


# ------------------------------------------------------------------------------------------------ schedule math
class AlphaBar:
    """ᾱ_t lookups on the latents' device: the scheduler's ``alphas_cumprod`` copied there once, in float32, so a
    lookup inside the loop is an on-device index (no host sync, no per-step allocation of the table). A negative
    ``t`` (the step after the last) gives the scheduler's ``final_alpha_cumprod`` when it has one (DDIM's
    ``set_alpha_to_one``), else ᾱ_0, as DDIM's ``step`` does."""

    def __init__(self, scheduler: Any, device: torch.device | str) -> None:
        table = scheduler.alphas_cumprod
        final = torch.as_tensor(getattr(scheduler, "final_alpha_cumprod", table[0]))
        self.table = torch.cat([table.reshape(-1), final.reshape(1)]).to(device=device, dtype=torch.float32)

    def __call__(self, t: torch.Tensor | int) -> torch.Tensor:
        """ᾱ_t as a 0-d tensor (``t`` a scalar tensor or int; negative = after the last step)."""
        t = torch.as_tensor(t, device=self.table.device)
        return self.table[torch.where(t >= 0, t, self.table.numel() - 1)]


def ddim_without_clipping(scheduler: Any) -> Any:
    """diffusers' ``DDIMScheduler`` on ``scheduler``'s noise schedule and timestep spacing, without sample clipping
    (how SD samples with DDIM, and the sampler of the PILOT, HarmonPaint and CorrFill papers' code)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(scheduler.config, clip_sample=False)


def previous_timestep(scheduler: Any, t: torch.Tensor | int) -> torch.Tensor | int:
    """DDIM's previous timestep ``t - num_train_timesteps // num_inference_steps`` (may be negative at the end)."""
    return t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps


def predicted_x0(latents: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """The one-step estimate x̂₀ = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t (ε-prediction)."""
    return (latents - (1 - alpha_bar_t).sqrt() * eps) / alpha_bar_t.sqrt()


def ddim_sigma(alpha_bar_t: torch.Tensor, alpha_bar_prev: torch.Tensor, eta: float) -> torch.Tensor:
    """DDIM's σ_t = η √((1−ᾱ_{t−1})/(1−ᾱ_t)) √(1−ᾱ_t/ᾱ_{t−1}) (Song et al. 2021, Eq. 16)."""
    return eta * ((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)).sqrt()


# ------------------------------------------------------------------------------------------------ gradients
@contextmanager
def frozen(*modules: Any) -> Iterator[None]:
    """``requires_grad_(False)`` on every parameter of ``modules`` (``None`` entries skipped) for the block, each
    flag restored afterwards, so a latent gradient pass builds no weight-gradient graph."""
    params = [p for m in modules if m is not None for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def latent_gradient(loss_of: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(∂loss/∂latents, loss)`` with gradients enabled inside a ``no_grad`` pipeline, taken with respect to the
    latent only: no parameter receives a ``.grad`` and the graph is freed before returning (nothing carries over to
    the next step). ``loss_of(z)`` runs the model on ``z`` (a leaf that requires grad) and returns a scalar loss."""
    with torch.enable_grad():
        z = latents.detach().requires_grad_(True)
        loss = loss_of(z)
        (grad,) = torch.autograd.grad(loss, z)
    return grad, loss.detach()


# ------------------------------------------------------------------------------------------------ decoding
def decode(vae: Any, latents: torch.Tensor, *, image: torch.Tensor | None = None, mask: torch.Tensor | None = None,
           generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
    """Latents -> images in [-1, 1] through any diffusers VAE: ``latents / scaling_factor (+ shift_factor)``; an
    ``AsymmetricAutoencoderKL`` (e.g. asuka's ``HarmonizingDecoderKL``) also gets the full image (B,3,H,W) in
    [-1, 1] and the binary mask (B,1,H,W), 1 = hole, as diffusers' SD-inpainting pipeline hands them over."""
    from diffusers import AsymmetricAutoencoderKL

    z = latents / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    if shift:
        z = z + shift
    condition = {}
    if isinstance(vae, AsymmetricAutoencoderKL):
        if image is None or mask is None:
            raise InputError("an AsymmetricAutoencoderKL decodes with the image and the mask; pass both.",
                             field="vae")
        condition = {"image": image.to(latents.device, latents.dtype), "mask": mask.to(latents.device, latents.dtype)}
    return vae.decode(z, return_dict=False, generator=generator, **condition)[0]


def finish(pipe: Any, decoded: torch.Tensor, *, image: torch.Tensor, mask: torch.Tensor, paste_back: bool,
           output_type: str, pad: tuple[int, int, int, int] = (0, 0, 0, 0), denormalize: bool = True) -> Any:
    """Decoded images in [-1, 1] -> the pipeline's ``output_type``: known pixels of ``image`` pasted back exactly
    (optional; ``mask`` 1 = hole), the padding added for the size multiple cropped, then diffusers' postprocess.
    ``denormalize=False`` keeps ``output_type="pt"`` in [-1, 1] (asuka's tensor convention; CorrFill)."""
    from asuka.tensors import crop_padding
    from asuka.tensors import paste_back as paste_known_pixels

    if paste_back:
        decoded = paste_known_pixels(decoded.float(), image.to(decoded.device), mask.to(decoded.device))
    decoded = crop_padding(decoded, pad)
    return pipe.image_processor.postprocess(decoded, output_type=output_type,
                                            do_denormalize=[denormalize] * decoded.shape[0])


__all__ = ["AlphaBar", "finish", "frozen", "Step", "cfg_noise", "check_callback_inputs", "ddim_sigma", "decode", "denoise", "guide",
           "latent_gradient", "predicted_x0", "previous_timestep", "unet_input"]

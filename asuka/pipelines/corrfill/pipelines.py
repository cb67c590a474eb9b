"""The CorrFill pipeline family: one loop (:func:`~asuka.pipelines.corrfill.loop.corrfill_denoise`) and one
attention control for all four baselines of the paper (Sec. 4.1):

* :class:`CorrFillInpaintPipeline` -- diffusers' ``StableDiffusionInpaintPipeline`` on the stitched reference |
  target: **Side-by-side** (empty prompt), **LeftRefill** (the learned prompt embeddings passed as
  ``prompt_embeds`` / ``negative_prompt_embeds``), **IP-Adapter-Plus** (after ``pipe.load_ip_adapter(...)``; the
  reference is the image prompt); UNet input ``[z, mask, masked latents]``.
* :class:`CorrFillPaintByExamplePipeline` -- diffusers' ``PaintByExamplePipeline`` (reference = example image);
  its mask is inverted (1 = keep) and its UNet input is ``[z, masked latents, mask]``.

Inputs follow asuka's conventions: images ``(B,3,H,W)`` in [-1, 1], masks ``(B,1,H,W)`` with 1 = hole, square
halves; the output is the target half decoded from the stitched ``H x 2W`` result and composited with the original
outside the hole (``M * crop + (1 - M) * target`` for the binary mask, the official evaluation). Any ``AsymmetricAutoencoderKL``
(asuka's ``HarmonizingDecoderKL``) decodes with the stitched image and mask.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from diffusers import PaintByExamplePipeline, StableDiffusionInpaintPipeline

from asuka.pipelines._common import per_image
from asuka.pipelines._sampling import check_callback_inputs, decode, finish
from asuka.pipelines.corrfill.config import CorrFillConfig
from asuka.pipelines.corrfill.loop import corrfill_denoise
from asuka.pipelines.corrfill.stitching import stitch, target_half


@dataclass
class CorrFillOutput:
    """``images``: the composited target halves ``(B,3,H,W)`` in [-1, 1] (latents for ``output_type="latent"``);
    ``stitched``: the decoded stitched results ``(B,3,H,2W)`` (None for latents)."""

    images: torch.Tensor
    stitched: torch.Tensor | None = None


def _composite(pipe: Any, latents: torch.Tensor, stitched_image: torch.Tensor, stitched_mask: torch.Tensor,
               image: torch.Tensor, mask: torch.Tensor, generator) -> CorrFillOutput:
    """Decode the stitched result, crop the target half and paste the target's known pixels back (the shared tail,
    :func:`~asuka.pipelines._sampling.finish`; mask >= 0.5 = hole, as the model's input)."""
    decoded = decode(pipe.vae, latents, image=stitched_image, mask=stitched_mask, generator=generator)
    decoded = decoded.float().clamp(-1, 1)
    images = finish(pipe, target_half(decoded), image=image.float(), mask=mask, paste_back=True, output_type="pt",
                    denormalize=False)
    return CorrFillOutput(images, decoded)


def _reference_pixels(feature_extractor: Any, reference: torch.Tensor) -> torch.Tensor:
    """CLIP pixel values of references in [-1, 1] through the pipeline's own image processor."""
    images = [x for x in ((reference.float() + 1) / 2).clamp(0, 1).cpu()]
    return feature_extractor(images=images, do_rescale=False, return_tensors="pt").pixel_values


def _paint_by_example_inputs(image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' Paint-by-Example ``prepare_mask_and_masked_image``: inverted binary mask (1 = keep), masked image."""
    try:
        from diffusers.pipelines.deprecated.paint_by_example import pipeline_paint_by_example as module
    except ImportError:  # diffusers before Paint-by-Example moved under ``deprecated``
        from diffusers.pipelines.paint_by_example import pipeline_paint_by_example as module
    return module.prepare_mask_and_masked_image(image, mask)


class CorrFillInpaintPipeline(StableDiffusionInpaintPipeline):
    """CorrFill on SD inpainting: Side-by-side, LeftRefill and IP-Adapter-Plus (see the module docstring)."""

    def _ip_adapter_kwargs(self, reference: torch.Tensor, cfg: bool, device, dtype) -> dict:
        """``added_cond_kwargs`` with one reference image per sample, for each loaded IP-Adapter (none loaded: {})."""
        projection = getattr(self.unet, "encoder_hid_proj", None)
        layers = getattr(projection, "image_projection_layers", None)
        if layers is None:
            return {}
        from diffusers.models.embeddings import ImageProjection

        pixels = _reference_pixels(self.feature_extractor, reference)
        embeds = []
        for layer in layers:
            cond, uncond = self.encode_image(pixels, device, 1, not isinstance(layer, ImageProjection))
            both = torch.cat([uncond, cond]) if cfg else cond
            embeds.append(both.unsqueeze(1).to(device=device, dtype=dtype))  # (B', 1 image, ...)
        return {"added_cond_kwargs": {"image_embeds": embeds}}

    @torch.no_grad()
    def __call__(self, reference: torch.Tensor, image: torch.Tensor, mask: torch.Tensor, *,
                 config: CorrFillConfig | None = None, prompt: str | list[str] = "",
                 negative_prompt: str | list[str] | None = None, prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None, num_inference_steps: int = 50,
                 guidance_scale: float = 3.0, eta: float = 1.0,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, output_type: str = "pt",
                 callback_on_step_end: Callable | None = None,
                 callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
                 on_grad_pass: Callable[[int], None] | None = None) -> CorrFillOutput:
        """Fill ``mask`` of ``image`` guided by ``reference`` (same size, one per image).

        Defaults: the Side-by-side settings of the official code (empty prompt, CFG 3, DDIM eta 1; pass the
        scheduler). LeftRefill: ``prompt_embeds`` / ``negative_prompt_embeds`` (1 or B rows) and CFG 2.5.
        IP-Adapter-Plus: load it first (``load_ip_adapter``); prompt ``"best quality, high quality"``, CFG 7.5.
        ``config`` None: :class:`CorrFillConfig` defaults (Side-by-side / RealEstate10K).
        """
        config = config or CorrFillConfig()
        check_callback_inputs(callback_on_step_end_tensor_inputs, self._callback_tensor_inputs)
        device = self._execution_device
        stitched, stitched_mask = stitch(reference, image, mask)
        batch, _, height, width = stitched.shape
        cfg = guidance_scale > 1
        if prompt_embeds is not None:
            prompt = None
            prompt_embeds = prompt_embeds.expand(batch, -1, -1) if prompt_embeds.shape[0] == 1 else prompt_embeds
            if negative_prompt_embeds is not None and negative_prompt_embeds.shape[0] == 1:
                negative_prompt_embeds = negative_prompt_embeds.expand(batch, -1, -1)
        else:
            prompt = per_image(prompt, batch, "prompt")
        if negative_prompt is not None:
            negative_prompt = per_image(negative_prompt, batch, "negative_prompt")
        embeds, negative = self.encode_prompt(prompt, device, 1, cfg, negative_prompt, prompt_embeds=prompt_embeds,
                                              negative_prompt_embeds=negative_prompt_embeds)
        if cfg:
            embeds = torch.cat([negative, embeds])
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        init = self.image_processor.preprocess((stitched + 1) / 2, height=height, width=width).to(torch.float32)
        mask_condition = self.mask_processor.preprocess(stitched_mask, height=height, width=width)
        latents = self.prepare_latents(batch, self.vae.config.latent_channels, height, width, embeds.dtype, device,
                                       generator, latents, image=init, timestep=timesteps[:1].repeat(batch),
                                       is_strength_max=True, return_noise=True, return_image_latents=False)[0]
        mask_latent, masked_latents = self.prepare_mask_latents(
            mask_condition, init * (mask_condition < 0.5), batch, height, width, embeds.dtype, device, generator, cfg)
        latents = corrfill_denoise(
            self, latents, timesteps, config=config, guidance_scale=guidance_scale,
            tensors={"prompt_embeds": embeds, "mask": mask_latent, "masked_image_latents": masked_latents},
            channels=("mask", "masked_image_latents"),
            unet_kwargs=self._ip_adapter_kwargs(reference, cfg, device, embeds.dtype), eta=eta,
            extra_step_kwargs=self.prepare_extra_step_kwargs(generator, eta),
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, on_grad_pass=on_grad_pass)
        if output_type == "latent":
            return CorrFillOutput(latents)
        return _composite(self, latents, init, mask_condition, image, mask, generator)


class CorrFillPaintByExamplePipeline(PaintByExamplePipeline):
    """CorrFill on Paint-by-Example (see the module docstring). Its scheduler is the folder's (PNDM for
    ``Fantasy-Studio/Paint-by-Example``, as the official code); the latent update needs DDIM's eta noise, so with
    PNDM CorrFill's optimisation only adds votes (the code's behaviour) -- set a ``DDIMScheduler`` for the paper's
    description."""

    _callback_tensor_inputs = ["latents", "prompt_embeds", "mask", "masked_image_latents"]

    def __init__(self, vae, image_encoder, unet, scheduler, safety_checker, feature_extractor,
                 requires_safety_checker: bool = False):
        # diffusers marks PaintByExamplePipeline deprecated (DeprecatedPipelineMixin, after 0.33.1) and names the
        # instantiated class in its warning, which would call *this* pipeline deprecated; only that message is dropped.
        log = logging.getLogger("diffusers.pipelines.pipeline_utils")
        name = f"The {type(self).__name__} has been deprecated"

        def keep(record: logging.LogRecord) -> bool:
            return not record.getMessage().startswith(name)

        log.addFilter(keep)
        try:
            super().__init__(vae, image_encoder, unet, scheduler, safety_checker, feature_extractor,
                             requires_safety_checker)
        finally:
            log.removeFilter(keep)

    @torch.no_grad()
    def __call__(self, reference: torch.Tensor, image: torch.Tensor, mask: torch.Tensor, *,
                 config: CorrFillConfig | None = None, num_inference_steps: int = 50, guidance_scale: float = 5.0,
                 eta: float = 1.0, generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, output_type: str = "pt",
                 callback_on_step_end: Callable | None = None,
                 callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
                 on_grad_pass: Callable[[int], None] | None = None) -> CorrFillOutput:
        """Fill ``mask`` of ``image`` with ``reference`` as the example image and the stitched left half.
        Defaults: CFG 5 (official code); ``config`` None: the Paint-by-Example / RealEstate10K preset."""
        from asuka.pipelines.corrfill.config import make_config

        config = config or make_config("paint-by-example")
        check_callback_inputs(callback_on_step_end_tensor_inputs, self._callback_tensor_inputs)
        device = self._execution_device
        stitched, stitched_mask = stitch(reference, image, mask)
        batch, _, height, width = stitched.shape
        cfg = guidance_scale > 1
        keep, masked = _paint_by_example_inputs(stitched.float(), stitched_mask.float())  # 1 = keep
        embeds = self._encode_image(_reference_pixels(self.feature_extractor, reference), device, 1, cfg)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        latents = self.prepare_latents(batch, self.vae.config.latent_channels, height, width, embeds.dtype, device,
                                       generator, latents)
        keep_latent, masked_latents = self.prepare_mask_latents(keep, masked, batch, height, width, embeds.dtype,
                                                                device, generator, cfg)
        latents = corrfill_denoise(
            self, latents, timesteps, config=config, guidance_scale=guidance_scale,
            tensors={"prompt_embeds": embeds, "mask": keep_latent, "masked_image_latents": masked_latents},
            channels=("masked_image_latents", "mask"), eta=eta,
            extra_step_kwargs=self.prepare_extra_step_kwargs(generator, eta),
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, on_grad_pass=on_grad_pass)
        if output_type == "latent":
            return CorrFillOutput(latents)
        return _composite(self, latents, stitched, stitched_mask, image, mask, generator)

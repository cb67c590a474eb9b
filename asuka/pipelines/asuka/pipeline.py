"""ASUKA inference on Stable Diffusion 1.5 inpainting (paper §3, Fig. 3; Yikai-Wang/asuka-misato ``asuka-flux/test_asuka_flux.py``).

Order: MAE prior at 256² (``MAEPrior.prior``) -> ``PriorAligner`` -> condition (B, 256, 768) used as the SD-inpaint
UNet's ``encoder_hidden_states`` with **no classifier-free guidance** (paper §3.2) -> decode, where an
``AsymmetricAutoencoderKL`` (e.g. ASUKA's ``HarmonizingDecoderKL``) receives the full input image and the binary mask
-> paste-back of the known pixels (on by default: the paper's evaluation composites, ``asuka-flux/eval/*.py``; the official inference
scripts do not).

The latent mechanics (initial noise, mask and masked-image latents, scheduler steps, decoding) are diffusers'
``StableDiffusionInpaintPipeline`` methods, borrowed as-is, so with ``paste_back=False`` the output equals diffusers'
pipeline called with ``prompt_embeds=aligner(MAE(image, mask))`` and ``guidance_scale=1`` bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import diffusers
import torch
from diffusers import (
    AsymmetricAutoencoderKL,
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    ImagePipelineOutput,
    StableDiffusionInpaintPipeline,
    UNet2DConditionModel,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import StableDiffusionMixin
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint import retrieve_timesteps
from diffusers.schedulers import KarrasDiffusionSchedulers

# diffusers' from_pretrained resolves a saved component's library (e.g. a HarmonizingDecoderKL vae) only when that
# module is already imported, so the pipeline module imports the decoder module itself.
from asuka.models import decoder as _decoder
from asuka.models.aligner import PriorAligner
from asuka.models.mae import MAEPrior
from asuka.models.seeding import seeded
from asuka.models.tiny import expand_tiny
from asuka.errors import InputError
from asuka.pipelines._common import prepare_inputs
from asuka.pipelines._registry import PipelineRunner, load_pipeline
from asuka.pipelines._sampling import Step, check_callback_inputs, decode, denoise, finish, unet_input
from asuka.weights import load_autoencoder, resolve_pretrained
from asuka.tensors import pad_to_multiple, resize_image, resize_mask

_SD = StableDiffusionInpaintPipeline


class AsukaInpaintPipeline(DiffusionPipeline, StableDiffusionMixin):
    """MAE prior -> aligner -> frozen SD-1.5-inpainting UNet (no CFG) -> (harmonizing) decoder -> paste-back.

    Components: ``vae`` (``AutoencoderKL``, or an ``AsymmetricAutoencoderKL`` such as ``HarmonizingDecoderKL``),
    ``unet`` (9-channel SD inpainting UNet), ``scheduler``, ``mae`` (``MAEPrior``), ``aligner`` (``PriorAligner``).
    ``save_pretrained`` writes a model_index.json naming asuka's classes by module path; load the folder with
    ``AsukaInpaintPipeline.from_pretrained(path)``. ``from_parts`` assembles one from separate exports.
    """

    model_cpu_offload_seq = "mae->aligner->unet->vae"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "mask", "masked_image_latents"]

    # diffusers' own inpainting mechanics, reused verbatim (they only touch vae, scheduler and vae_scale_factor).
    prepare_latents = _SD.prepare_latents
    prepare_mask_latents = _SD.prepare_mask_latents
    _encode_vae_image = _SD._encode_vae_image
    prepare_extra_step_kwargs = _SD.prepare_extra_step_kwargs
    get_timesteps = _SD.get_timesteps

    def __init__(self, vae: AutoencoderKL | AsymmetricAutoencoderKL, unet: UNet2DConditionModel,
                 scheduler: KarrasDiffusionSchedulers, mae: MAEPrior, aligner: PriorAligner):
        super().__init__()
        if mae.feature_dim != aligner.config.in_dim:
            raise ValueError(f"mae gives {mae.feature_dim}-d features but the aligner takes in_dim={aligner.config.in_dim}.")
        if aligner.config.cross_attention_dim != unet.config.cross_attention_dim:
            raise ValueError(f"aligner outputs {aligner.config.cross_attention_dim}-d conditions but the unet's "
                             f"cross_attention_dim is {unet.config.cross_attention_dim}.")
        self.register_modules(vae=vae, unet=unet, scheduler=scheduler, mae=mae, aligner=aligner)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    # ------------------------------------------------------------------ assembly
    @classmethod
    def from_parts(cls, sd_inpaint: str | Path, mae: str | Path, aligner: str | Path, vae: str | Path | None = None,
                   scheduler: Any = None, torch_dtype: torch.dtype | None = None, **load_kwargs) -> "AsukaInpaintPipeline":
        """Assemble from an SD-inpainting folder or hub id (``"tiny"``: the tiny offline demo folder) plus separate
        ``MAEPrior`` / ``PriorAligner`` exports.

        ``vae``: an optional decoder export (a ``HarmonizingDecoderKL`` / ``AsymmetricAutoencoderKL`` / ``AutoencoderKL``
        folder; its config's ``_class_name`` picks the class); default: the SD folder's ``vae``. ``scheduler``: a
        scheduler instance; default: the class and config stored in the SD folder. ``torch_dtype`` applies to the UNet
        and the VAE (e.g. ``torch.bfloat16`` on GPU); the MAE and the aligner are loaded in float32.
        """
        sd_inpaint = expand_tiny(sd_inpaint)
        for name, value, marker in (("sd_inpaint", sd_inpaint, "unet/config.json"), ("mae", mae, "config.json"),
                                    ("aligner", aligner, "config.json"), ("vae", vae, "config.json")):
            if value is not None:
                resolve_pretrained(value, field=name, marker=marker)
        unet = UNet2DConditionModel.from_pretrained(sd_inpaint, subfolder="unet", torch_dtype=torch_dtype, **load_kwargs)
        if vae is None:
            vae_model = AutoencoderKL.from_pretrained(sd_inpaint, subfolder="vae", torch_dtype=torch_dtype, **load_kwargs)
        else:
            vae_model = load_autoencoder(vae, dtype=torch_dtype, field="vae")
        if scheduler is None:
            config = DDIMScheduler.load_config(sd_inpaint, subfolder="scheduler", **load_kwargs)
            scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
        return cls(vae=vae_model, unet=unet, scheduler=scheduler, mae=MAEPrior.from_pretrained(mae),
                   aligner=PriorAligner.from_pretrained(aligner))

    # ------------------------------------------------------------------ stages
    @torch.no_grad()
    def encode_prior(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """C_MAE = aligner(MAE prior of the masked image) at the UNet's dtype: (B, 256, cross_attention_dim).

        ``image`` (B,3,H,W) in [-1,1] and ``mask`` (B,1,H,W), 1 = hole; the MAE resizes to 256² itself.
        """
        device = self._execution_device
        mae_dtype = self.mae.dtype
        features = self.mae.prior(image.to(device, mae_dtype), mask.to(device, mae_dtype), return_image=False).features
        return self.aligner(features).to(dtype=self.unet.dtype)

    # ------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(
        self,
        image: Any,
        mask_image: Any,
        num_inference_steps: int = 50,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        eta: float = 0.0,
        output_type: str = "pil",
        paste_back: bool = True,
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | tuple[str, ...] = ("latents",),
    ) -> ImagePipelineOutput | tuple:
        """Inpaint ``image`` where ``mask_image`` is 1 (white).

        Args:
            image: one image or a list (path, PIL, numpy HWC, or tensor (3,H,W)/(B,3,H,W) in [-1,1]).
            mask_image: one mask (shared by every image) or one per image; white / 1 = hole, threshold 0.5.
            num_inference_steps: scheduler steps (the paper does not name a count; 50 is diffusers' default).
            height, width: working size, multiples of 8; default: the input image's size.
            generator: ``torch.Generator`` or one per image, for the initial noise and the VAE posterior samples.
            latents: optional initial noise (B,4,h/8,w/8).
            prompt_embeds: optional precomputed condition (B,256,768) replacing MAE + aligner.
            eta: DDIM eta (only used by schedulers that accept it).
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            paste_back: copy the known pixels of the (resized) input into the output (off = raw decoder output).
            callback_on_step_end: ``f(pipe, step, t, tensors) -> dict`` after each step; it may replace the tensors it
                returns (names from ``callback_on_step_end_tensor_inputs``, a subset of ``_callback_tensor_inputs``).
        """
        check_callback_inputs(callback_on_step_end_tensor_inputs, self._callback_tensor_inputs)
        if output_type not in ("pil", "np", "pt", "latent"):
            raise InputError(f"output_type={output_type!r}; use 'pil', 'np', 'pt' or 'latent'.")
        if num_inference_steps < 1:
            raise InputError(f"num_inference_steps must be >= 1, got {num_inference_steps}.")
        if self.unet.config.in_channels != 9:
            raise InputError(f"unet must be a 9-channel SD inpainting UNet, got in_channels={self.unet.config.in_channels}.")

        image, mask = prepare_inputs(image, mask_image)
        pad = (0, 0, 0, 0)
        if height is None and width is None:  # work at the input size, padded to a multiple of 8, cropped after
            image, pad = pad_to_multiple(image, self.vae_scale_factor, mode="reflect")
            mask, _ = pad_to_multiple(mask, self.vae_scale_factor, mode="constant")
        height = height or image.shape[-2]
        width = width or image.shape[-1]
        for name, value in (("height", height), ("width", width)):
            if value % self.vae_scale_factor:
                raise InputError(f"{name}={value} is not a multiple of {self.vae_scale_factor}; pass a multiple "
                                 f"or leave height/width unset to work at the (padded) input size.")
        batch_size = image.shape[0]
        device = self._execution_device

        init_image = resize_image(image, (height, width))
        mask_condition = resize_mask(mask, (height, width))
        if prompt_embeds is None:
            prompt_embeds = self.encode_prior(init_image, mask_condition)
        if prompt_embeds.shape[0] != batch_size:
            raise InputError(f"prompt_embeds has batch {prompt_embeds.shape[0]} but there are {batch_size} images.")
        prompt_embeds = prompt_embeds.to(device=device, dtype=self.unet.dtype)

        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device)
        timesteps, num_inference_steps = self.get_timesteps(num_inference_steps, 1.0, device)
        latents = self.prepare_latents(batch_size, self.vae.config.latent_channels, height, width, prompt_embeds.dtype,
                                       device, generator, latents)[0]
        masked_image = init_image * (mask_condition < 0.5)
        mask, masked_image_latents = self.prepare_mask_latents(mask_condition, masked_image, batch_size, height, width,
                                                               prompt_embeds.dtype, device, generator, False)
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        self._num_timesteps = len(timesteps)

        def noise(step: Step, latents: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
            model_input = unet_input(self.scheduler, latents, step.timestep, cfg=False,
                                     extra_channels=(tensors["mask"], tensors["masked_image_latents"]))
            return self.unet(model_input, step.timestep, encoder_hidden_states=tensors["prompt_embeds"],
                             return_dict=False)[0]

        latents = denoise(self, latents, timesteps, noise, extra_step_kwargs=extra_step_kwargs,
                          tensors={"prompt_embeds": prompt_embeds, "mask": mask,
                                   "masked_image_latents": masked_image_latents},
                          callback_on_step_end=callback_on_step_end,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs)

        if output_type == "latent":
            result = latents
        else:
            decoded = decode(self.vae, latents, image=init_image, mask=mask_condition, generator=generator)
            result = finish(self, decoded, image=init_image, mask=mask_condition, paste_back=paste_back,
                            output_type=output_type, pad=pad)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (result,)
        return ImagePipelineOutput(images=result)


# ---------------------------------------------------------------------------------------------- registry
class AsukaRunner(PipelineRunner):
    """``(image [-1,1], mask {0,1}) -> image [-1,1]`` through :class:`AsukaInpaintPipeline` (paste-back is left
    to :func:`asuka.pipelines._common.run_inpainting`)."""

    def __call__(self, image: torch.Tensor, mask: torch.Tensor, *, generator=None, progress_bar: bool = True,
                 num_inference_steps: int = 50) -> torch.Tensor:
        return self._run(image, progress_bar, image=image, mask_image=mask, num_inference_steps=num_inference_steps,
                         generator=generator, paste_back=False)


def default_tiny_asuka_dir() -> Path:
    """A tiny random ASUKA pipeline folder for the offline CLI demo (written once to ``$ASUKA_CACHE`` or
    ``~/.cache/asuka``, under ``tiny-asuka``): the tiny SD-inpaint layout with 768-d cross-attention, a tiny MAE
    and a 2-block aligner. Random weights: it shows the plumbing, not ASUKA's quality."""
    from asuka.models.tiny import cached_pipeline_dir, tiny_sd_components

    def write(folder: Path) -> None:
        parts = tiny_sd_components(cross_attention_dim=768)
        mae = MAEPrior.tiny()
        with seeded(0):
            aligner = PriorAligner(in_dim=mae.feature_dim, cross_attention_dim=768, num_blocks=2)
        AsukaInpaintPipeline(vae=parts["vae"], unet=parts["unet"], scheduler=parts["scheduler"], mae=mae,
                             aligner=aligner).save_pretrained(folder)

    return cached_pipeline_dir("tiny-asuka", write)


def build_asuka(model: str | Path, *, device: torch.device, dtype: torch.dtype, vae: Any = None) -> AsukaRunner:
    """Load a saved :class:`AsukaInpaintPipeline` folder (``save_pretrained``) or hub id; UNet/VAE in ``dtype``;
    ``vae`` replaces the saved decoder."""
    pipe = load_pipeline(AsukaInpaintPipeline, model, dtype, vae=vae)
    return AsukaRunner(pipe.to(device))

"""ASUKA on FLUX.1-Fill-dev: the released ASUKA weights (``yikaiwang/ASUKA-FLUX.1-Fill``) on diffusers' FLUX stack.

Order (ASUKA-FLUX ``test_asuka_flux.py::log_validation``, ``demo_gradio.py::get_flux_asuka_res``):

1. MAE prior at 256² (:meth:`MAEPrior.prior`: ``cv2.INTER_AREA`` resize, ImageNet normalisation, nearest mask, hole
   zeroed) -> features (B, 256, 512); all-hole samples give zero features (official NaN -> 0).
2. :class:`FluxPriorAligner`: the T5 head -> ``prompt_embeds`` (B, 256, 4096) with zero ``text_ids``, and the token
   mean of the CLIP head -> ``pooled_prompt_embeds`` (B, 768); both interpolated toward the empty-prompt embeddings,
   ``c_null + w·(c - c_null)`` with ``condition_weight`` w = 0.5 (official default; README "CFG scale of 0.5").
3. FLUX.1-Fill sampling: diffusers' ``FluxFillPipeline`` mechanics (packed 2×2 latents; condition = packed latent
   of ``image·(1-mask)`` + 8×8 pixel-unshuffled, packed mask = 384 input channels), flow-matching Euler with FLUX's
   resolution-dependent shift (``get_schedule(50, seq_len, shift=True)``), 50 steps, distilled guidance 30.
4. Decoding ``latents / scaling_factor + shift_factor`` by ASUKA's harmonizing decoder
   (:class:`~asuka.models.decoder.HarmonizingDecoderKL`) with the full-resolution image and mask
   (``AutoEncoder.my_decode(z, orig_img, mask)``); a plain ``AutoencoderKL`` decodes unconditioned.
5. Paste-back of the known pixels: on by default (the official *evaluation* composites, spec of ASUKA §5.12); the
   official inference scripts return the raw decoder output (``paste_back=False``).

With ``prompt_embeds`` / ``pooled_prompt_embeds`` given and the same ``latents``, the packed latents equal diffusers'
``FluxFillPipeline`` bit for bit (it borrows diffusers' methods as-is). Differences from the official code: the
condition interpolation runs in float32 (official: bf16); the official script's full-image
``ae.encode`` of the init image (unused at strength 1) is skipped; all-hole features are zeroed per sample, not per
batch.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from diffusers import (
    AsymmetricAutoencoderKL,
    AutoencoderKL,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxFillPipeline,
    FluxTransformer2DModel,
    ImagePipelineOutput,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.flux.pipeline_flux_fill import calculate_shift, retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor

# diffusers resolves saved asuka components only when their modules are imported (see asuka.pipelines.asuka).
from asuka.models import decoder as _decoder  # noqa: F401
from asuka.models.flux_aligner import OFFICIAL_CONDITION_WEIGHT, FluxPriorAligner
from asuka.models.mae import MAEPrior
from asuka.errors import InputError
from asuka.pipelines._common import prepare_inputs
from asuka.pipelines._registry import PipelineRunner, load_pipeline
from asuka.pipelines._sampling import decode as decode_latents
from asuka.pipelines._sampling import finish
from asuka.tensors import pad_to_multiple, resize_image, resize_mask

_FILL = FluxFillPipeline


class AsukaFluxFillPipeline(DiffusionPipeline):
    """MAE prior -> FLUX alignment heads -> FLUX.1-Fill transformer -> harmonizing decoder -> paste-back.

    Components: ``vae`` (the FLUX ``AutoencoderKL`` or a 16-channel ``HarmonizingDecoderKL`` with ``shift_factor``),
    ``transformer`` (``FluxTransformer2DModel`` with 384 input channels), ``scheduler``
    (``FlowMatchEulerDiscreteScheduler``), ``mae`` (:class:`MAEPrior`), ``aligner`` (:class:`FluxPriorAligner`).
    ``save_pretrained`` / ``from_pretrained`` round-trip; :meth:`from_parts` assembles one from a FLUX.1-Fill folder and
    the ASUKA parts (exports or the release files); :func:`asuka.models.convert.convert_asuka_flux_release` writes one.
    ``enable_model_cpu_offload()`` moves one component at a time to the GPU (order ``mae -> aligner -> transformer ->
    vae``).
    """

    model_cpu_offload_seq = "mae->aligner->transformer->vae"
    _callback_tensor_inputs = ["latents", "prompt_embeds"]

    # diffusers' FLUX.1-Fill mechanics, reused verbatim.
    prepare_mask_latents = _FILL.prepare_mask_latents
    get_timesteps = _FILL.get_timesteps
    _pack_latents = staticmethod(_FILL._pack_latents)
    _unpack_latents = staticmethod(_FILL._unpack_latents)
    _prepare_latent_image_ids = staticmethod(_FILL._prepare_latent_image_ids)

    def __init__(self, vae: AutoencoderKL | AsymmetricAutoencoderKL, transformer: FluxTransformer2DModel,
                 scheduler: FlowMatchEulerDiscreteScheduler, mae: MAEPrior, aligner: FluxPriorAligner):
        super().__init__()
        if mae.feature_dim != aligner.config.in_dim:
            raise ValueError(f"mae gives {mae.feature_dim}-d features but the aligner takes in_dim={aligner.config.in_dim}")
        cfg = transformer.config
        if aligner.config.text_dim != cfg.joint_attention_dim or aligner.config.pooled_dim != cfg.pooled_projection_dim:
            raise ValueError(f"aligner gives {aligner.config.text_dim}-d text / {aligner.config.pooled_dim}-d pooled "
                             f"conditions but the transformer takes {cfg.joint_attention_dim} / "
                             f"{cfg.pooled_projection_dim}")
        if vae.config.get("shift_factor") is None:
            raise ValueError("vae has no shift_factor; FLUX latents need it (FLUX AE: 0.1159). Convert the decoder "
                             "with asuka.models.convert.load_harmonizing_decoder_checkpoint or set shift_factor")
        self.register_modules(vae=vae, transformer=transformer, scheduler=scheduler, mae=mae, aligner=aligner)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_channels = self.vae.config.latent_channels
        packed = self.latent_channels * 4 * 2 + 4 * self.vae_scale_factor ** 2
        if cfg.in_channels != packed:
            raise ValueError(f"transformer in_channels={cfg.in_channels} is not a FLUX.1-Fill transformer for this vae "
                             f"(expected {packed}: packed latents, masked-image latents and the 8x8 mask)")
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * 2,
                                                 vae_latent_channels=self.latent_channels)

    # ------------------------------------------------------------------ assembly
    @classmethod
    def from_parts(cls, flux_fill: str | Path, *, mae: str | Path, aligner: str | Path | None = None,
                   aligner_clip: str | Path | None = None, aligner_t5: str | Path | None = None,
                   decoder: str | Path | None = None,
                   null_embeddings: tuple[str | Path, str | Path] | None = None, mae_options: dict | None = None,
                   torch_dtype: torch.dtype | None = None, **load_kwargs) -> "AsukaFluxFillPipeline":
        """Assemble from a diffusers FLUX.1-Fill folder or hub id and the ASUKA parts.

        Each part is a ``save_pretrained`` folder or, for the release, its file:
        ``mae`` (folder or ``mae_300.pth``), either ``aligner`` (a :class:`FluxPriorAligner` folder, nulls included)
        or ``aligner_clip`` + ``aligner_t5`` (``PriorAligner`` folders or ``asuka_alignment_{clip,t5}.pt``),
        ``decoder`` (a ``HarmonizingDecoderKL`` folder or ``asuka_decoder.ckpt``; default: the FLUX folder's vae),
        ``null_embeddings`` = ``(vec.pt, txt_256.pt)`` for separate heads (default: the FLUX folder's CLIP and T5
        encoders on ``""`` with 256 tokens, loaded once and released). ``mae_options``: ``MAEPrior`` config entries
        for a release ``.pth`` (e.g. ``{"mask_concat": True}``, or heads of non-ViT-B sizes). ``torch_dtype`` applies
        to every component; default: bfloat16 when CUDA is available (the official ``weight_dtype``), else float32.
        """
        from asuka.models import convert

        if torch_dtype is None:
            torch_dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        if (aligner is None) == (aligner_clip is None or aligner_t5 is None):
            raise ValueError("pass either aligner= (a FluxPriorAligner folder) or both aligner_clip= and aligner_t5=")
        if aligner is not None and null_embeddings is not None:
            raise ValueError("a FluxPriorAligner folder carries its null embeddings; null_embeddings= goes with "
                             "aligner_clip= / aligner_t5=")
        transformer = FluxTransformer2DModel.from_pretrained(flux_fill, subfolder="transformer",
                                                             torch_dtype=torch_dtype, **load_kwargs)
        flux_vae = AutoencoderKL.from_pretrained(flux_fill, subfolder="vae", torch_dtype=torch_dtype, **load_kwargs)
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(flux_fill, subfolder="scheduler", **load_kwargs)
        if Path(mae).is_file():
            mae_model = convert.mae_prior_from_mae_far(mae, **(mae_options or {}))
        else:
            mae_model = MAEPrior.from_pretrained(mae, **(mae_options or {}))
        if aligner is not None:
            aligner_model = FluxPriorAligner.from_pretrained(aligner)
        else:
            heads = [convert.aligner_from_asuka_flux(p) if Path(p).is_file() else _prior_aligner(p)
                     for p in (aligner_clip, aligner_t5)]
            if null_embeddings is not None:
                nulls = [convert.read_tensor(p) for p in null_embeddings]
            else:
                nulls = empty_prompt_embeddings(flux_fill, mae_model.num_tokens, torch_dtype=torch_dtype,
                                                **load_kwargs)
            aligner_model = FluxPriorAligner.from_heads(heads[0], heads[1], null_pooled=nulls[0], null_text=nulls[1])
        if decoder is None:
            vae = flux_vae
        elif Path(decoder).is_file():
            vae = convert.load_harmonizing_decoder_checkpoint(decoder, vae=flux_vae.float()).to(torch_dtype)
        else:
            vae = _decoder.HarmonizingDecoderKL.from_pretrained(decoder, torch_dtype=torch_dtype)
        return cls(vae=vae, transformer=transformer, scheduler=scheduler, mae=mae_model.to(torch_dtype).eval(),
                   aligner=aligner_model.to(torch_dtype).eval())

    # ------------------------------------------------------------------ stages
    @torch.no_grad()
    def encode_prior(self, image: torch.Tensor, mask: torch.Tensor,
                     condition_weight: float = OFFICIAL_CONDITION_WEIGHT) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prompt_embeds (B, 256, text_dim), pooled_prompt_embeds (B, pooled_dim))`` in the transformer's dtype:
        the aligned MAE prior of ``image`` (B,3,H,W) [-1,1] / ``mask`` (B,1,H,W) interpolated toward the nulls."""
        device = self._execution_device
        features = self.mae.prior(image.to(device, self.mae.dtype), mask.to(device, self.mae.dtype),
                                  return_image=False).features
        text, pooled = self.aligner(features.to(self.aligner.dtype))
        text, pooled = self.aligner.interpolate(text, pooled, condition_weight)
        dtype = self.transformer.dtype
        return text.to(dtype), pooled.to(dtype)

    def prepare_noise(self, batch_size: int, height: int, width: int, dtype: torch.dtype, device: torch.device,
                      generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
        """Packed Gaussian noise (B, h/2·w/2, 4·latent_channels) (official ``get_noise`` + ``rearrange``)."""
        h = 2 * (height // (self.vae_scale_factor * 2))
        w = 2 * (width // (self.vae_scale_factor * 2))
        noise = randn_tensor((batch_size, self.latent_channels, h, w), generator=generator, device=device, dtype=dtype)
        return self._pack_latents(noise, batch_size, self.latent_channels, h, w)

    def decode(self, latents: torch.Tensor, image: torch.Tensor, mask: torch.Tensor, height: int,
               width: int) -> torch.Tensor:
        """Unpack, undo FLUX's scale and shift, decode; an ``AsymmetricAutoencoderKL`` (the harmonizing decoder) gets
        the full image and the binary mask (``my_decode(z, orig_img, mask)``)."""
        latents = self._unpack_latents(latents, height, width, self.vae_scale_factor)
        return decode_latents(self.vae, latents.to(self.vae.dtype), image=image, mask=mask)

    # ------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(
        self,
        image: Any,
        mask_image: Any,
        num_inference_steps: int = 50,
        guidance_scale: float = 30.0,
        condition_weight: float = OFFICIAL_CONDITION_WEIGHT,
        height: int | None = None,
        width: int | None = None,
        sigmas: list[float] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        paste_back: bool = True,
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | tuple[str, ...] = ("latents",),
    ) -> ImagePipelineOutput | tuple:
        """Inpaint ``image`` where ``mask_image`` is 1 (white).

        Args:
            image: one image or a list (path, PIL, numpy HWC, or tensor (3,H,W)/(B,3,H,W) in [-1,1]).
            mask_image: one mask (shared) or one per image; white / 1 = hole, threshold 0.5.
            num_inference_steps: flow-matching Euler steps (official: 50).
            guidance_scale: FLUX's distilled guidance (official: 30).
            condition_weight: interpolation weight toward the empty-prompt embeddings (official: 0.5; 1 = the aligned
                condition alone). Ignored when ``prompt_embeds`` are given.
            height, width: working size, multiples of 16; default: the input size padded to a multiple of 16 (by
                reflection; the padding is cropped off the output).
            sigmas: custom sigmas (default ``linspace(1, 1/steps, steps)`` shifted by FLUX's resolution rule).
            generator: for the noise and the posterior sample of the masked-image latent.
            latents: packed initial noise (B, h/16·w/16, 64) (as diffusers' ``FluxFillPipeline``).
            prompt_embeds, pooled_prompt_embeds: a precomputed condition (both), replacing MAE + aligner.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"`` (packed latents).
            paste_back: copy the known pixels of the (resized) input into the output (official scripts: off).
            callback_on_step_end: ``f(pipe, step, t, tensors) -> dict`` after each step (``latents``, ``prompt_embeds``).
        """
        bad = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if bad:
            raise InputError(f"callback_on_step_end_tensor_inputs has {bad}; allowed: {self._callback_tensor_inputs}")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise InputError(f"output_type={output_type!r}; use 'pil', 'np', 'pt' or 'latent'")
        if num_inference_steps < 1:
            raise InputError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if (prompt_embeds is None) != (pooled_prompt_embeds is None):
            raise InputError("pass prompt_embeds and pooled_prompt_embeds together (or neither, for the MAE condition)")

        multiple = self.vae_scale_factor * 2
        image, mask = prepare_inputs(image, mask_image)
        pad = (0, 0, 0, 0)
        if height is None and width is None:
            image, pad = pad_to_multiple(image, multiple, mode="reflect")
            mask, _ = pad_to_multiple(mask, multiple, mode="constant")
        height = height or image.shape[-2]
        width = width or image.shape[-1]
        for name, value in (("height", height), ("width", width)):
            if value % multiple:
                raise InputError(f"{name}={value} is not a multiple of {multiple}; pass a multiple or leave "
                                 "height/width unset to work at the (padded) input size")
        batch_size = image.shape[0]
        device = self._execution_device
        init_image = resize_image(image, (height, width))
        mask = resize_mask(mask, (height, width))

        if prompt_embeds is None:
            prompt_embeds, pooled_prompt_embeds = self.encode_prior(init_image, mask, condition_weight)
        for name, value in (("prompt_embeds", prompt_embeds), ("pooled_prompt_embeds", pooled_prompt_embeds)):
            if value.shape[0] != batch_size:
                raise InputError(f"{name} has batch {value.shape[0]} but there are {batch_size} images")
        prompt_embeds = prompt_embeds.to(device)
        pooled_prompt_embeds = pooled_prompt_embeds.to(device)
        dtype = prompt_embeds.dtype
        text_ids = torch.zeros(prompt_embeds.shape[1], 3, device=device, dtype=dtype)

        # Timesteps: diffusers' FluxFillPipeline (= BFL get_schedule(steps, seq_len, shift=True)).
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps) if sigmas is None else sigmas
        image_seq_len = (height // self.vae_scale_factor // 2) * (width // self.vae_scale_factor // 2)
        cfg = self.scheduler.config
        mu = calculate_shift(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device,
                                                            sigmas=sigmas, mu=mu)
        timesteps, num_inference_steps = self.get_timesteps(num_inference_steps, 1.0, device)

        latent_h = 2 * (height // (self.vae_scale_factor * 2))
        latent_w = 2 * (width // (self.vae_scale_factor * 2))
        latent_image_ids = self._prepare_latent_image_ids(batch_size, latent_h // 2, latent_w // 2, device, dtype)
        if latents is None:
            latents = self.prepare_noise(batch_size, height, width, dtype, device, generator)
        latents = latents.to(device=device, dtype=dtype)

        masked_image = (init_image * (1 - mask)).to(device=device, dtype=dtype)
        mask_latents, masked_image_latents = self.prepare_mask_latents(
            mask.to(device), masked_image, batch_size, self.latent_channels, 1, height, width, dtype, device,
            generator)
        condition = torch.cat((masked_image_latents, mask_latents), dim=-1)

        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full([1], guidance_scale, device=device, dtype=torch.float32).expand(latents.shape[0])

        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                timestep = t.expand(latents.shape[0]).to(latents.dtype)
                noise_pred = self.transformer(
                    hidden_states=torch.cat((latents, condition), dim=2), timestep=timestep / 1000,
                    guidance=guidance, pooled_projections=pooled_prompt_embeds, encoder_hidden_states=prompt_embeds,
                    txt_ids=text_ids, img_ids=latent_image_ids, joint_attention_kwargs=joint_attention_kwargs,
                    return_dict=False)[0]
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                if callback_on_step_end is not None:
                    tensors = {"latents": latents, "prompt_embeds": prompt_embeds}
                    out = callback_on_step_end(self, i, t, {k: tensors[k] for k in callback_on_step_end_tensor_inputs})
                    latents = out.pop("latents", latents)
                    prompt_embeds = out.pop("prompt_embeds", prompt_embeds)
                progress_bar.update()

        if output_type == "latent":
            result = latents
        else:
            decoded = self.decode(latents, init_image, mask, height, width)
            result = finish(self, decoded, image=init_image, mask=mask, paste_back=paste_back,
                            output_type=output_type, pad=pad)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (result,)
        return ImagePipelineOutput(images=result)


def _prior_aligner(folder: str | Path):
    from asuka.models.aligner import PriorAligner

    return PriorAligner.from_pretrained(folder)


@torch.no_grad()
def empty_prompt_embeddings(flux_fill: str | Path, tokens: int = 256, torch_dtype: torch.dtype | None = None,
                            **load_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pooled (1, 768), text (1, tokens, 4096))`` for the prompt ``""`` from a FLUX folder's CLIP and T5 encoders (the
    release's ``vec.pt`` / ``txt_256.pt``), returned in float32 on the CPU. The encoders are loaded in ``torch_dtype``
    for this call only (T5-XXL: 9.5 GB in bf16)."""
    with warnings.catch_warnings():  # torch_dtype: renamed dtype in new diffusers, the name every version takes
        warnings.simplefilter("ignore", FutureWarning)
        pipe = FluxFillPipeline.from_pretrained(flux_fill, transformer=None, vae=None, torch_dtype=torch_dtype,
                                                **load_kwargs)
        text, pooled, _ = pipe.encode_prompt("", None, device="cpu", max_sequence_length=tokens)
    return pooled.float(), text.float()


def tiny_asuka_flux_pipeline(flux_fill: str | Path, seed: int = 0) -> AsukaFluxFillPipeline:
    """A tiny random :class:`AsukaFluxFillPipeline` on a tiny FLUX.1-Fill folder (:mod:`asuka.models.tiny_flux`): a tiny
    MAE (32-d features), 2-block heads (head width 64 as the release), the folder's empty-prompt embeddings as nulls, and a
    harmonizing decoder initialised from the folder's vae. Random weights: it shows the plumbing, not ASUKA's quality."""
    from asuka.models.decoder import HarmonizingDecoderKL
    from asuka.models.seeding import seeded

    transformer = FluxTransformer2DModel.from_pretrained(flux_fill, subfolder="transformer")
    vae = AutoencoderKL.from_pretrained(flux_fill, subfolder="vae")
    mae = MAEPrior.tiny(seed)
    with seeded(seed):
        aligner = FluxPriorAligner(in_dim=mae.feature_dim, pooled_dim=transformer.config.pooled_projection_dim,
                                   text_dim=transformer.config.joint_attention_dim, null_tokens=mae.num_tokens,
                                   num_blocks=2, head_dim=64)
    aligner.set_null_embeddings(*empty_prompt_embeddings(flux_fill, mae.num_tokens))
    return AsukaFluxFillPipeline(vae=HarmonizingDecoderKL.from_vae(vae), transformer=transformer,
                                 scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(flux_fill, subfolder="scheduler"),
                                 mae=mae.eval(), aligner=aligner.eval())


def default_tiny_asuka_flux_dir() -> Path:
    """A tiny random ASUKA-FLUX pipeline folder for the offline demo, written once to ``$ASUKA_CACHE`` or
    ``~/.cache/asuka`` under ``tiny-asuka-flux`` (:func:`tiny_asuka_flux_pipeline` on the tiny FLUX.1-Fill folder)."""
    from asuka.models.tiny import cached_pipeline_dir
    from asuka.models.tiny_flux import default_tiny_flux_fill_dir

    return cached_pipeline_dir("tiny-asuka-flux",
                               lambda folder: tiny_asuka_flux_pipeline(default_tiny_flux_fill_dir()).save_pretrained(folder))


# ---------------------------------------------------------------------------------------------- registry
class AsukaFluxRunner(PipelineRunner):
    """``(image [-1,1], mask {0,1}) -> image [-1,1]`` through :class:`AsukaFluxFillPipeline` (paste-back is left to
    :func:`asuka.pipelines._common.run_inpainting`); FLUX needs sizes that are multiples of 16."""

    multiple = 16

    def __call__(self, image: torch.Tensor, mask: torch.Tensor, *, generator=None, progress_bar: bool = True,
                 num_inference_steps: int = 50, guidance_scale: float = 30.0,
                 condition_weight: float = OFFICIAL_CONDITION_WEIGHT) -> torch.Tensor:
        return self._run(image, progress_bar, image=image, mask_image=mask, num_inference_steps=num_inference_steps,
                         guidance_scale=guidance_scale, condition_weight=condition_weight, generator=generator,
                         paste_back=False)


def build_asuka_flux(model: str | Path, *, device: torch.device, dtype: torch.dtype, vae: Any = None) -> AsukaFluxRunner:
    """Load a saved :class:`AsukaFluxFillPipeline` folder (``save_pretrained``, e.g. written by
    ``asuka.models.convert.convert_asuka_flux_release``) or hub id, every component in ``dtype`` — bfloat16 on CUDA
    unless another half type is asked for (``test_asuka_flux.py`` runs everything in bf16), float32 on CPU.
    ``vae`` (e.g. a 16-latent-channel ``HarmonizingDecoderKL``) replaces the saved decoder."""
    if device.type == "cuda" and dtype == torch.float32:
        dtype = torch.bfloat16  # the official setting; FLUX.1-Fill in float32 needs 48 GB for the transformer alone
    if vae is not None and (vae.config.latent_channels != 16 or vae.config.get("shift_factor") is None):
        raise InputError(f"FLUX.1-Fill latents need a 16-channel decoder with shift_factor (FLUX AE: 0.1159); got "
                         f"latent_channels={vae.config.latent_channels}, "
                         f"shift_factor={vae.config.get('shift_factor')}", field="vae")
    pipe = load_pipeline(AsukaFluxFillPipeline, model, dtype, vae=vae)
    return AsukaFluxRunner(pipe.to(device))

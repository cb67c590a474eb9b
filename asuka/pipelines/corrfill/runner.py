"""The ``corrfill`` builder and runner: loads an SD-inpainting folder (Side-by-side, LeftRefill, IP-Adapter-Plus) or
a Paint-by-Example folder and runs :mod:`asuka.pipelines.corrfill.pipelines` with the registered options."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from asuka.errors import InputError
from asuka.pipelines._registry import PipelineRunner, load_pipeline, resolve_model
from asuka.pipelines._sampling import ddim_without_clipping
from asuka.pipelines.corrfill.config import make_config

# The official code's conditioning per baseline (corrfill_module/corrfill.py::CorrFill_Inpaint.generate,
# CF_IPA_Inpaint.generate; corr_guided.py).
GUIDANCE = {"side-by-side": 3.0, "leftrefill": 2.5, "ip-adapter-plus": 7.5, "paint-by-example": 5.0}
PROMPT = {"side-by-side": "", "ip-adapter-plus": "best quality, high quality"}
NEGATIVE_PROMPT = "monochrome, lowres, bad anatomy, worst quality, low quality"
_TABLE = ("step_masking", "step_optimize", "mask_window", "smooth_window", "mask_boost", "str_optimize",
          "vote_layers", "dominant_bank_update", "mask_uncond_branch")


def load_prompt_embeds(path: str | Path, field: str, width: int) -> torch.Tensor:
    """Learned prompt embeddings ``(1, T, width)`` from a ``.safetensors`` file (one tensor) or a ``.pt``/``.pth``
    file holding a tensor (read with ``torch.load(weights_only=True)``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"file not found: {path} (pass a .pt or .safetensors file of prompt embeddings)", field)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = list(load_file(str(path)).values())
            value = tensors[0] if len(tensors) == 1 else None
        else:
            value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 -- any unreadable file is one line for the user
        raise InputError(f"cannot read {path}: {' '.join(str(err).split())}", field) from None
    if not torch.is_tensor(value) or value.dim() not in (2, 3) or value.shape[-1] != width:
        shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
        raise InputError(f"{path} must hold one tensor of shape (tokens, {width}) or (1, tokens, {width}) (the "
                         f"UNet's cross-attention width), got {shape}", field)
    value = value if value.dim() == 3 else value[None]
    if value.shape[0] != 1:
        raise InputError(f"{path} holds {value.shape[0]} prompts; pass one", field)
    return value


def load_paint_by_example(model: str | Path, dtype: torch.dtype, vae: Any = None):
    """A :class:`CorrFillPaintByExamplePipeline` from a ``PaintByExamplePipeline`` folder or hub id, component by
    component (recent diffusers cannot resolve the deprecated image-encoder class from ``model_index.json``)."""
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig

    from asuka.models.tiny_paint_by_example import example_encoder_class
    from asuka.pipelines.corrfill.pipelines import CorrFillPaintByExamplePipeline

    resolved = resolve_model(model)
    index = diffusers.DiffusionPipeline.load_config(resolved)
    scheduler_class = getattr(diffusers, index["scheduler"][1])
    encoder_config = CLIPVisionConfig.from_pretrained(resolved, subfolder="image_encoder")
    return CorrFillPaintByExamplePipeline(
        vae=vae.to(dtype) if vae is not None else AutoencoderKL.from_pretrained(resolved, subfolder="vae",
                                                                                  torch_dtype=dtype),
        image_encoder=example_encoder_class().from_pretrained(resolved, subfolder="image_encoder",
                                                              config=encoder_config, torch_dtype=dtype),
        unet=UNet2DConditionModel.from_pretrained(resolved, subfolder="unet", torch_dtype=dtype),
        scheduler=scheduler_class.from_pretrained(resolved, subfolder="scheduler"),
        safety_checker=None,
        feature_extractor=CLIPImageProcessor.from_pretrained(resolved, subfolder="feature_extractor"),
    )


class CorrFillRunner(PipelineRunner):
    """``(image, mask, reference) -> image`` in [-1, 1] for every baseline; sizes padded to multiples of 64 so the
    layer resolutions halve exactly (CorrFill resamples correspondences by powers of 2)."""

    multiple = 64

    def __init__(self, pipe, paint_by_example: bool) -> None:
        super().__init__(pipe)
        self.paint_by_example = paint_by_example
        # "ddim": the paper's sampler (and the official code's for SD: DDIMScheduler from the folder's schedule, no
        # sample clipping); "model": the folder's own (PNDM for Paint-by-Example, as the official code).
        self.schedulers = {"model": pipe.scheduler,
                           "ddim": ddim_without_clipping(pipe.scheduler)}
        self._ip_adapter: tuple | None = None
        self._embeds: dict[str, torch.Tensor] = {}

    def _check_model(self, baseline: str) -> None:
        if (baseline == "paint-by-example") != self.paint_by_example:
            have = "a Paint-by-Example" if self.paint_by_example else "an SD-inpainting"
            need = "a Paint-by-Example folder" if baseline == "paint-by-example" else "an SD-inpainting folder"
            raise InputError(f"baseline {baseline!r} needs {need}, but the model is {have} pipeline; pass the "
                             "matching model or baseline", "options.baseline")

    def _sync_ip_adapter(self, baseline: str, folder: str | None, subfolder: str, weight_name: str,
                         scale: float) -> None:
        """Load the IP-Adapter the options name (once), or unload it for the other baselines."""
        wanted = (folder, subfolder, weight_name) if baseline == "ip-adapter-plus" else None
        if wanted is not None and folder is None:
            raise InputError("the ip-adapter-plus baseline needs IP-Adapter-Plus weights: a folder or hub id laid "
                             "out like h94/IP-Adapter", "options.ip_adapter")
        if wanted != self._ip_adapter:
            if self._ip_adapter is not None:
                self.pipe.unload_ip_adapter()
                self._ip_adapter = None
            if wanted is not None:
                try:
                    self.pipe.load_ip_adapter(str(Path(folder).expanduser()) if Path(folder).expanduser().exists()
                                              else folder, subfolder=subfolder, weight_name=weight_name)
                except (OSError, ValueError, KeyError, RuntimeError) as err:
                    raise InputError(f"cannot load IP-Adapter {folder!r} ({subfolder}/{weight_name}): "
                                     f"{' '.join(str(err).split())}", "options.ip_adapter") from None
                self._ip_adapter = wanted
        if wanted is not None:
            self.pipe.set_ip_adapter_scale(scale)

    def _prompt_embeds(self, path: str | None, field: str) -> torch.Tensor | None:
        if path is None:
            return None
        if path not in self._embeds:
            width = self.pipe.unet.config.cross_attention_dim
            self._embeds[path] = load_prompt_embeds(path, field, width)
        return self._embeds[path].to(self.pipe.device, self.pipe.unet.dtype)

    def __call__(self, image: torch.Tensor, mask: torch.Tensor, *, generator=None, progress_bar: bool = True,
                 reference: torch.Tensor | None = None, prompt: list[str] | None = None,
                 negative_prompt: list[str] | None = None, baseline: str = "side-by-side",
                 profile: str = "reference_code", num_inference_steps: int = 50, scheduler: str = "ddim",
                 guidance_scale: float | None = None, eta: float = 1.0, step_masking: int | None = None,
                 step_optimize: int | None = None, mask_window: float | None = None,
                 smooth_window: float | None = None, mask_boost: float | None = None,
                 str_optimize: float | None = None, vote_layers: tuple[int, ...] | None = None,
                 enable_masking: bool = True, enable_filter: bool = True, enable_smoothing: bool = True,
                 enable_latent_opt: bool = True, gradient_checkpointing: bool = False,
                 dominant_bank_update: str | None = None,
                 mask_uncond_branch: bool | None = None, prompt_embeds: str | None = None,
                 negative_prompt_embeds: str | None = None, ip_adapter: str | None = None,
                 ip_adapter_subfolder: str = "models",
                 ip_adapter_weight_name: str = "ip-adapter-plus_sd15.safetensors",
                 ip_adapter_scale: float = 1.0) -> torch.Tensor:
        if reference is None:
            raise InputError("CorrFill needs a reference image of the same scene", "inputs.reference")
        self._check_model(baseline)
        given = dict(step_masking=step_masking, step_optimize=step_optimize, mask_window=mask_window,
                     smooth_window=smooth_window, mask_boost=mask_boost, str_optimize=str_optimize,
                     vote_layers=vote_layers, dominant_bank_update=dominant_bank_update,
                     mask_uncond_branch=mask_uncond_branch)
        config = make_config(baseline, profile=profile, enable_masking=enable_masking, enable_filter=enable_filter,
                             enable_smoothing=enable_smoothing, enable_latent_opt=enable_latent_opt,
                             gradient_checkpointing=gradient_checkpointing,
                             **{k: v for k, v in given.items() if v is not None})
        scale = GUIDANCE[baseline] if guidance_scale is None else guidance_scale
        self.pipe.set_progress_bar_config(disable=not progress_bar)
        self.pipe.scheduler = self.schedulers[scheduler]
        common = dict(config=config, num_inference_steps=num_inference_steps, guidance_scale=scale, eta=eta,
                      generator=generator)
        reference = reference.to(image)
        if self.paint_by_example:
            return self.pipe(reference, image, mask, **common).images.to(image)
        self._sync_ip_adapter(baseline, ip_adapter, ip_adapter_subfolder, ip_adapter_weight_name, ip_adapter_scale)
        batch = image.shape[0]
        if baseline == "leftrefill":
            positive = self._prompt_embeds(prompt_embeds, "options.prompt_embeds")
            if positive is None:
                raise InputError("the leftrefill baseline needs the learned prompt embeddings (a .pt or .safetensors "
                                 "file, e.g. LeftRefill's leftrefill_pos_prompt.pt)", "options.prompt_embeds")
            text = dict(prompt_embeds=positive,
                        negative_prompt_embeds=self._prompt_embeds(negative_prompt_embeds,
                                                                   "options.negative_prompt_embeds"))
        else:
            text = dict(prompt=prompt if prompt is not None else [PROMPT[baseline]] * batch,
                        negative_prompt=negative_prompt if negative_prompt is not None else [NEGATIVE_PROMPT] * batch)
        return self.pipe(reference, image, mask, **common, **text).images.to(image)


def build(model: str | Path, *, device: torch.device, dtype: torch.dtype, vae: Any = None) -> CorrFillRunner:
    """Load ``model``: a ``PaintByExamplePipeline`` folder gives the Paint-by-Example runner, any other diffusers
    inpainting folder the SD runner. ``vae`` replaces the VAE."""
    from asuka.pipelines.corrfill.pipelines import CorrFillInpaintPipeline

    from asuka.weights import config_class_name

    if config_class_name(resolve_model(model), field="model", config="model_index.json") == "PaintByExamplePipeline":
        return CorrFillRunner(load_paint_by_example(model, dtype, vae).to(device), paint_by_example=True)
    pipe = load_pipeline(CorrFillInpaintPipeline, model, dtype, vae=vae, safety_checker=None,
                         requires_safety_checker=False)
    return CorrFillRunner(pipe.to(device), paint_by_example=False)

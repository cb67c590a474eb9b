"""The ``pilot`` method's builder and runner: :class:`~asuka.pipelines.pilot.pipeline.PilotInpaintPipeline` loaded
from any Stable Diffusion text-to-image folder, with the optional ControlNet, T2I-Adapter, IP-Adapter and LoRA
weights the official ``run_example.py`` loads (there from its config: ``controlnet_id``, ``ipa_id``, ``lora_id``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from asuka.errors import InputError
from asuka.pipelines._registry import PipelineRunner, load_pipeline
from asuka.pipelines._sampling import ddim_without_clipping
from asuka.weights import resolve_pretrained

LORA_ADAPTER = "pilot-lora"


class PilotRunner(PipelineRunner):
    """``(image [-1,1], mask {0,1}) -> image [-1,1]`` through :class:`PilotInpaintPipeline` (paste-back is left to
    the caller). ``control_image`` feeds the loaded ControlNet and/or T2I-Adapter; ``ip_adapter_image`` the loaded
    IP-Adapter. Items whose IP-Adapter images differ run one at a time (PILOT's losses are per sample, so that equals
    a batched run)."""

    multiple = 64

    def __init__(self, pipe, *, lora: bool = False) -> None:
        super().__init__(pipe)
        self.lora = lora

    def __call__(self, image: torch.Tensor, mask: torch.Tensor, *, generator=None, progress_bar: bool = True,
                 prompt: list[str] | None = None, negative_prompt: list[str] | None = None,
                 control_image: torch.Tensor | None = None, ip_adapter_image: list[torch.Tensor] | None = None,
                 num_inference_steps: int = 200, guidance_scale: float = 7.5, op_interval: int = 10,
                 num_gradient_ops: int = 10, gamma: float = 1.0, lr: float = 0.025, lr_schedule: str = "exp",
                 lr_warmup: float = 0.007, momentum: float = 0.7, coef: float = 150.0, coef_schedule: str = "linear",
                 coef_area_norm: float = 1499.0, sbc: bool = True, controlnet_conditioning_scale: float = 1.0,
                 adapter_conditioning_scale: float = 1.0, ip_adapter_scale: float = 0.6,
                 lora_scale: float = 1.0) -> torch.Tensor:
        options = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, op_interval=op_interval,
                       num_gradient_ops=num_gradient_ops, gamma=gamma, lr=lr, lr_schedule=lr_schedule,
                       lr_warmup=lr_warmup, momentum=momentum, coef=coef, coef_schedule=coef_schedule,
                       coef_area_norm=coef_area_norm, sbc=sbc,
                       controlnet_conditioning_scale=controlnet_conditioning_scale,
                       adapter_conditioning_scale=adapter_conditioning_scale)
        pipe, batch = self.pipe, image.shape[0]
        if self.lora:
            pipe.set_adapters([LORA_ADAPTER], adapter_weights=[lora_scale])
        if ip_adapter_image is not None:
            if getattr(pipe.unet, "encoder_hid_proj", None) is None:
                raise InputError("given but no IP-Adapter is loaded; load the method with the ip_adapter weights",
                                 "inputs.ip_adapter_image")
            pipe.set_ip_adapter_scale(ip_adapter_scale)
        if control_image is not None and pipe.controlnet is None and pipe.adapter is None:
            raise InputError("given but neither a ControlNet nor a T2I-Adapter is loaded; load the method with the "
                             "controlnet or t2i_adapter weights", "inputs.control_image")
        kwargs = dict(prompt=prompt or [""] * batch, negative_prompt=negative_prompt, **options)
        if control_image is not None:  # (B,3,H,W) in [-1,1], as the pipeline takes condition tensors
            if pipe.controlnet is not None:
                kwargs["control_image"] = control_image
            if pipe.adapter is not None:
                kwargs["adapter_image"] = control_image
        generators = generator if isinstance(generator, list) else [generator] * batch
        if ip_adapter_image is None or all(torch.equal(ip_adapter_image[0], x) for x in ip_adapter_image[1:]):
            ip = None if ip_adapter_image is None else _pil(ip_adapter_image[0])
            return self._run(image, progress_bar, image=image, mask_image=mask, generator=generator,
                             ip_adapter_image=ip, paste_back=False, **kwargs)
        outputs = []
        for i in range(batch):
            item = {k: (v[i:i + 1] if isinstance(v, torch.Tensor) else [v[i]] if isinstance(v, list) else v)
                    for k, v in kwargs.items()}
            outputs.append(self._run(image, progress_bar, image=image[i:i + 1], mask_image=mask[i:i + 1],
                                     generator=generators[i], ip_adapter_image=_pil(ip_adapter_image[i]),
                                     paste_back=False, **item))
        return torch.cat(outputs)


def _pil(x: torch.Tensor):
    """A (1,3,h,w) [-1,1] image -> PIL, for diffusers' CLIP image processor (IP-Adapter)."""
    from asuka.pipelines._common import to_pil

    return to_pil(x)[0]


def _weight_file(ref: str | Path, field: str) -> Path:
    path = Path(ref).expanduser()
    if not path.is_file():
        raise InputError(f"file not found: {ref} (pass a .safetensors or .bin weight file)", field)
    return path


def default_tiny_pilot_dir() -> Path:
    """A tiny random Stable Diffusion text-to-image folder for the offline demo (written once to ``$ASUKA_CACHE`` or
    ``~/.cache/asuka``, under ``tiny-sd``): it shows the plumbing, not PILOT's quality."""
    from asuka.models.tiny import cached_pipeline_dir, save_tiny_sd

    return cached_pipeline_dir("tiny-sd", save_tiny_sd)


def build_pilot(model: str | Path, *, device: torch.device, dtype: torch.dtype, vae: Any = None,
                controlnet: str | Path | None = None, t2i_adapter: str | Path | None = None,
                ip_adapter: str | Path | None = None, lora: str | Path | None = None) -> PilotRunner:
    """Load :class:`PilotInpaintPipeline` from a Stable Diffusion text-to-image folder or hub id (DreamBooth weights
    are just another model), its scheduler made DDIM with ``clip_sample=False`` (the official pipeline's
    ``__init__``), and optionally:

    - ``controlnet``: a ``ControlNetModel`` folder or hub id; ``t2i_adapter``: a ``T2IAdapter`` folder or hub id;
    - ``ip_adapter``: an IP-Adapter weight file whose folder holds ``image_encoder/`` (the ``h94/IP-Adapter`` layout,
      e.g. ``.../models/ip-adapter_sd15.safetensors``), loaded with diffusers' ``load_ip_adapter``;
    - ``lora``: a LoRA weight file or folder, loaded with diffusers' ``load_lora_weights`` (scale: option
      ``lora_scale``);
    - ``vae``: an autoencoder to use instead of the model's (e.g. a ``HarmonizingDecoderKL``).
    """
    from diffusers import ControlNetModel, T2IAdapter

    from asuka.pipelines.pilot.pipeline import PilotInpaintPipeline

    components: dict[str, Any] = {}
    if controlnet is not None:
        components["controlnet"] = ControlNetModel.from_pretrained(
            resolve_pretrained(controlnet, field="weights.controlnet", what="ControlNet"), torch_dtype=dtype)
    if t2i_adapter is not None:
        components["adapter"] = T2IAdapter.from_pretrained(
            resolve_pretrained(t2i_adapter, field="weights.t2i_adapter", what="T2I-Adapter"), torch_dtype=dtype)
    pipe = load_pipeline(PilotInpaintPipeline, model, dtype, vae=vae, **components)
    pipe.scheduler = ddim_without_clipping(pipe.scheduler)
    if ip_adapter is not None:
        weights = _weight_file(ip_adapter, "weights.ip_adapter")
        pipe.load_ip_adapter(str(weights.parent), subfolder="", weight_name=weights.name)
    if lora is not None:
        path = Path(lora).expanduser()
        if path.is_file():
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=LORA_ADAPTER)
        elif path.is_dir():
            pipe.load_lora_weights(str(path), adapter_name=LORA_ADAPTER)
        else:
            raise InputError(f"not found: {lora} (pass a LoRA .safetensors file or the folder holding it)",
                             "weights.lora")
    return PilotRunner(pipe.to(device), lora=lora is not None)

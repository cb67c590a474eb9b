"""``PilotInpaintPipeline``: PILOT inpainting by latent optimisation on a text-to-image Stable Diffusion UNet (Pan et
al., arXiv 2407.08019 v2; official code ``pipeline/pipeline_pilot.py`` of github.com/Lingzhi-Pan/PILOT).

Per denoising step ``i`` at timestep ``t`` (paper §4, Fig. 2; code ``__call__`` and ``optimize_xt``):

1. blend stage (``t < (1 − γ)·T``): the background of ``z_t`` is replaced by the source latent noised to ``t``
   (Eqs. 17-18), with fresh noise from ``generator``;
2. optimisation stage (``t >= (1 − γ)·T`` and ``i % op_interval == 0``): ``num_gradient_ops`` momentum-SGD steps on
   ``z_t`` of ``L = L_bg + λ_t·L_s`` (Eq. 15): the background loss on the one-step x̂₀ of the *conditional* noise
   prediction (no CFG) and the semantic-centralisation loss on the cross-attention layers below the latent resolution,
   with SBC on; gradients flow through a ControlNet; a T2I-Adapter and an IP-Adapter get their conditional half;
3. the classifier-free-guided denoising step with SBC on (both halves).

Losses are per sample (λ scaled by each sample's own background area), so a batch equals its single runs; the code's
batch-size dependence is not reproduced. Differences from the official code, all documented where they live: masks are
white = hole at the API (``mask_convention="pilot"`` takes the code's white = keep); the initial noise is drawn before
the VAE posterior sample (so that with every switch off the output equals ``StableDiffusionPipeline``); any device,
any multiple of 64, ``num_train_timesteps`` instead of 1000; an optional pixel paste-back (off by default, as in the
paper). A hole covering the whole image falls back to plain text-to-image sampling, as in the code.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    ImagePipelineOutput,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import (
    FromSingleFileMixin,
    IPAdapterMixin,
    StableDiffusionLoraLoaderMixin,
    TextualInversionLoaderMixin,
)
from diffusers.pipelines.pipeline_utils import StableDiffusionMixin
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from asuka.attention import AttentionController
from asuka.pipelines._sampling import (
    AlphaBar,
    Step,
    cfg_noise,
    check_callback_inputs,
    decode,
    denoise,
    finish,
    frozen,
)
from asuka.errors import InputError
from asuka.pipelines._common import load_image, per_image, prepare_inputs
from asuka.tensors import resize_image
from asuka.pipelines.pilot.controls import (
    GRADIENT_PHASE,
    GUIDED_PHASE,
    BoundaryControl,
    CentralisationRecorder,
    hole_token_masks,
    semantic_layers,
)
from asuka.pipelines.pilot.objective import PilotLoss, latent_hole_mask, word_token_mask
from asuka.pipelines.pilot.schedule import (
    COEF_SCHEDULES,
    LR_SCHEDULES,
    area_coefficient,
    blend,
    coef_factor,
    descend,
    noised,
    step_plan,
    step_size,
)

MASK_CONVENTIONS = ("diffusers", "pilot")
SIZE_MULTIPLE = 64
"""Images must be multiples of 64: SD's UNet halves the 1/8 latent three times, and the attention masks of every
level are then exact (bilinear factors 2, 4, 8)."""


class PilotInpaintPipeline(DiffusionPipeline, StableDiffusionMixin, TextualInversionLoaderMixin,
                           StableDiffusionLoraLoaderMixin, IPAdapterMixin, FromSingleFileMixin):
    """PILOT on a 4-channel Stable Diffusion text-to-image model (SD-1.5 and its fine-tunes; DreamBooth weights as the
    model, LoRA through ``load_lora_weights``, IP-Adapter through ``load_ip_adapter``).

    Components: ``vae`` (``AutoencoderKL`` or any ``AsymmetricAutoencoderKL``, e.g. asuka's ``HarmonizingDecoderKL``,
    which decodes with the image and the mask), ``text_encoder``, ``tokenizer``, ``unet``, ``scheduler`` (DDIM with
    ``clip_sample=False`` as in the code; x̂₀ is computed from ``alphas_cumprod``, not by the scheduler), and the
    optional ``controlnet`` (``ControlNetModel``), ``adapter`` (``T2IAdapter``), ``image_encoder`` and
    ``feature_extractor`` (IP-Adapter). Load from any SD folder: ``PilotInpaintPipeline.from_pretrained(path)``.
    """

    model_cpu_offload_seq = "text_encoder->image_encoder->unet->vae"
    _optional_components = ["controlnet", "adapter", "image_encoder", "feature_extractor"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    # diffusers' own Stable Diffusion machinery, reused as is.
    encode_prompt = StableDiffusionPipeline.encode_prompt
    encode_image = StableDiffusionPipeline.encode_image
    prepare_ip_adapter_image_embeds = StableDiffusionPipeline.prepare_ip_adapter_image_embeds
    prepare_latents = StableDiffusionPipeline.prepare_latents
    prepare_extra_step_kwargs = StableDiffusionPipeline.prepare_extra_step_kwargs
    _encode_vae_image = StableDiffusionInpaintPipeline._encode_vae_image

    def __init__(self, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                 unet: UNet2DConditionModel, scheduler: Any, controlnet: Any = None, adapter: Any = None,
                 image_encoder: CLIPVisionModelWithProjection | None = None,
                 feature_extractor: CLIPImageProcessor | None = None):
        super().__init__()
        if unet.config.in_channels != 4:
            raise ValueError(f"PILOT runs on a 4-channel text-to-image UNet; this unet has "
                             f"in_channels={unet.config.in_channels} (an inpainting UNet?).")
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                              controlnet=controlnet, adapter=adapter, image_encoder=image_encoder,
                              feature_extractor=feature_extractor)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    # ------------------------------------------------------------------ inputs
    def word_tokens(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        """(B, T) mask of each prompt's real word tokens (not BOS, EOS or padding), as the code's ``token_indices``
        (which reads the first prompt only)."""
        prompts = self.maybe_convert_prompt(prompts, self.tokenizer)
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        special = [i for i in (self.tokenizer.bos_token_id, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id)
                   if i is not None]
        return word_token_mask(ids, special).to(device)

    def _condition_image(self, image: Any, name: str, batch: int, height: int, width: int, device: torch.device,
                         dtype: torch.dtype) -> torch.Tensor:
        """A spatial condition (ControlNet / T2I-Adapter; path, PIL, numpy or a [-1, 1] tensor) -> (B, 3, H, W) in
        [0, 1] at the working size (resized like images, :func:`asuka.tensors.resize_image`)."""
        x = (resize_image(load_image(image, name=name), (height, width)) + 1) / 2
        if x.shape[0] not in (1, batch):
            raise InputError(f"{x.shape[0]} condition images for {batch} images; pass one or one per image", name)
        return x.expand(batch, -1, -1, -1).to(device=device, dtype=dtype)

    # ------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(
        self,
        image: Any,
        mask_image: Any,
        prompt: str | list[str] = "",
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 200,
        guidance_scale: float = 7.5,
        op_interval: int = 10,
        num_gradient_ops: int = 10,
        gamma: float = 1.0,
        lr: float = 0.025,
        lr_schedule: str = "exp",
        lr_warmup: float = 0.007,
        momentum: float = 0.7,
        coef: float = 150.0,
        coef_schedule: str = "linear",
        coef_area_norm: float = 1499.0,
        sbc: bool = True,
        mask_convention: str = "diffusers",
        control_image: Any = None,
        controlnet_conditioning_scale: float = 1.0,
        adapter_image: Any = None,
        adapter_conditioning_scale: float = 1.0,
        ip_adapter_image: Any = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        paste_back: bool = False,
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | tuple[str, ...] = ("latents",),
    ) -> ImagePipelineOutput | tuple:
        """Inpaint ``image`` where ``mask_image`` is white.

        Defaults are the paper's (§5.1: 200 DDIM steps, CFG 7.5, γ = 1, optimisation every τ = 10 steps with K = 10
        SGD steps); the learning rate, its schedule, momentum and λ, which the paper does not give, are the official
        configs' (``configs/*.yaml``: lr 0.025 growing as lr·1.002^(T−t), warm-up 0.007 at the first step, momentum
        0.7, coef 150 scaled by the background area / 1499 and falling linearly with t).

        Args:
            image, mask_image: one image/mask or lists (paths, PIL, numpy, tensors in [-1, 1] / {0, 1}); sizes must be
                multiples of 64. ``mask_convention="diffusers"`` (default): white = hole; ``"pilot"``: white = keep,
                the official code's polarity.
            prompt, negative_prompt: text (one for all images or one per image); CFG uses ``negative_prompt`` ("").
            num_inference_steps, guidance_scale: DDIM steps and CFG weight.
            op_interval (τ), num_gradient_ops (K), gamma (γ): optimise every τ-th step while ``t >= (1 − γ)·T``,
                K gradient steps each; below, blend the background (γ = 1: no blend stage).
            lr, lr_schedule ("exp", "constant", "linear"), lr_warmup, momentum: the latent optimiser.
            coef, coef_schedule ("linear", "constant"), coef_area_norm: λ_t = coef·N_bg/coef_area_norm·schedule(t).
            sbc: Semantic Boundary Control on all text cross-attention layers.
            control_image, controlnet_conditioning_scale: the ControlNet condition (needs ``controlnet``): PIL/numpy,
                or a tensor (B|1,3,H,W) in [-1, 1]; resized to the image's size, given to the ControlNet in [0, 1].
            adapter_image, adapter_conditioning_scale: the T2I-Adapter condition (needs ``adapter``), the same way.
            ip_adapter_image / ip_adapter_image_embeds: the IP-Adapter image (after ``load_ip_adapter``).
            generator: one generator or one per image (initial noise, VAE posterior sample, blend noise).
            latents: optional initial noise (B, 4, H/8, W/8).
            output_type: "pil", "np", "pt" or "latent". paste_back: copy the known pixels of the input into the output
                (off: the paper's output, whose background is only close to the input).
        """
        self._check_options(num_inference_steps, op_interval, num_gradient_ops, gamma, lr_schedule, coef_schedule,
                            mask_convention, output_type, control_image, adapter_image, ip_adapter_image,
                            ip_adapter_image_embeds)
        names = check_callback_inputs(callback_on_step_end_tensor_inputs, self._callback_tensor_inputs)
        image, mask = prepare_inputs(image, mask_image)
        hole = mask if mask_convention == "diffusers" else 1 - mask
        batch, _, height, width = image.shape
        if height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
            raise InputError(f"size {width}x{height} is not a multiple of {SIZE_MULTIPLE}; pad or resize it "
                             "(the inpaint runner pads automatically)", "image")
        prompts = per_image(prompt, batch, "prompt")
        negatives = per_image("" if negative_prompt is None else negative_prompt, batch, "negative_prompt")
        device = self._execution_device
        cfg = guidance_scale > 1

        prompt_embeds, negative_embeds = self.encode_prompt(prompts, device, 1, cfg, negatives)
        unet_dtype = self.unet.dtype

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        latents = self.prepare_latents(batch, self.unet.config.in_channels, height, width, torch.float32, device,
                                       generator, latents)
        source = self._encode_vae_image(image.to(device, self.vae.dtype), generator).float()
        latent_hole = latent_hole_mask(hole.to(device), tuple(latents.shape[-2:]))
        full_hole = bool(latent_hole.amin() >= 1)  # one host sync per call: the code's plain text-to-image case

        conditioning = _Conditioning(cfg)
        if self.controlnet is not None and control_image is not None:
            conditioning.control = self._condition_image(control_image, "control_image", batch, height, width, device,
                                                         self.controlnet.dtype)
            conditioning.control_scale = controlnet_conditioning_scale
        if self.adapter is not None and adapter_image is not None:
            states = self.adapter(self._condition_image(adapter_image, "adapter_image", batch, height, width, device,
                                                        self.adapter.dtype))
            conditioning.adapter = [s * adapter_conditioning_scale for s in states]
        if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
            conditioning.ip = self.prepare_ip_adapter_image_embeds(ip_adapter_image, ip_adapter_image_embeds, device,
                                                                    batch, cfg)

        T = self.scheduler.config.num_train_timesteps
        ts = [int(t) for t in timesteps.tolist()]
        # a full-image hole: no optimisation, no blend, no SBC, i.e. plain text-to-image sampling (as the code does)
        plan = step_plan(ts, op_interval, 1.0 if full_hole else gamma, T, 0 if full_hole else num_gradient_ops)
        alpha_bar = AlphaBar(self.scheduler, device)
        lam_base = area_coefficient(coef, latent_hole, coef_area_norm)
        optimising = any(p.optimise for p in plan)

        if optimising and torch.is_inference_mode_enabled():
            raise InputError("PILOT differentiates through the UNet, which torch.inference_mode() forbids; call it "
                             "under torch.no_grad() (or nothing) instead, or set num_gradient_ops=0",
                             "num_gradient_ops")
        controller = AttentionController(self.unet)
        recorder = None
        if not full_hole and (sbc or optimising):
            # a sample without a hole keeps its text everywhere (code: no attention mask when nothing is inpainted)
            has_hole = latent_hole.flatten(1).amax(1).view(-1, 1, 1, 1) > 0
            masks = hole_token_masks(torch.where(has_hole, latent_hole, 1.0))
            cross = controller.layers.select(kind="cross")
            masks.prefill(layer.grid(latent_hole.shape[-2:]) for layer in cross)
            if sbc:
                controller.add(BoundaryControl(masks), cross)
            if optimising:
                selected = semantic_layers(controller.layers)
                if len(selected) == 0:
                    raise InputError("no cross-attention layer below the latent resolution for the semantic loss; "
                                     "use an SD-layout UNet or num_gradient_ops=0", "unet")
                recorder = controller.add(CentralisationRecorder(masks, self.word_tokens(prompts, device)), selected)

        def noise(step: Step, z: torch.Tensor, tensors: dict) -> torch.Tensor:
            controller.state.phase, controller.state.cfg = GUIDED_PHASE, cfg
            e = torch.cat([tensors["negative_prompt_embeds"], tensors["prompt_embeds"]]) if cfg else \
                tensors["prompt_embeds"]
            x = torch.cat([z] * 2) if cfg else z
            x = self.scheduler.scale_model_input(x, step.timestep).to(unet_dtype)
            return cfg_noise(self.unet, x, step.timestep, e, guidance_scale, cfg=cfg,
                             **self._adapter_kwargs(x, step.timestep, e, conditioning, guided=True)).float()

        def optimise(step: Step, z: torch.Tensor, tensors: dict) -> torch.Tensor:
            t = ts[step.index]
            controller.state.phase, controller.state.cfg = GRADIENT_PHASE, False
            e = tensors["prompt_embeds"]

            def forward(x: torch.Tensor) -> torch.Tensor:
                return self.conditional_noise(x, step.timestep, e, conditioning)

            loss = PilotLoss(forward, recorder.terms, source, latent_hole, alpha_bar(step.timestep),
                             lam_base * coef_factor(t, coef_schedule, T))
            eta = step_size(t, lr=lr, schedule=lr_schedule, num_train_timesteps=T, first=step.index == 0,
                            warmup=lr_warmup)
            return descend(loss, z, steps=num_gradient_ops, step=eta, momentum=momentum)

        def before(step: Step, z: torch.Tensor, tensors: dict) -> torch.Tensor:
            todo = plan[step.index]
            if todo.blend:
                eps = randn_tensor(z.shape, generator=generator, device=device, dtype=torch.float32)
                z = blend(z, noised(source, eps, alpha_bar(step.timestep)), latent_hole)
            if todo.optimise:
                z = optimise(step, z, tensors)
            return z

        tensors = {"prompt_embeds": prompt_embeds}
        if cfg:
            tensors["negative_prompt_embeds"] = negative_embeds
        elif "negative_prompt_embeds" in names:
            raise InputError("negative_prompt_embeds exists only with guidance_scale > 1",
                             "callback_on_step_end_tensor_inputs")
        with frozen(self.unet, self.controlnet, self.adapter, self.vae, self.text_encoder, self.image_encoder), \
                controller:
            latents = denoise(self, latents, timesteps, noise, tensors=tensors, before=before,
                              extra_step_kwargs=self.prepare_extra_step_kwargs(generator, 0.0),
                              callback_on_step_end=callback_on_step_end, callback_on_step_end_tensor_inputs=names)

        if output_type == "latent":
            result = latents
        else:
            pixels = torch.cat([decode(self.vae, latents[i:i + 1].to(self.vae.dtype), image=image[i:i + 1].to(device),
                                       mask=hole[i:i + 1].to(device)) for i in range(batch)]).float()
            result = finish(self, pixels, image=image, mask=hole, paste_back=paste_back, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (result,)
        return ImagePipelineOutput(images=result)

    # ------------------------------------------------------------------ helpers
    def conditional_noise(self, z: torch.Tensor, t: torch.Tensor, prompt_embeds: torch.Tensor,
                          conditioning: "_Conditioning") -> torch.Tensor:
        """The gradient pass's forward: ε(z_t, t, c) on the conditional prompt only (no CFG; code ``optimize_xt``),
        with the adapters' conditional inputs; a ControlNet runs on ``z`` inside the graph."""
        x = self.scheduler.scale_model_input(z, t).to(self.unet.dtype)
        return self.unet(x, t, encoder_hidden_states=prompt_embeds, return_dict=False,
                         **self._adapter_kwargs(x, t, prompt_embeds, conditioning, guided=False))[0]

    def _adapter_kwargs(self, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, c: "_Conditioning",
                        guided: bool) -> dict:
        """UNet keyword arguments of the optional adapters for a guided (``[uncond, cond]``) or a conditional call:
        ControlNet residuals computed on ``x`` (inside the gradient pass they carry the gradient), T2I-Adapter states
        and IP-Adapter image embeddings (their conditional half in the gradient pass)."""
        kwargs: dict = {}
        double = guided and c.cfg
        if c.control is not None:
            cond = torch.cat([c.control] * 2) if double else c.control
            down, mid = self.controlnet(x, t, encoder_hidden_states=embeds, controlnet_cond=cond,
                                        conditioning_scale=c.control_scale, return_dict=False)
            kwargs.update(down_block_additional_residuals=down, mid_block_additional_residual=mid)
        if c.adapter is not None:  # the UNet pops these, so each call gets its own list
            kwargs["down_intrablock_additional_residuals"] = [torch.cat([s] * 2) if double else s.clone()
                                                              for s in c.adapter]
        if c.ip is not None:
            kwargs["added_cond_kwargs"] = {"image_embeds": c.ip if guided or not c.cfg
                                           else [e.chunk(2)[1] for e in c.ip]}
        return kwargs

    def _check_options(self, steps, interval, ops, gamma, lr_schedule, coef_schedule, mask_convention, output_type,
                       control_image, adapter_image, ip_adapter_image, ip_adapter_image_embeds) -> None:
        checks = [
            (steps >= 1, "num_inference_steps", f"must be >= 1, got {steps}"),
            (interval >= 1, "op_interval", f"must be >= 1, got {interval}"),
            (ops >= 0, "num_gradient_ops", f"must be >= 0, got {ops}"),
            (0 <= gamma <= 1, "gamma", f"must be in [0, 1], got {gamma}"),
            (lr_schedule in LR_SCHEDULES, "lr_schedule", f"must be one of {LR_SCHEDULES}, got {lr_schedule!r}"),
            (coef_schedule in COEF_SCHEDULES, "coef_schedule",
             f"must be one of {COEF_SCHEDULES}, got {coef_schedule!r}"),
            (mask_convention in MASK_CONVENTIONS, "mask_convention",
             f"must be one of {MASK_CONVENTIONS}, got {mask_convention!r}"),
            (output_type in ("pil", "np", "pt", "latent"), "output_type",
             f"must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}"),
            (control_image is None or self.controlnet is not None, "control_image",
             "given but the pipeline has no controlnet; pass controlnet= when loading"),
            (adapter_image is None or self.adapter is not None, "adapter_image",
             "given but the pipeline has no adapter; pass adapter= (a T2IAdapter) when loading"),
            ((ip_adapter_image is None and ip_adapter_image_embeds is None)
             or getattr(self.unet, "encoder_hid_proj", None) is not None, "ip_adapter_image",
             "given but no IP-Adapter is loaded; call pipe.load_ip_adapter(...) first"),
            (self.controlnet is None or control_image is not None, "control_image",
             "the pipeline has a controlnet but no control_image was given"),
            (getattr(self.unet, "encoder_hid_proj", None) is None or ip_adapter_image is not None
             or ip_adapter_image_embeds is not None, "ip_adapter_image",
             "an IP-Adapter is loaded but no ip_adapter_image was given"),
        ]
        for ok, field, message in checks:
            if not ok:
                raise InputError(message, field)
        prediction = self.scheduler.config.get("prediction_type", "epsilon")
        if prediction != "epsilon":
            raise InputError(f"PILOT's one-step x0 here needs an epsilon-prediction model, got "
                             f"prediction_type={prediction!r}", "scheduler")


class _Conditioning:
    """The optional adapter inputs of one call (ControlNet image and scale, T2I-Adapter states, IP-Adapter
    embeddings ``[uncond, cond]`` under CFG)."""

    def __init__(self, cfg: bool):
        self.cfg = cfg
        self.control: torch.Tensor | None = None
        self.control_scale = 1.0
        self.adapter: list[torch.Tensor] | None = None
        self.ip: list[torch.Tensor] | None = None


__all__ = ["PilotInpaintPipeline", "MASK_CONVENTIONS", "SIZE_MULTIPLE"]

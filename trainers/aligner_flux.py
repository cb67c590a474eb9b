"""Training ASUKA's FLUX alignment heads (:class:`~asuka.models.flux_aligner.FluxPriorAligner`) through the frozen
FLUX.1-Fill-dev transformer (ASUKA paper §3.2; the FLUX port's training, asuka-flux README and issues #7/#10: 9K steps,
global batch 256, 512² images, 4×80 GB; its script is unreleased, commit ``776aaad`` shows ``--proportion_empty_prompts``).

Per step, for ``image`` (B,3,H,W) in [-1,1] and ``asuka_train`` hole masks:

1. condition: ``F = MAE.prior(image, mask)`` of the frozen MAE; with probability ``p`` (per sample; 1 -> 0.1 over the
   first 2K steps, as the SD aligner, :func:`trainers.alignment.reconstructed_prior_probability`) the MAE *reconstructed*
   prior instead (all-zero mask). ``text, pooled = aligner(F)`` (T5 head tokens, CLIP head token mean). With
   probability ``empty_condition_prob`` per sample the condition is replaced by the null (empty-prompt) embeddings —
   the official ``--proportion_empty_prompts``, which is what makes the inference-time interpolation toward the nulls
   meaningful. No interpolation during training (w = 1).
2. rectified-flow loss of FLUX through the frozen transformer: ``x0`` = packed FLUX latent of the image
   (``(E(x) - shift)·scale``), ``ε ~ N(0, I)``, ``σ`` from ``timestep_sampling`` (``"logit_normal"``: sigmoid of N(0,1),
   SD3/FLUX training; ``"uniform"``), shifted by FLUX's resolution rule when ``shift_sigmas`` (the inference schedule's
   ``time_shift(mu, 1, σ)``); ``x_σ = (1-σ)·x0 + σ·ε``; transformer input ``cat[x_σ, packed E(image·(1-mask)),
   packed 8×8 mask]`` (diffusers' ``FluxFillPipeline.prepare_mask_latents``, reused), distilled guidance
   ``guidance_scale`` (30, the Fill value used at inference [infer]), zero text ids; loss
   ``‖(ε - x0) - v̂‖²`` in float32.

Frozen, never in checkpoints: the MAE, the transformer and the VAE (``frozen_dtype``, bf16 on CUDA); gradients flow
through the transformer (checkpointed) to the heads. Trainable: both heads (≈1.04 B parameters at release size).
The null embeddings are buffers of the aligner: ``null_embeddings = [vec.pt, txt_256.pt]`` (the release's) or, when
unset, the FLUX folder's CLIP/T5 encoders on ``""`` (256 tokens), computed once in :meth:`load_pretrained`.

Distributed strategy for the 12 B transformer on 8×80 GB: **DDP** (``configs/aligner_flux.yaml``). Per GPU the frozen
bf16 transformer takes 23.8 GB, the VAE/MAE < 1 GB, the trainable heads with fp32 weights, gradients and AdamW moments
16 B/parameter × 1.04 B ≈ 17 GB, leaving ≈ 35 GB for activations of a per-GPU batch of 4 at 512² (1024 image + 256
text tokens) with gradient checkpointing of the transformer blocks. FSDP would shard only what trains (the heads,
17 GB) and gather the frozen transformer's weights every block, twice per step (forward and recompute) — pure
communication for nothing that DDP does not already fit; use FSDP (``strategy: fsdp``) only on < 48 GB GPUs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux_fill import calculate_shift

from asuka.models.flux_aligner import FluxPriorAligner
from asuka.models.mae import MAEPrior
from trainers.alignment import AlignmentStage

__all__ = ["FluxAlignerModule", "drop_to_null", "flow_matching_sigmas", "flux_fill_source"]

DEFAULT_FLUX_FILL = "black-forest-labs/FLUX.1-Fill-dev"
TIMESTEP_SAMPLING = ("logit_normal", "uniform")


def flux_fill_source(path: str | Path) -> str:
    """A FLUX.1-Fill pipeline folder (must hold ``transformer/``), a hub id, or ``"tiny"`` (the tiny CPU-demo folder)."""
    from asuka.weights import resolve_pretrained

    if str(path) == "tiny":
        from asuka.models.tiny_flux import default_tiny_flux_fill_dir

        path = default_tiny_flux_fill_dir()
    return resolve_pretrained(path, field="flux_fill", marker="transformer/config.json",
                              what="diffusers FLUX.1-Fill pipeline ('tiny' for the demo one)")


def flow_matching_sigmas(batch: int, generator: torch.Generator, device: torch.device, *, sampling: str,
                         mu: float | None) -> torch.Tensor:
    """Per-sample noise levels σ ∈ (0, 1): ``sigmoid(N(0,1))`` or ``U(0,1)``, then FLUX's shift
    ``e^mu / (e^mu + (1/σ - 1))`` when ``mu`` is given (the scheduler's exponential time shift)."""
    if sampling == "logit_normal":
        sigmas = torch.sigmoid(torch.randn(batch, generator=generator, device=device))
    elif sampling == "uniform":
        sigmas = torch.rand(batch, generator=generator, device=device)
    else:
        raise ValueError(f"timestep_sampling must be one of {TIMESTEP_SAMPLING}, got {sampling!r}")
    if mu is not None:
        sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas.clamp_min(1e-6) - 1))
    return sigmas


def drop_to_null(condition: torch.Tensor, null: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """``condition`` with the samples flagged in ``drop`` (B,) bool replaced by ``null`` (broadcast over the batch)."""
    shape = (-1,) + (1,) * (condition.ndim - 1)
    return torch.where(drop.view(shape), null.to(condition.dtype).expand_as(condition), condition)


class FluxAlignerModule(AlignmentStage):
    """LightningModule training :class:`FluxPriorAligner` through frozen FLUX.1-Fill; exports the ``FluxPriorAligner``.

    Loading, freezing, the steps, the image grid and the optimizer are :class:`trainers.alignment.AlignmentStage`'s.

    Args:
        mae: ``MAEPrior`` save_pretrained folder (frozen).
        flux_fill: FLUX.1-Fill pipeline folder or hub id (transformer, vae, scheduler, text encoders for the nulls),
            or ``"tiny"``.
        aligner: ``FluxPriorAligner`` config overrides (default: the release's 512 -> 768 / 4096, 4 blocks, head 64).
        null_embeddings: ``[vec.pt, txt_256.pt]`` or null (computed from ``flux_fill``'s text encoders on ``""``).
        lr, betas, weight_decay, warmup_steps: AdamW and a linear warm-up then constant (the port's values are
            unreleased; lr 1e-4 is the FLUX fine-tuning norm, the paper's SD value 5e-2 looks like a typo).
        p_start / p_end / p_decay_steps: reconstructed-prior probability schedule (paper: 1.0 -> 0.1 over 2,000).
        empty_condition_prob: per-sample probability of training on the null embeddings (``--proportion_empty_prompts``;
            the port's value is unreleased, 0.1 is the usual choice).
        guidance_scale: distilled guidance fed to the transformer during training.
        timestep_sampling / shift_sigmas: the flow-matching σ distribution (module docstring).
        frozen_dtype: ``"bfloat16"``, ``"float16"``, ``"float32"`` or None (bf16 on CUDA, float32 otherwise).
        gradient_checkpointing: recompute the transformer's blocks (and the heads') in backward.
        compile: ``torch.compile`` the costly modules (:meth:`compiled_parts`) in place at setup (GPU speed).
        val_sampling_steps: Euler steps of the sampled inpaintings in the image grids.
        seed: seed of the per-step draws (resumable).
    """

    denoiser_folder = "transformer"
    denoiser_class = FluxTransformer2DModel
    noise_scheduler_class = FlowMatchEulerDiscreteScheduler
    sample_column = "asuka_flux"
    describe = ("FLUX aligner", "FLUX.1-Fill")
    transformer: FluxTransformer2DModel | None
    noise_scheduler: FlowMatchEulerDiscreteScheduler | None
    aligner: FluxPriorAligner

    def __init__(
        self,
        mae: str,
        flux_fill: str = DEFAULT_FLUX_FILL,
        aligner: dict[str, Any] | None = None,
        null_embeddings: list[str] | None = None,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.01,
        warmup_steps: int = 0,
        p_start: float = 1.0,
        p_end: float = 0.1,
        p_decay_steps: int = 2000,
        empty_condition_prob: float = 0.1,
        guidance_scale: float = 30.0,
        timestep_sampling: str = "logit_normal",
        shift_sigmas: bool = True,
        frozen_dtype: str | None = None,
        gradient_checkpointing: bool = True,
        val_sampling_steps: int = 10,
        seed: int = 0,
        max_consecutive_nonfinite: int = 20,
        compile: bool = False,
    ) -> None:
        super().__init__(p_start=p_start, p_end=p_end, p_decay_steps=p_decay_steps, frozen_dtype=frozen_dtype,
                         val_sampling_steps=val_sampling_steps, max_consecutive_nonfinite=max_consecutive_nonfinite,
                         compile=compile)
        self.save_hyperparameters()
        if not 0.0 <= empty_condition_prob <= 1.0:
            raise ValueError(f"empty_condition_prob must be in [0, 1], got {empty_condition_prob}")
        if timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(f"timestep_sampling must be one of {TIMESTEP_SAMPLING}, got {timestep_sampling!r}")
        if null_embeddings is not None and len(null_embeddings) != 2:
            raise ValueError("null_embeddings must be [vec.pt, txt_256.pt] (pooled, text) or null")
        self.aligner = FluxPriorAligner(**(aligner or {}))
        self._pipe = None  # AsukaFluxFillPipeline on the frozen parts (not a module: nothing of it is saved twice)

    # ------------------------------------------------------------------ weights
    def pretrained_source(self) -> str:
        return flux_fill_source(self.hparams.flux_fill)

    def check_pretrained(self, mae: MAEPrior, transformer: FluxTransformer2DModel) -> None:
        hp, cfg = self.hparams, self.aligner.config
        if mae.feature_dim != cfg.in_dim or mae.num_tokens != cfg.null_tokens:
            raise ValueError(f"the MAE at {hp.mae!r} gives {mae.num_tokens} tokens of {mae.feature_dim} features but "
                             f"the aligner takes in_dim={cfg.in_dim}, null_tokens={cfg.null_tokens}; set "
                             f"model.init_args.aligner.in_dim / null_tokens")
        if (cfg.text_dim, cfg.pooled_dim) != (transformer.config.joint_attention_dim,
                                              transformer.config.pooled_projection_dim):
            raise ValueError(f"the transformer of {hp.flux_fill!r} takes {transformer.config.joint_attention_dim}-d "
                             f"text / {transformer.config.pooled_projection_dim}-d pooled conditions; set "
                             "model.init_args.aligner.text_dim / pooled_dim")

    def prepare_aligner(self, source: str, dtype: torch.dtype) -> None:
        """Checkpointing of the heads with the transformer's; the null embeddings (files, else the text encoders)."""
        from asuka.models.convert import read_tensor
        from asuka.pipelines.asuka_flux.pipeline import empty_prompt_embeddings

        hp = self.hparams
        if hp.gradient_checkpointing:
            self.aligner.enable_gradient_checkpointing()
        if hp.null_embeddings is not None:
            nulls = [read_tensor(path) for path in hp.null_embeddings]
        else:
            nulls = empty_prompt_embeddings(source, self.aligner.config.null_tokens, torch_dtype=dtype)
        self.aligner.set_null_embeddings(*nulls)

    def pipeline(self):
        """An :class:`~asuka.pipelines.asuka_flux.AsukaFluxFillPipeline` on the current weights (FLUX vae decoder),
        built once: its FLUX.1-Fill latent helpers also prepare the training inputs."""
        from asuka.pipelines.asuka_flux.pipeline import AsukaFluxFillPipeline

        self._require_frozen()
        if self._pipe is None:
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.noise_scheduler.config)
            self._pipe = AsukaFluxFillPipeline(vae=self.vae, transformer=self.transformer, mae=self.mae,
                                               aligner=self.aligner, scheduler=scheduler)
            self._pipe.set_progress_bar_config(disable=True)
        return self._pipe

    # ------------------------------------------------------------------ loss
    def condition(self, image: torch.Tensor, mae_mask: torch.Tensor, drop: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(text, pooled)`` of the aligner for the MAE prior (masks zeroed per sample = reconstructed prior); samples
        flagged in ``drop`` get the null embeddings instead."""
        with torch.no_grad():
            features = self.mae.prior(image, mae_mask, return_image=False).features
        text, pooled = self.aligner(features.to(self.aligner.dtype))
        return drop_to_null(text, self.aligner.null_text, drop), drop_to_null(pooled, self.aligner.null_pooled, drop)

    def flow_matching_loss(self, image: torch.Tensor, mask: torch.Tensor, mae_mask: torch.Tensor, drop: torch.Tensor,
                           generator: torch.Generator) -> torch.Tensor:
        """FLUX.1-Fill's rectified-flow velocity MSE with the aligned MAE condition (module docstring)."""
        self._require_frozen()
        hp = self.hparams
        pipe = self.pipeline()
        vae, transformer = self.vae, self.transformer
        dtype = transformer.dtype
        b, _, height, width = image.shape
        device = image.device
        with torch.no_grad():
            shift, scale = vae.config.shift_factor, vae.config.scaling_factor
            latents = (vae.encode(image.to(vae.dtype)).latent_dist.sample(generator) - shift) * scale
            h, w = latents.shape[-2:]
            x0 = pipe._pack_latents(latents, b, latents.shape[1], h, w).to(dtype)
            masked = (image * (1 - mask)).to(vae.dtype)
            mask_latents, masked_latents = pipe.prepare_mask_latents(mask.to(dtype), masked, b, latents.shape[1], 1,
                                                                     height, width, dtype, device, generator)
            cond = torch.cat((masked_latents, mask_latents), dim=-1)
            noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
            mu = None
            if hp.shift_sigmas:
                cfg = self.noise_scheduler.config
                mu = calculate_shift(x0.shape[1], cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                                     cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
            sigmas = flow_matching_sigmas(b, generator, device, sampling=hp.timestep_sampling, mu=mu)
            s = sigmas.view(-1, 1, 1).to(dtype)
            noisy = (1 - s) * x0 + s * noise
            target = (noise - x0).float()
            image_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, device, dtype)
        text, pooled = self.condition(image, mae_mask, drop)
        text_ids = torch.zeros(text.shape[1], 3, device=device, dtype=dtype)
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full((b,), hp.guidance_scale, device=device, dtype=torch.float32)
        pred = transformer(hidden_states=torch.cat((noisy, cond), dim=2), timestep=sigmas.to(dtype), guidance=guidance,
                           pooled_projections=pooled.to(dtype), encoder_hidden_states=text.to(dtype), txt_ids=text_ids,
                           img_ids=image_ids, return_dict=False)[0]
        return F.mse_loss(pred.float(), target)

    def training_loss(self, image: torch.Tensor, mask: torch.Tensor, mae_mask: torch.Tensor,
                      generator: torch.Generator) -> torch.Tensor:
        """The flow-matching loss with ``empty_condition_prob`` of the samples on the null embeddings."""
        drop = torch.rand(image.shape[0], generator=generator, device=image.device) < self.hparams.empty_condition_prob
        return self.flow_matching_loss(image, mask, mae_mask, drop, generator)

    def validation_loss(self, image: torch.Tensor, mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        keep = torch.zeros(image.shape[0], dtype=torch.bool, device=image.device)
        return self.flow_matching_loss(image, mask, mask, keep, generator)

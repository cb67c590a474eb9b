"""Alignment-module training (ASUKA paper §3.2 and §4; the FLUX port's head, Yikai-Wang/asuka-misato ``asuka-flux/src/flux``).

Per step, for a batch ``image`` (B,3,H,W) in [-1,1] (512² in the paper) and hole masks from the ``asuka_train``
recipe (the MAE's masking, paper §3.2):

1. condition: ``C = aligner(F)`` with ``F = MAE.prior(image, mask).features`` (B,256,512), the frozen MAE's prior
   of the masked image. With probability ``p`` (per sample) ``F`` is the MAE *reconstructed* prior instead — the
   same call with an all-zero mask (paper §3.2 "Misalignment"); both are one MAE pass (the swapped samples' masks
   are zeroed). ``p`` falls linearly from 1.0 to 0.1 over the first 2,000 optimizer steps, then stays
   (:func:`trainers.alignment.reconstructed_prior_probability`, paper §4).
2. SD's ε-prediction objective through the frozen SD-1.5-inpainting UNet: ``z0 = s·E(image)``, ``t ~ U{0..T-1}``,
   ``z_t = add_noise(z0, ε, t)`` with the UNet's training schedule (``DDPMScheduler`` from the SD folder's
   scheduler config), UNet input ``[z_t, mask↓, s·E(image·(1-mask))]`` with ``mask↓`` = nearest interpolation to
   the latent size (as diffusers' inpainting pipeline), ``encoder_hidden_states = C``;
   loss ``‖ε - ε̂‖²`` (``v`` target when the scheduler says ``v_prediction``).

Frozen, never written into checkpoints: the MAE prior (an ``MAEPrior`` export), the UNet and the VAE (a diffusers
SD-inpainting folder or hub id; ``frozen_dtype`` bf16 by default on GPU). The gradient flows through the frozen UNet
to ``C``; ``gradient_checkpointing`` recomputes the UNet's blocks in backward (diffusers ≥ 0.32 gates checkpointing on
``torch.is_grad_enabled()``, not on ``unet.training``, so the frozen parts stay in ``eval()`` mode throughout).

Optimizer: AdamW with **lr 5e-2, the paper's stated value** (§4). It looks implausibly high for transformer blocks
(possibly a typo; no released code confirms it) — it is exposed as ``lr``; ``warmup_steps`` adds a linear warm-up
(0 = none, the paper names none). betas / weight decay are torch's AdamW defaults (0.9, 0.999) / 0.01: the paper
does not state them.

Validation: the ε-loss on the fixed validation cases with the masked prior (no swap) and a fixed noise seed, and
image grids (:class:`trainers.callbacks.ImageLogger`) of ASUKA inpaintings sampled with ``val_sampling_steps`` DDIM
steps through :class:`asuka.pipelines.asuka.AsukaInpaintPipeline` (SD's VAE decoder, paste-back on).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel

from asuka.models.aligner import PriorAligner
from asuka.models.mae import MAEPrior
from asuka.models.tiny import expand_tiny
from trainers.alignment import AlignmentStage

__all__ = ["AlignerModule", "sd_inpaint_source"]

PAPER_LR = 5e-2
DEFAULT_SD_INPAINT = "stable-diffusion-v1-5/stable-diffusion-inpainting"


def sd_inpaint_source(path: str | Path) -> str:
    """An SD-inpainting pipeline folder (must hold ``unet/``), a hub id, or ``"tiny"`` (the tiny CPU-demo folder)."""
    from asuka.weights import resolve_pretrained

    return resolve_pretrained(expand_tiny(path), field="sd_inpaint", marker="unet/config.json",
                              what="diffusers SD-inpainting pipeline ('tiny' for the demo one)")


class AlignerModule(AlignmentStage):
    """LightningModule training :class:`~asuka.models.aligner.PriorAligner`; exports the ``PriorAligner``.

    Loading, freezing, the steps, the image grid and the optimizer are :class:`trainers.alignment.AlignmentStage`'s.

    Args:
        mae: ``MAEPrior`` save_pretrained folder (the fine-tuned prior; frozen).
        sd_inpaint: SD-1.5-inpainting pipeline folder or hub id (UNet, VAE, scheduler config; frozen), or ``"tiny"``.
        aligner: ``PriorAligner`` config overrides (default: the paper's 512 -> 768, 4 pre-LN blocks).
        lr: AdamW learning rate (paper: 5e-2, see the module docstring). ``betas``/``weight_decay``: AdamW's.
        warmup_steps: linear learning-rate warm-up (0 = constant, as stated in the paper).
        p_start / p_end / p_decay_steps: reconstructed-prior probability schedule (paper: 1.0 -> 0.1 over 2,000).
        frozen_dtype: dtype of the frozen UNet, VAE and MAE: ``"bfloat16"``, ``"float16"``, ``"float32"`` or
            ``None`` = bf16 on CUDA, float32 otherwise.
        gradient_checkpointing: recompute the frozen UNet's blocks in backward (memory; the paper trains at 512²).
        compile: ``torch.compile`` the costly modules (:meth:`compiled_parts`) in place at setup (GPU speed).
        val_sampling_steps: DDIM steps of the sampled inpaintings in the image grids.
        seed: seed of the per-step noise, timesteps and swap draws (a resumed run draws what an uninterrupted one
            would).
    """

    denoiser_folder = "unet"
    denoiser_class = UNet2DConditionModel
    noise_scheduler_class = DDPMScheduler
    sample_column = "asuka"
    describe = ("aligner", "SD-inpainting")
    unet: UNet2DConditionModel | None
    noise_scheduler: DDPMScheduler | None
    aligner: PriorAligner

    def __init__(
        self,
        mae: str,
        sd_inpaint: str = DEFAULT_SD_INPAINT,
        aligner: dict[str, Any] | None = None,
        lr: float = PAPER_LR,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.01,
        warmup_steps: int = 0,
        p_start: float = 1.0,
        p_end: float = 0.1,
        p_decay_steps: int = 2000,
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
        self.aligner = PriorAligner(**(aligner or {}))

    # ------------------------------------------------------------------ weights
    def pretrained_source(self) -> str:
        return sd_inpaint_source(self.hparams.sd_inpaint)

    def check_pretrained(self, mae: MAEPrior, unet: UNet2DConditionModel) -> None:
        hp, cfg = self.hparams, self.aligner.config
        if mae.feature_dim != cfg.in_dim:
            raise ValueError(f"the MAE at {hp.mae!r} gives {mae.feature_dim}-d features but aligner.in_dim is "
                             f"{cfg.in_dim}; set model.init_args.aligner.in_dim: {mae.feature_dim}")
        if unet.config.cross_attention_dim != cfg.cross_attention_dim:
            raise ValueError(f"the UNet of {hp.sd_inpaint!r} takes {unet.config.cross_attention_dim}-d conditions but "
                             f"aligner.cross_attention_dim is {cfg.cross_attention_dim}")
        if unet.config.in_channels != 9:
            raise ValueError(f"sd_inpaint={hp.sd_inpaint!r} is not an inpainting model (UNet in_channels "
                             f"{unet.config.in_channels}, expected 9)")

    # ------------------------------------------------------------------ loss
    def condition(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Aligner output for the MAE prior of the masked image; ``mask`` zeroed per sample = reconstructed prior."""
        with torch.no_grad():
            features = self.mae.prior(image, mask, return_image=False).features
        return self.aligner(features.float())

    def diffusion_loss(self, image: torch.Tensor, mask: torch.Tensor, mae_mask: torch.Tensor,
                       generator: torch.Generator) -> torch.Tensor:
        """SD's ε-prediction MSE with ``encoder_hidden_states = aligner(MAE(image, mae_mask))`` (module docstring)."""
        self._require_frozen()
        vae, unet, scheduler = self.vae, self.unet, self.noise_scheduler
        dtype = unet.dtype
        b = image.shape[0]
        with torch.no_grad():
            scale = vae.config.scaling_factor
            latents = vae.encode(image.to(dtype)).latent_dist.sample(generator) * scale
            masked = vae.encode((image * (mask < 0.5)).to(dtype)).latent_dist.sample(generator) * scale
            mask_latent = F.interpolate(mask.to(dtype), size=latents.shape[-2:])  # nearest, as diffusers
            noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator,
                              device=latents.device)
            noisy = scheduler.add_noise(latents, noise, t)
            if scheduler.config.prediction_type == "v_prediction":
                target = scheduler.get_velocity(latents, noise, t)
            else:
                target = noise
        cond = self.condition(image, mae_mask).to(dtype)
        pred = unet(torch.cat([noisy, mask_latent, masked], dim=1), t, encoder_hidden_states=cond,
                    return_dict=False)[0]
        return F.mse_loss(pred.float(), target.float())

    def training_loss(self, image: torch.Tensor, mask: torch.Tensor, mae_mask: torch.Tensor,
                      generator: torch.Generator) -> torch.Tensor:
        return self.diffusion_loss(image, mask, mae_mask, generator)

    def validation_loss(self, image: torch.Tensor, mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.diffusion_loss(image, mask, mask, generator)

    def pipeline(self):
        """An :class:`~asuka.pipelines.asuka.AsukaInpaintPipeline` on the current weights (DDIM, SD's VAE decoder)."""
        from asuka.pipelines.asuka import AsukaInpaintPipeline

        self._require_frozen()
        pipe = AsukaInpaintPipeline(vae=self.vae, unet=self.unet, mae=self.mae, aligner=self.aligner,
                                    scheduler=DDIMScheduler.from_config(self.noise_scheduler.config))
        pipe.set_progress_bar_config(disable=True)
        return pipe

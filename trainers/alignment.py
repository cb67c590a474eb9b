"""What the two alignment-module trainers share (ASUKA paper §3.2 and §4): the reconstructed-prior schedule and swap,
and :class:`AlignmentStage`, the base of :class:`trainers.aligner.AlignerModule` (SD-1.5-inpainting UNet) and
:class:`trainers.aligner_flux.FluxAlignerModule` (FLUX.1-Fill transformer).

Both train an aligner on the frozen MAE's prior through a frozen denoiser and VAE of one diffusers pipeline folder,
with the same step: per sample, the MAE sees the hole mask or, with probability ``p`` (1 -> 0.1 over the first
2,000 optimizer steps, :func:`reconstructed_prior_probability`), an all-zero mask (the *reconstructed* prior,
:func:`swap_to_reconstructed`); the loss is the denoiser's training objective conditioned on the aligner's output.
The base holds everything but the denoiser's own parts: loading and freezing the MAE, denoiser and VAE (kept out of
checkpoints, in eval mode), the ``p`` schedule, the training and validation steps, the image grid (input | masked |
MAE prior | sampled inpainting) and AdamW with a linear warm-up then a constant learning rate. A subclass names its
denoiser (:attr:`AlignmentStage.denoiser_folder`, also its attribute name, and classes) and implements the
objective (:meth:`~AlignmentStage.training_loss`, :meth:`~AlignmentStage.validation_loss`), the checks of the loaded
parts against the aligner's configuration and the inference pipeline of the image grid.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import AutoencoderKL
from lightning.pytorch.utilities import rank_zero_info

from asuka.models.mae import MAEPrior
from trainers.base import StageModule, adamw, warmup_cosine_scheduler

__all__ = ["AlignmentStage", "reconstructed_prior_probability", "swap_to_reconstructed"]


def reconstructed_prior_probability(step: int, start: float = 1.0, end: float = 0.1, decay_steps: int = 2000) -> float:
    """``p`` at optimizer step ``step``: linear from ``start`` to ``end`` over ``decay_steps`` steps, then ``end``."""
    if decay_steps < 0 or not (0.0 <= start <= 1.0 and 0.0 <= end <= 1.0):
        raise ValueError(f"need decay_steps >= 0 and probabilities in [0, 1], got start={start}, end={end}, "
                         f"decay_steps={decay_steps}")
    if decay_steps == 0 or step >= decay_steps:
        return end
    return start + (end - start) * max(step, 0) / decay_steps


def swap_to_reconstructed(mask: torch.Tensor, p: float | torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The MAE's mask per sample: all-zero (the reconstructed prior) with probability ``p``, else ``mask``.

    ``p``: a number or a 0-d tensor (on ``mask``'s device).
    """
    swap = torch.rand(mask.shape[0], generator=generator, device=mask.device) < p
    return mask * (~swap).view(-1, 1, 1, 1).to(mask.dtype)


class AlignmentStage(StageModule, ABC):
    """Base of the alignment-module trainers (module docstring).

    A subclass's ``__init__`` calls ``super().__init__`` with the shared arguments, then ``save_hyperparameters()``
    (the hyper-parameters this base reads: ``mae``, ``lr``, ``betas``, ``weight_decay``, ``warmup_steps``,
    ``p_decay_steps``, ``frozen_dtype``, ``gradient_checkpointing``, ``val_sampling_steps``, ``seed``), then builds
    ``self.aligner``.
    """

    denoiser_folder: ClassVar[str]
    """The denoiser's subfolder in the pipeline folder, also this module's attribute holding it (``unet``)."""
    denoiser_class: ClassVar[type]
    noise_scheduler_class: ClassVar[type]
    sample_column: ClassVar[str]
    """The image-grid column of the sampled inpainting."""
    describe: ClassVar[tuple[str, str]]
    """(this stage, the pipeline folder's model) in the loading log line."""

    def __init__(self, *, p_start: float, p_end: float, p_decay_steps: int, frozen_dtype: str | None,
                 val_sampling_steps: int, max_consecutive_nonfinite: int, compile: bool) -> None:
        super().__init__(max_consecutive_nonfinite=max_consecutive_nonfinite, compile=compile)
        # p per optimizer step up to the end of the decay, on the module's device: indexing it needs no host-to-device
        # copy per step (logging a Python float does: Lightning makes a device tensor of it, a sync on CUDA).
        # float64: comparisons cast it exactly as they cast a Python float. Not persistent: derived from hparams.
        schedule = [reconstructed_prior_probability(step, p_start, p_end, p_decay_steps)
                    for step in range(max(p_decay_steps, 0) + 1)]  # step 0 validates the arguments
        self.register_buffer("p_schedule", torch.tensor(schedule, dtype=torch.float64), persistent=False)
        if frozen_dtype not in (None, "bfloat16", "float16", "float32"):
            raise ValueError(f"frozen_dtype must be 'bfloat16', 'float16', 'float32' or null, got {frozen_dtype!r}")
        if val_sampling_steps < 1:
            raise ValueError(f"val_sampling_steps must be >= 1, got {val_sampling_steps}")
        # Frozen parts, built by load_pretrained (never in checkpoints).
        self.mae: MAEPrior | None = None
        setattr(self, self.denoiser_folder, None)
        self.vae: AutoencoderKL | None = None
        self.noise_scheduler = None

    # ------------------------------------------------------------------ subclass hooks
    @abstractmethod
    def pretrained_source(self) -> str:
        """The checked pipeline folder or hub id of the frozen denoiser, VAE and scheduler."""

    @abstractmethod
    def check_pretrained(self, mae: MAEPrior, denoiser: torch.nn.Module) -> None:
        """Raise ``ValueError`` naming the setting to change when the loaded parts do not fit the aligner."""

    def prepare_aligner(self, source: str, dtype: torch.dtype) -> None:
        """Called by :meth:`load_pretrained` once the frozen parts are loaded (default: nothing)."""

    @abstractmethod
    def training_loss(self, image: torch.Tensor, mask: torch.Tensor, mae_mask: torch.Tensor,
                      generator: torch.Generator) -> torch.Tensor:
        """The training objective with the MAE seeing ``mae_mask`` (per-sample swapped), drawing from ``generator``."""

    @abstractmethod
    def validation_loss(self, image: torch.Tensor, mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The objective on a fixed validation case: the masked prior, nothing dropped."""

    @abstractmethod
    def pipeline(self) -> Any:
        """The inference pipeline on the current weights, sampling the image grid's inpaintings."""

    # ------------------------------------------------------------------ weights
    @property
    def denoiser(self) -> torch.nn.Module | None:
        return getattr(self, self.denoiser_folder)

    def compiled_parts(self) -> list[torch.nn.Module]:
        """The aligner and the frozen denoiser (most of the step's cost)."""
        return [self.aligner, self.denoiser]

    def exportable(self) -> torch.nn.Module:
        return self.aligner

    def _frozen_dtype(self) -> torch.dtype:
        name = self.hparams.frozen_dtype
        if name is None:
            return torch.bfloat16 if torch.cuda.is_available() else torch.float32
        return getattr(torch, name)

    def load_pretrained(self) -> None:
        hp = self.hparams
        mae_path = Path(hp.mae).expanduser()
        if not (mae_path / "config.json").is_file():
            raise FileNotFoundError(f"mae={hp.mae!r} is not an MAEPrior save_pretrained folder (no config.json); "
                                    "train it with configs/mae.yaml or convert mae_300.pth, and pass its folder")
        source = self.pretrained_source()
        dtype = self._frozen_dtype()
        mae = MAEPrior.from_pretrained(mae_path, torch_dtype=dtype)
        denoiser = self.denoiser_class.from_pretrained(source, subfolder=self.denoiser_folder, torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype)
        self.check_pretrained(mae, denoiser)
        for module in (mae, denoiser, vae):
            module.requires_grad_(False).eval()
        if hp.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        self.prepare_aligner(source, dtype)
        self.mae, self.vae = mae, vae
        setattr(self, self.denoiser_folder, denoiser)
        self.noise_scheduler = self.noise_scheduler_class.from_pretrained(source, subfolder="scheduler")
        stage, model = self.describe
        rank_zero_info(f"{stage}: frozen MAE {hp.mae}, {model} {source} ({dtype}); lr {hp.lr}")

    def train(self, mode: bool = True) -> "AlignmentStage":
        """Only the aligner switches to training mode; the frozen parts stay in eval mode."""
        super().train(mode)
        for module in (self.mae, self.denoiser, self.vae):
            if module is not None:
                module.eval()
        return self

    def _require_frozen(self) -> None:
        if self.denoiser is None:
            raise RuntimeError("frozen parts not loaded: call load_pretrained() (Lightning does in setup('fit'))")

    # ------------------------------------------------------------------ steps
    def reconstructed_probability(self) -> torch.Tensor:
        """:func:`reconstructed_prior_probability` at the current optimizer step, a 0-d tensor on the device."""
        return self.p_schedule[min(self.global_step, self.hparams.p_decay_steps)]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        image, mask = batch["image"], batch["mask"]
        generator = self.step_generator(batch_idx)
        p = self.reconstructed_probability()
        mae_mask = swap_to_reconstructed(mask, p, generator)
        loss = self.training_loss(image, mask, mae_mask, generator)
        b = image.shape[0]
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=b)
        self.log("train/p_reconstructed", p, on_step=True, on_epoch=False, batch_size=b)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        image, mask = batch["image"], batch["mask"]
        loss = self.validation_loss(image, mask, self.validation_generator(batch_idx))
        self.log("val/loss", loss, on_epoch=True, sync_dist=True, batch_size=image.shape[0])

    def log_images(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """input | masked input | MAE prior image | the pipeline's sample (``val_sampling_steps`` steps, paste-back)."""
        image, mask = batch["image"], batch["mask"]
        prior = self.mae.prior(image, mask).image
        generator = torch.Generator(device="cpu").manual_seed(self.hparams.seed)
        sample = self.pipeline()(image, mask, num_inference_steps=self.hparams.val_sampling_steps,
                                 generator=generator, output_type="pt").images
        columns = self.input_columns(batch)
        if prior is not None:
            columns["mae_prior"] = prior.float()
        columns[self.sample_column] = sample.to(image) * 2 - 1
        return columns

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = adamw(self.aligner.parameters(), lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)
        total = max(self.total_training_steps(), hp.warmup_steps)
        scheduler = warmup_cosine_scheduler(optimizer, warmup_steps=hp.warmup_steps, total_steps=total,
                                            min_factor=1.0)  # min_factor 1: constant after the warm-up
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

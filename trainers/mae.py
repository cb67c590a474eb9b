"""MAE prior fine-tuning on inpainting masks (ASUKA paper §3.1; the MAE-FAR recipe, ewrfcas/MAE-FAR ``MAE/``).

Per step: the batch image (B,3,H,W) in [-1,1] is ImageNet-normalised at the model's ``img_size`` and the hole mask
(1 = hole) binarised at that size (``asuka.models.mae.preprocess``); ``MAEPrior.forward_train`` applies MAE-FAR's
adaptive random masking (every patch touched by the hole dropped, random patches added up to ``mask_ratio`` = 75 %,
leak-free when the hole covers more) and returns the MSE on the hole pixels (real + added), unnormalised pixels by
default (``norm_pix`` optional).

Optimiser (MAE / MAE-FAR): AdamW(β = 0.9, 0.95), weight decay 0.05 except biases, norms and embeddings
(``param_groups_weight_decay``), ``lr = base_lr × effective_batch / 256`` with ``base_lr`` 1.5e-4, linear warm-up then
half-cycle cosine, stepped per optimizer step. The masking noise comes from a generator seeded by
(``seed``, optimizer step, micro-batch, rank), so a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info

from asuka.models.mae import MAEPrior, param_groups_weight_decay, preprocess
from asuka.tensors import paste_back
from trainers.base import StageModule, adamw, warmup_cosine_scheduler
from trainers.schedules import scaled_lr

__all__ = ["MAEModule"]


class MAEModule(StageModule):
    """LightningModule fine-tuning :class:`~asuka.models.mae.MAEPrior`; exports the ``MAEPrior``.

    Args:
        model: ``MAEPrior`` config overrides (default: ViT-B/16 at 256², the paper's model).
        init_from: weights to start from — a ``save_pretrained`` folder of ``MAEPrior`` or a published ``.pth``
            converted by ``asuka.models.convert``. ``None`` starts from random initialisation.
        init_format: layout of a ``.pth`` ``init_from``: ``"mae_far"`` (MAE-FAR's ``mae_*.pth``, ``model`` key; the
            paper starts from MAE-FAR's Places2 MAE) or ``"official"`` (facebookresearch/mae full / visualize
            checkpoints: cls token dropped, position table re-gridded).
        mask_ratio: fraction of patches hidden from the encoder (MAE-FAR: 0.75).
        norm_pix: per-patch normalised pixel targets (MAE option); default ``False`` as MAE-FAR fine-tuning.
        base_lr: ``blr``; the learning rate is ``base_lr × effective_batch / 256`` unless ``lr`` is given.
        warmup_steps / min_lr: warm-up length in optimizer steps and the cosine floor.
        gradient_checkpointing: recompute transformer blocks in backward (less memory, ~30 % more compute).
        compile: ``torch.compile`` the costly modules (:meth:`compiled_parts`) in place at setup (GPU speed).
        seed: seed of the patch-masking noise.
        max_consecutive_nonfinite: see :class:`trainers.base.StageModule`.
    """

    def __init__(
        self,
        model: dict[str, Any] | None = None,
        init_from: str | None = None,
        init_format: str = "mae_far",
        mask_ratio: float = 0.75,
        norm_pix: bool = False,
        base_lr: float = 1.5e-4,
        lr: float | None = None,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 0,
        min_lr: float = 0.0,
        gradient_checkpointing: bool = False,
        seed: int = 0,
        max_consecutive_nonfinite: int = 20,
        compile: bool = False,
    ) -> None:
        super().__init__(max_consecutive_nonfinite=max_consecutive_nonfinite, compile=compile)
        self.save_hyperparameters()
        if init_format not in ("mae_far", "official"):
            raise ValueError(f"init_format must be 'mae_far' or 'official', got {init_format!r}")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must lie in [0, 1), got {mask_ratio}")
        self.model = MAEPrior(**(model or {}))
        if gradient_checkpointing:
            self.model.enable_gradient_checkpointing()

    # ------------------------------------------------------------------ weights
    def compiled_parts(self) -> list[torch.nn.Module]:
        """The transformer blocks, one by one (the step calls ``forward_train``, not the module)."""
        return [*self.model.blocks, *self.model.decoder_blocks]

    def exportable(self) -> MAEPrior:
        return self.model

    def load_pretrained(self) -> None:
        path = self.hparams.init_from
        if path is None:
            return
        path = Path(path)
        if path.is_dir():
            state = MAEPrior.from_pretrained(path).state_dict()
        elif path.is_file():
            from asuka.models import convert

            if self.hparams.init_format == "mae_far":
                state = convert.convert_mae_far_checkpoint(path)
            else:
                grid = self.model.config.img_size // self.model.config.patch_size
                state = convert.convert_official_mae_checkpoint(path, grid_size=grid)
        else:
            raise FileNotFoundError(
                f"init_from={str(path)!r} does not exist; pass a MAEPrior save_pretrained folder or a MAE-FAR .pth"
            )
        try:
            self.model.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise ValueError(f"init_from={str(path)!r} does not fit model={self.hparams.model!r}: {error}") from error
        rank_zero_info(f"MAE initialised from {path}")

    # ------------------------------------------------------------------ inputs
    def _inputs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Full ImageNet-normalised image and binary hole mask at ``img_size``² (the MAE's training inputs)."""
        image, mask = batch["image"], batch["mask"]
        size = self.model.config.img_size
        x, _ = preprocess(image, torch.zeros_like(mask), size)  # nothing hidden: the loss needs the hole pixels
        m = (F.interpolate(mask.to(x.dtype), size=(size, size), mode="nearest") > 0.5).to(x.dtype)
        return x, m

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x, m = self._inputs(batch)
        generator = self.step_generator(batch_idx)
        out = self.model.forward_train(
            x, m, self.hparams.mask_ratio, generator=generator, norm_pix=self.hparams.norm_pix
        )
        self.log("train/loss", out["loss"], on_step=True, on_epoch=False, prog_bar=True, batch_size=x.shape[0])
        return out["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x, m = self._inputs(batch)
        generator = self.validation_generator(batch_idx)
        out = self.model.forward_train(
            x, m, self.hparams.mask_ratio, generator=generator, norm_pix=self.hparams.norm_pix
        )
        self.log("val/loss", out["loss"], on_epoch=True, sync_dist=True, batch_size=x.shape[0])

    def log_images(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """input | masked input | MAE prior image (inference path, all tokens) | composite."""
        image, mask = batch["image"], batch["mask"]
        columns = self.input_columns(batch)
        prediction = self.model.prior(image, mask).image
        if prediction is not None:  # None for norm_pix_loss models (per-patch normalised predictions)
            columns["prediction"] = prediction
            columns["composite"] = paste_back(prediction, image, mask)
        return columns

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        effective = self.effective_batch_size()
        lr = hp.lr if hp.lr is not None else scaled_lr(hp.base_lr, effective)
        groups = param_groups_weight_decay(self.model, hp.weight_decay)
        for group, name in zip(groups, ("decay", "no_decay")):
            group["name"] = name  # TensorBoard: lr/decay, lr/no_decay
        optimizer = adamw(groups, lr=lr, betas=tuple(hp.betas))
        run = self.total_training_steps()
        total = max(run, hp.warmup_steps)  # a run shorter than the warm-up ends inside it
        source = "fixed lr" if hp.lr is not None else f"base_lr {hp.base_lr} × {effective}/256"
        rank_zero_info(
            f"MAE fine-tuning: effective batch {effective}, lr {lr:.3g} ({source}), "
            f"{hp.warmup_steps} warm-up of {total} steps" + (f" (this run stops at step {run})" if run < total else "")
        )
        scheduler = warmup_cosine_scheduler(
            optimizer, warmup_steps=hp.warmup_steps, total_steps=total, min_factor=hp.min_lr / lr
        )
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

"""Harmonizing-decoder training (ASUKA paper §3.3; the recipe of Asymmetric VQGAN, buxiangzhiren/Asymmetric_VQGAN ``ldm/models/autoencoder.py``, which ASUKA follows).

Per iteration, for a batch ``image`` (B,3,H,W) in [-1,1] with hole masks from the ``asuka_train`` recipe:

1. encoder input: the offline latent-augmented copy (``trainers.latent_augment``) for ``latent_aug_prob`` of the
   samples that have one (paper: 50 %), else the image; then ColorJitter(0.15, 0.2, 0.1, 0.03) on every sample
   (paper §3.3, batched per sample on the device: :mod:`trainers.color_augment`);
2. ``full_hole_prob`` of the masks become all-hole (Asymmetric VQGAN's ``Cf_r`` = 0.5: no condition at all);
3. ``z ~ q(z | encoder input)`` from the frozen encoder + ``quant_conv``; ``x̂ = decode(z, image, mask)``: the condition
   is the *un-augmented* image, the target is the original image;
4. generator loss (LDM ``LPIPSWithDiscriminator``, :mod:`trainers.losses`): ``Σ(|x-x̂| + LPIPS)/B + 1e-6·KL
   + λ·g`` with the adaptive weight ``λ`` on ``decoder.conv_out.weight`` times ``disc_weight`` 0.8; discriminator
   hinge loss on ``x`` vs ``x̂.detach()``.

Manual optimisation with two Adam optimisers (betas 0.5, 0.9; fused AdamW with weight decay 0 = Adam), lr 8e-5 with
cosine decay to 0 over the run (paper: 50K steps, batch 40, lr 8e-5, cosine). Both losses are computed from one
forward pass, then both optimisers step; a step whose losses or gradients (of either optimiser) are not finite is
skipped by **both** optimisers on the device, without a host sync, and counted (``train/skipped_steps``).

Steps: Lightning's ``global_step`` counts optimiser steps, i.e. two per iteration here (both optimisers step every
iteration, the discriminator with no gradient before ``disc_start``). So ``trainer.max_steps`` = 2 × iterations
(paper 50K iterations -> ``max_steps: 100000``); ``disc_start`` is in iterations.

``disc_start`` default 0 (deliberate): Asymmetric VQGAN trains its new condition branch from the SD VAE with the
discriminator off for the first 50,000 steps (``disc_start=50001``). ASUKA instead fine-tunes for only 50K steps from
[62]'s already adversarially trained decoder; counted from step 0, 50,001 would never switch the GAN term on, and
the fine-tuned decoder would drift from the GAN-sharpened one under L1 + LPIPS alone. Starting from the SD VAE
(``init_from: null``) with a fresh condition branch, set ``disc_start`` as [62] did (e.g. 50001 of a longer run).

Frozen (never in checkpoints): encoder, ``quant_conv``, ``post_quant_conv`` (frozen in [62]), LPIPS, and the plain SD
VAE decoder kept for the image grids. Trainable: decoder + condition encoder, discriminator.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AsymmetricAutoencoderKL, AutoencoderKL
from lightning.pytorch.utilities import rank_zero_info

from asuka.models.decoder import HarmonizingDecoderKL, decoder_widths
from asuka.tensors import paste_back
from trainers.base import StageModule, adamw, warmup_cosine_scheduler
from trainers.color_augment import color_jitter, sample_params
from trainers.losses import NLayerDiscriminator, PerceptualLoss, adaptive_weight, hinge_d_loss, kl_loss, nll_loss
from asuka.models.tiny import expand_tiny

__all__ = ["DecoderModule", "vae_folder"]

PAPER_COLOR_JITTER = {"brightness": 0.15, "contrast": 0.2, "saturation": 0.1, "hue": 0.03}
OPTIMIZER_STEPS_PER_ITERATION = 2


def vae_folder(path: str | Path) -> Path:
    """The ``AutoencoderKL`` folder of ``path``: the folder itself or its ``vae/`` subfolder (a pipeline folder).

    ``"tiny"`` names the tiny random SD-inpainting folder of the CPU demos (``asuka.models.tiny``).
    """
    path = Path(expand_tiny(path))
    for folder in (path, path / "vae"):
        if _config_class(folder) == "AutoencoderKL":
            return folder
    raise FileNotFoundError(f"vae={str(path)!r}: no AutoencoderKL config.json there or in its vae/ subfolder; pass "
                            "an SD VAE folder or an SD (inpainting) pipeline folder")


def _config_class(folder: Path) -> str | None:
    """``_class_name`` of a diffusers ``save_pretrained`` folder's ``config.json`` (None without one)."""
    from asuka.weights import config_class_name

    return config_class_name(folder, field="vae")


class DecoderModule(StageModule):
    """LightningModule training :class:`~asuka.models.decoder.HarmonizingDecoderKL`; exports it.

    Args:
        vae: the SD ``AutoencoderKL`` (folder, or a pipeline folder with ``vae/``): architecture, frozen encoder and
            the plain-decoder reference of the image grids; also the initial weights when ``init_from`` is None.
        init_from: start from an adversarially trained conditional decoder (paper: fine-tuned from [62]): a
            ``HarmonizingDecoderKL`` / ``AsymmetricAutoencoderKL`` folder, or an Asymmetric VQGAN / ASUKA ``.ckpt``
            (LDM layout, ``asuka.models.convert``). A 3-channel condition encoder gets a zero mask channel.
        condition_channels / mask_downsample / decoder_width: ``HarmonizingDecoderKL`` options (ASUKA: 4, area_any,
            SD width).
        lr, betas: Adam for both optimisers (paper lr 8e-5; taming/LDM betas (0.5, 0.9)); cosine decay to
            ``min_lr`` after ``warmup_steps`` iterations.
        perceptual_weight, perceptual_net, lpips_backbone, lpips_linear, lpips_random_backbone: LPIPS term (LDM: VGG,
            weight 1). ``lpips_backbone`` is a local torchvision state dict (e.g. ``vgg16-397923af.pth``);
            ``lpips_random_backbone`` keeps random backbone weights (tests and CPU demos only).
        kl_weight: 1e-6 (LDM/[62]). disc_weight: 0.8. disc_start: iteration at which the GAN terms switch on
            (module docstring). disc_factor: scale of both GAN terms once on. disc_layers / disc_channels: PatchGAN.
        color_jitter: ColorJitter strengths (paper values) or None to disable.
        latent_aug_prob: share of samples whose encoder input is the latent-augmented copy (paper 0.5).
        latent_aug_key: batch name of that copy (the datamodule's ``paired_image_keys`` value).
        full_hole_prob: share of all-hole masks (no condition; [62]'s ``Cf_r`` = 0.5).
        gradient_checkpointing: recompute decoder blocks in backward.
        compile: ``torch.compile`` the costly modules (:meth:`compiled_parts`) in place at setup (GPU speed).
        seed: seed of augmentation choices, jitter factors, posterior samples and all-hole masks.
    """

    def __init__(
        self,
        vae: str,
        init_from: str | None = None,
        condition_channels: int = 4,
        mask_downsample: str = "area_any",
        decoder_width: str = "sd",
        lr: float = 8e-5,
        betas: tuple[float, float] = (0.5, 0.9),
        warmup_steps: int = 0,
        min_lr: float = 0.0,
        perceptual_weight: float = 1.0,
        perceptual_net: str = "vgg",
        lpips_backbone: str | None = None,
        lpips_linear: str | None = None,
        lpips_random_backbone: bool = False,
        kl_weight: float = 1e-6,
        disc_weight: float = 0.8,
        disc_start: int = 0,
        disc_factor: float = 1.0,
        disc_layers: int = 3,
        disc_channels: int = 64,
        color_jitter: dict[str, float] | None = PAPER_COLOR_JITTER,
        latent_aug_prob: float = 0.5,
        latent_aug_key: str = "aug_image",
        full_hole_prob: float = 0.5,
        gradient_checkpointing: bool = False,
        seed: int = 0,
        max_consecutive_nonfinite: int = 20,
        compile: bool = False,
    ) -> None:
        super().__init__(max_consecutive_nonfinite=max_consecutive_nonfinite, compile=compile)
        self.save_hyperparameters()
        for name, p in (("latent_aug_prob", latent_aug_prob), ("full_hole_prob", full_hole_prob)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {p}")
        if disc_start < 0:
            raise ValueError(f"disc_start must be >= 0 (an iteration), got {disc_start}")
        if color_jitter is not None:
            unknown = set(color_jitter) - set(PAPER_COLOR_JITTER)
            if unknown:
                raise ValueError(f"color_jitter accepts {sorted(PAPER_COLOR_JITTER)}, got unknown {sorted(unknown)}")
        self.automatic_optimization = False
        config = AutoencoderKL.load_config(vae_folder(vae))
        up, layers_up = decoder_widths(tuple(config["block_out_channels"]), decoder_width)
        self.model = HarmonizingDecoderKL(
            in_channels=config["in_channels"], out_channels=config["out_channels"],
            down_block_types=tuple(config["down_block_types"]), down_block_out_channels=tuple(config["block_out_channels"]),
            layers_per_down_block=config["layers_per_block"], up_block_types=tuple(config["up_block_types"]),
            up_block_out_channels=up, layers_per_up_block=layers_up, act_fn=config.get("act_fn", "silu"),
            latent_channels=config["latent_channels"], norm_num_groups=config["norm_num_groups"],
            sample_size=config["sample_size"], scaling_factor=config["scaling_factor"],
            condition_channels=condition_channels, mask_downsample=mask_downsample)
        for frozen in (self.model.encoder, self.model.quant_conv, self.model.post_quant_conv):
            frozen.requires_grad_(False)
        if gradient_checkpointing:  # the frozen encoder runs without autograd, so only the decoder recomputes
            self.model.enable_gradient_checkpointing()
        plain = AutoencoderKL.from_config(config)
        self.plain_decoder, self.plain_post_quant_conv = plain.decoder, plain.post_quant_conv
        self.plain_decoder.requires_grad_(False)
        self.plain_post_quant_conv.requires_grad_(False)
        self.perceptual = PerceptualLoss(perceptual_net, lpips_backbone, lpips_linear, lpips_random_backbone)
        self.discriminator = NLayerDiscriminator(config["out_channels"], disc_channels, disc_layers)
        self._found_inf: torch.Tensor | None = None
        self._step_losses: torch.Tensor | None = None

    # ------------------------------------------------------------------ weights
    def compiled_parts(self) -> list[torch.nn.Module]:
        """The decoder (the step calls ``model.encode`` / ``model.decode``, which call it)."""
        return [self.model.decoder]

    def exportable(self) -> HarmonizingDecoderKL:
        return self.model

    def load_pretrained(self) -> None:
        hp = self.hparams
        sd_vae = AutoencoderKL.from_pretrained(vae_folder(hp.vae))
        self.plain_decoder.load_state_dict(sd_vae.decoder.state_dict())
        self.plain_post_quant_conv.load_state_dict(sd_vae.post_quant_conv.state_dict())
        source = sd_vae if hp.init_from is None else self._load_init(Path(hp.init_from), sd_vae)
        options = dict(condition_channels=hp.condition_channels, mask_downsample=hp.mask_downsample)
        with torch.random.fork_rng(devices=[]):  # a fresh condition encoder: same weights on every call and rank
            torch.manual_seed(hp.seed)
            state = HarmonizingDecoderKL.from_vae(source, **options).state_dict()
        try:
            self.model.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise ValueError(f"init_from={hp.init_from!r} (or vae={hp.vae!r}) does not fit decoder_width="
                             f"{hp.decoder_width!r}: {error}") from error
        rank_zero_info(f"harmonizing decoder initialised from {hp.init_from or hp.vae}")

    @staticmethod
    def _load_init(path: Path, sd_vae: AutoencoderKL) -> AsymmetricAutoencoderKL:
        if path.is_dir():
            cls = {"HarmonizingDecoderKL": HarmonizingDecoderKL,
                   "AsymmetricAutoencoderKL": AsymmetricAutoencoderKL}.get(_config_class(path))
            if cls is None:
                raise ValueError(f"init_from={str(path)!r} holds no HarmonizingDecoderKL/AsymmetricAutoencoderKL config")
            return cls.from_pretrained(path)
        if path.is_file():
            from asuka.models.convert import load_harmonizing_decoder_checkpoint

            return load_harmonizing_decoder_checkpoint(path, vae=sd_vae)
        raise FileNotFoundError(f"init_from={str(path)!r} does not exist; pass a decoder folder or an LDM .ckpt")

    # ------------------------------------------------------------------ inputs
    def iteration(self) -> int:
        return self.global_step // OPTIMIZER_STEPS_PER_ITERATION

    def _rng(self, step: int, stream: int = 0) -> torch.Generator:
        rank = self.trainer.global_rank if self._trainer is not None else 0
        return self.seeded_generator(((self.hparams.seed * 1_000_003 + step) * 4 + stream) * 4099 + rank)

    def prepare(self, batch: dict[str, Any], generator: torch.Generator, *, augment: bool = True,
                full_hole: bool = True) -> dict[str, torch.Tensor]:
        """Encoder input (latent/colour augmented) and condition mask (with all-hole samples) for one batch."""
        hp = self.hparams
        image, mask = batch["image"], batch["mask"]
        n = image.shape[0]
        encoder_input = image
        if augment and hp.latent_aug_prob > 0 and hp.latent_aug_key in batch:
            use = torch.rand(n, generator=generator, device=image.device) < hp.latent_aug_prob
            present = batch.get(f"{hp.latent_aug_key}_present")
            if present is not None:
                use = use & present.to(use.device)
            encoder_input = torch.where(use.view(-1, 1, 1, 1), batch[hp.latent_aug_key], image)
        if augment and hp.color_jitter is not None:
            strengths = {**dict.fromkeys(PAPER_COLOR_JITTER, 0.0), **hp.color_jitter}
            encoder_input = color_jitter(encoder_input, sample_params(n, **strengths, generator=generator,
                                                                      device=image.device))
        if augment and full_hole and hp.full_hole_prob > 0:
            full = torch.rand(n, generator=generator, device=image.device) < hp.full_hole_prob
            mask = torch.where(full.view(-1, 1, 1, 1), torch.ones_like(mask), mask)
        return {"image": image, "mask": mask, "encoder_input": encoder_input}

    def reconstruct(self, inputs: dict[str, torch.Tensor], generator: torch.Generator, *, sample: bool = True):
        with torch.no_grad():
            posterior = self.model.encode(inputs["encoder_input"]).latent_dist
            z = posterior.sample(generator=generator) if sample else posterior.mode()
        recon = self.model.decode(z, image=inputs["image"], mask=inputs["mask"]).sample
        return recon, z, posterior

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        hp = self.hparams
        g_opt, d_opt = self.optimizers()
        iteration = self.iteration()
        generator = self._rng(iteration)
        inputs = self.prepare(batch, generator)
        image = inputs["image"]
        gan_on = iteration >= hp.disc_start and hp.disc_factor > 0

        self.toggle_optimizer(g_opt)
        recon, _, posterior = self.reconstruct(inputs, generator)
        perceptual = self.perceptual(recon, image) if hp.perceptual_weight > 0 else None
        nll, l1, lpips_value = nll_loss(recon, image, perceptual, hp.perceptual_weight)
        kl = kl_loss(posterior.mean, posterior.logvar)
        g_total = nll + hp.kl_weight * kl
        logs = {"train/nll": nll, "train/l1": l1, "train/lpips": lpips_value, "train/kl": kl}
        if gan_on:
            logits_fake_g = self.discriminator(recon)
            g_loss = -logits_fake_g.mean()
            d_weight = adaptive_weight(nll, g_loss, self.model.decoder.conv_out.weight, hp.disc_weight)
            g_total = g_total + d_weight * hp.disc_factor * g_loss
            logs.update({"train/g_loss": g_loss, "train/d_weight": d_weight})
        self.manual_backward(g_total)
        self.untoggle_optimizer(g_opt)

        losses = g_total
        if gan_on:
            self.toggle_optimizer(d_opt)
            logits_real = self.discriminator(image.detach())
            logits_fake = self.discriminator(recon.detach())
            d_loss = hp.disc_factor * hinge_d_loss(logits_real, logits_fake)
            self.manual_backward(d_loss)
            self.untoggle_optimizer(d_opt)
            losses = losses + d_loss
            logs.update({"train/d_loss": d_loss, "train/logits_real": logits_real.mean(),
                         "train/logits_fake": logits_fake.mean()})
        self._step_losses = losses.detach()
        g_opt.step()
        d_opt.step()
        g_opt.zero_grad(set_to_none=True)
        d_opt.zero_grad(set_to_none=True)
        for scheduler in self.lr_schedulers():
            scheduler.step()
        # the bar shows the terms a person reads (L1 in [0, 2], LPIPS); "train/loss" is the generator objective, whose
        # NLL term sums over pixels (LDM's convention, ~1e3-1e4) and is only comparable between runs
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=image.shape[0])
        self.log_dict({"l1": l1, "lpips": lpips_value}, on_step=True, on_epoch=False, prog_bar=True, logger=False,
                      batch_size=image.shape[0])
        self.log("train/loss", g_total, on_step=True, on_epoch=False, batch_size=image.shape[0])

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """One decision for both optimisers: skip both when any loss or gradient of either is not finite."""
        optimizers = self.trainer.optimizers
        if optimizer is optimizers[0]:
            grads = [p.grad for opt in optimizers for group in opt.param_groups for p in group["params"]
                     if p.grad is not None]
            self._found_inf = self.nonfinite_flag(grads, self._step_losses)
        optimizer.found_inf = self._found_inf

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        generator = self._rng(batch_idx, stream=1)  # unused by both calls: no augmentation, posterior mode
        inputs = self.prepare(batch, generator, augment=False)
        recon, z, _ = self.reconstruct(inputs, generator, sample=False)
        plain = self.plain_decode(z)
        image, mask = inputs["image"], inputs["mask"]
        known = 1 - mask
        n = image.shape[0]
        for name, pred in (("harmonized", recon), ("plain", plain)):
            self.log(f"val/l1_{name}", (pred - image).abs().mean(), on_epoch=True, sync_dist=True, batch_size=n)
            self.log(f"val/l1_known_{name}", ((pred - image).abs() * known).sum() / (3 * known.sum()).clamp_min(1),
                     on_epoch=True, sync_dist=True, batch_size=n)

    def plain_decode(self, z: torch.Tensor) -> torch.Tensor:
        """The frozen SD VAE decoder (the baseline the harmonizing decoder replaces)."""
        with torch.no_grad():
            return self.plain_decoder(self.plain_post_quant_conv(z))

    def log_images(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """original | augmented input | plain VAE decode | harmonizing decode | composite (hole from the decode)."""
        generator = self._rng(0, stream=2)
        inputs = self.prepare(batch, generator, full_hole=False)  # the real masks, not all-hole ones
        with torch.no_grad():
            recon, z, _ = self.reconstruct(inputs, generator, sample=False)
        image, mask = inputs["image"], inputs["mask"]
        return {"original": image, "augmented_input": inputs["encoder_input"], "plain_vae": self.plain_decode(z),
                "harmonized": recon, "composite": paste_back(recon, image, mask)}

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        hp = self.hparams
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        g_opt = adamw(trainable, lr=hp.lr, betas=tuple(hp.betas), weight_decay=0.0)
        d_opt = adamw(self.discriminator.parameters(), lr=hp.lr, betas=tuple(hp.betas), weight_decay=0.0)
        max_steps = self.trainer.max_steps
        if max_steps is None or max_steps < OPTIMIZER_STEPS_PER_ITERATION:
            raise ValueError("the cosine schedule needs trainer.max_steps (= 2 x iterations: both optimisers step "
                             f"every iteration), got {max_steps}")
        iterations = max_steps // OPTIMIZER_STEPS_PER_ITERATION
        rank_zero_info(f"decoder training: {iterations} iterations ({max_steps} optimiser steps), lr {hp.lr}, "
                       f"GAN from iteration {hp.disc_start}")
        schedulers = []
        for name, opt in (("lr-decoder", g_opt), ("lr-discriminator", d_opt)):
            schedulers.append({**warmup_cosine_scheduler(opt, warmup_steps=hp.warmup_steps, total_steps=iterations,
                                                         min_factor=hp.min_lr / hp.lr), "name": name})
        return [g_opt, d_opt], schedulers

"""Offline latent augmentation for decoder training (ASUKA paper §3.3, Eq. 1; no released code).

``python -m trainers.latent_augment --config configs/latent_augment.yaml`` runs the frozen SD-1.5-inpainting UNet
once over every training image and writes, beside the input shards, new shards whose samples keep every original
field and add the augmented image under ``aug.png`` (same ``__key__``; the datamodule reads it with
``paired_image_keys: {aug.png: aug_image}``). Per image ``x`` (Eq. 1):

* ``z_0 = s·E(x)`` (the VAE posterior mean, ``s`` = scaling factor 0.18215), ``t ~ U{t_min, …, t_max-1}`` (paper:
  [500, 1000)), ``ε ~ N(0, I)``;
* ``z_t = √ᾱ_t·z_0 + √(1-ᾱ_t)·ε``;
* ``ε̂ = UNet([z_t ; 0 ; z_0], t, c_∅)``: the inpainting UNet's mask channel all zero (nothing to fill) and the
  masked-image latent equal to ``z_0`` (the full image); ``c_∅`` = CLIP embedding of the empty prompt [infer: the
  paper does not name the condition];
* ``ẑ_0 = (z_t - √(1-ᾱ_t)·ε̂) / √ᾱ_t``, decoded by the SD VAE into the stored augmented image.

``t`` and ``ε`` come from a generator seeded by the sample key (and ``seed``): reruns, resumes and any number of
ranks give the same images. Images are reflect-padded to a multiple of 64 (the UNet's latent must divide by 8) and
cropped back, so ``aug.png`` has the original's exact size. ``fraction`` < 1 augments only that share of the keys
(chosen by the key's hash); the others are copied without ``aug.png`` (the datamodule then uses the image itself).

Runs as a Lightning predict job (any number of GPUs and nodes, ``Trainer.predict`` with a progress bar): whole input
shards are dealt to ranks and workers, and :class:`ShardWriter` (a ``BasePredictionWriter``) writes one output shard
per input shard, atomically (``.tmp`` then rename) followed by a ``.done`` marker. Shards whose output and marker
exist are skipped, so an interrupted job resumes where it stopped. Rank 0 finally writes ``manifest.json`` (the same
splits as the input), so the output folder is a valid ``train_shards`` / ``val_shards`` value.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import webdataset as wds
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, IterableDataset

from asuka.data.pipeline import tar_samples
from asuka.data.shards import (IMAGE_EXTENSIONS, MANIFEST_NAME, count_samples, decode_image, encode_image,
                               manifest_splits, write_manifest)
from asuka.tensors import to_numpy_uint8
from trainers.checks import run_command
from asuka.models.tiny import expand_tiny

__all__ = ["LatentAugmenter", "ShardWriter", "add_noise", "key_draw", "predict_x0", "run"]

AUG_FIELD = "aug.png"
DONE_SUFFIX = ".done"
PAD_MULTIPLE = 64


# ---------------------------------------------------------------------------------------------- the math (Eq. 1)
def add_noise(z0: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """``z_t = √ᾱ_t·z_0 + √(1-ᾱ_t)·ε`` with ``alpha_bar`` (B,) broadcast over (B,C,h,w)."""
    a = alpha_bar.to(z0.dtype).view(-1, 1, 1, 1)
    return a.sqrt() * z0 + (1 - a).sqrt() * eps


def predict_x0(z_t: torch.Tensor, eps_hat: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """``ẑ_0 = (z_t - √(1-ᾱ_t)·ε̂) / √ᾱ_t`` (ASUKA Eq. 1)."""
    a = alpha_bar.to(z_t.dtype).view(-1, 1, 1, 1)
    return (z_t - (1 - a).sqrt() * eps_hat) / a.sqrt()


@dataclass(frozen=True)
class KeyDraw:
    """The random choices of one sample: whether it is augmented, its timestep and its noise."""

    selected: bool
    timestep: int
    noise: torch.Tensor


def key_draw(key: str, seed: int, latent_shape: tuple[int, ...], t_range: tuple[int, int], fraction: float = 1.0
             ) -> KeyDraw:
    """Deterministic per key: a CPU generator seeded by ``sha256(seed:key)`` draws u, t, then ε."""
    digest = hashlib.sha256(f"{seed}:{key}".encode("utf-8")).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    u = float(torch.rand((), generator=g))
    t = int(torch.randint(t_range[0], t_range[1], (), generator=g))
    return KeyDraw(u < fraction, t, torch.randn(latent_shape, generator=g))


# ---------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class ShardJob:
    split: str
    source: str
    target: str
    samples: int


def _pad_to(x: np.ndarray, multiple: int) -> np.ndarray:
    h, w = x.shape[:2]
    ph, pw = (-h) % multiple, (-w) % multiple
    return np.pad(x, ((0, ph), (0, pw), (0, 0)), mode="reflect" if min(h, w) > max(ph, pw) else "edge")


class ShardSamples(IterableDataset):
    """Batches of one rank's pending shards: images of equal padded size from the same shard, in order.

    Samples that are not augmented (``fraction``) or whose image does not decode pass through with no image.
    """

    def __init__(self, jobs: Sequence[ShardJob], *, batch_size: int, seed: int, t_range: tuple[int, int],
                 fraction: float, image_keys: Sequence[str] = IMAGE_EXTENSIONS) -> None:
        self.jobs, self.batch_size, self.seed = list(jobs), batch_size, seed
        self.t_range, self.fraction, self.image_keys = tuple(t_range), fraction, tuple(image_keys)

    def __len__(self) -> int:  # progress-bar total (exact when a shard's images share one size)
        return sum(math.ceil(job.samples / self.batch_size) for job in self.jobs)

    def _prepare(self, sample: dict) -> dict:
        raw = {k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"}
        item: dict[str, Any] = {"sample": raw, "image": None}
        field = next((k for k in self.image_keys if k in raw), None)
        if field is None:
            return item
        try:
            rgb = decode_image(raw[field])
        except ValueError:
            return item
        padded = _pad_to(rgb, PAD_MULTIPLE)
        draw = key_draw(raw["__key__"], self.seed, (4, padded.shape[0] // 8, padded.shape[1] // 8), self.t_range,
                        self.fraction)
        if draw.selected:
            item.update(image=torch.from_numpy(padded).permute(2, 0, 1).float() / 127.5 - 1, size=rgb.shape[:2],
                        timestep=draw.timestep, noise=draw.noise)
        return item

    def _batch(self, job: ShardJob, items: list[dict]) -> dict:
        images = [it for it in items if it["image"] is not None]
        batch: dict[str, Any] = {"shard": job.target, "total": job.samples, "samples": [it["sample"] for it in items],
                                 "augmented": [it["image"] is not None for it in items]}
        if images:
            batch.update(image=torch.stack([it["image"] for it in images]),
                         noise=torch.stack([it["noise"] for it in images]),
                         timestep=torch.tensor([it["timestep"] for it in images]),
                         sizes=[it["size"] for it in images])
        return batch

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        jobs = self.jobs if info is None else self.jobs[info.id::info.num_workers]
        for job in jobs:
            pending: list[dict] = []
            for sample in tar_samples()(iter([{"url": job.source}])):
                item = self._prepare(sample)
                shape = None if item["image"] is None else tuple(item["image"].shape)
                if pending and (len(pending) == self.batch_size or shape != pending[0].get("shape")):
                    yield self._batch(job, pending)
                    pending = []
                item["shape"] = shape
                pending.append(item)
            if pending:
                yield self._batch(job, pending)


# ---------------------------------------------------------------------------------------------- model
class LatentAugmenter(LightningModule):
    """Frozen SD-inpainting UNet + VAE + empty-prompt condition; ``predict_step`` returns augmented uint8 images."""

    def __init__(self, pipeline: str) -> None:
        super().__init__()
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        root = Path(pipeline)
        if not (root / "unet").is_dir() or not (root / "vae").is_dir():
            raise FileNotFoundError(f"pipeline={pipeline!r} must be an SD-inpainting pipeline folder with unet/, vae/, "
                                    "text_encoder/, tokenizer/ and scheduler/")
        self.unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet").eval().requires_grad_(False)
        if self.unet.config.in_channels != 9:
            raise ValueError(f"pipeline={pipeline!r} has a {self.unet.config.in_channels}-channel UNet; latent "
                             "augmentation needs the 9-channel SD inpainting UNet")
        self.vae = AutoencoderKL.from_pretrained(root, subfolder="vae").eval().requires_grad_(False)
        tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(root, subfolder="text_encoder").eval()
        tokens = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                           return_tensors="pt").input_ids
        with torch.no_grad():
            self.register_buffer("empty_condition", text_encoder(tokens)[0], persistent=False)
        alphas = DDPMScheduler.from_pretrained(root, subfolder="scheduler").alphas_cumprod
        self.register_buffer("alphas_cumprod", alphas.float(), persistent=False)

    @torch.no_grad()
    def augment(self, image: torch.Tensor, timestep: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Eq. 1 for a batch (B,3,H,W) in [-1,1]; returns the decoded ẑ_0 in [-1,1]."""
        scale = self.vae.config.scaling_factor
        z0 = self.vae.encode(image.to(self.vae.dtype)).latent_dist.mode() * scale
        alpha_bar = self.alphas_cumprod[timestep]
        z_t = add_noise(z0, noise.to(z0), alpha_bar)
        unet_in = torch.cat([z_t, torch.zeros_like(z_t[:, :1]), z0], dim=1)
        condition = self.empty_condition.expand(image.shape[0], -1, -1).to(self.unet.dtype)
        eps_hat = self.unet(unet_in.to(self.unet.dtype), timestep, encoder_hidden_states=condition).sample
        z0_hat = predict_x0(z_t.float(), eps_hat.float(), alpha_bar)
        return self.vae.decode((z0_hat / scale).to(self.vae.dtype)).sample.float().clamp(-1, 1)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        out = {k: batch[k] for k in ("shard", "total", "samples", "augmented")}
        if "image" in batch:
            images = self.augment(batch["image"], batch["timestep"], batch["noise"])
            pixels = to_numpy_uint8(images)
            out["images"] = [p[:h, :w] for p, (h, w) in zip(pixels, batch["sizes"])]
        return out


class ShardWriter(BasePredictionWriter):
    """Writes each input shard's samples (+ ``aug.png``) to its output shard; finalises it when complete."""

    def __init__(self) -> None:
        super().__init__(write_interval="batch")
        self._open: dict[str, tuple[wds.TarWriter, int]] = {}

    def write_on_batch_end(self, trainer: Trainer, pl_module: LightningModule, prediction: dict, batch_indices: Any,
                           batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        target = prediction["shard"]
        writer, count = self._open.get(target) or (wds.TarWriter(target + ".tmp", encoder=False), 0)
        images = iter(prediction.get("images", []))
        for sample, augmented in zip(prediction["samples"], prediction["augmented"]):
            sample = dict(sample)
            if augmented:
                sample[AUG_FIELD] = encode_image(next(images), "png")
            writer.write(sample)
            count += 1
        if count >= prediction["total"]:
            writer.close()
            os.replace(target + ".tmp", target)
            Path(target + DONE_SUFFIX).write_text(json.dumps({"samples": count}))
            self._open.pop(target, None)
        else:
            self._open[target] = (writer, count)

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        unfinished = sorted(self._open)
        for writer, _ in self._open.values():
            writer.close()
        self._open.clear()
        if unfinished:
            raise RuntimeError(f"shards ended early (sample counts changed while running?): {unfinished}; rerun")


# ---------------------------------------------------------------------------------------------- job
def _inputs(shards: str | Sequence[str] | None, split: str) -> tuple[dict[str, list[str]], Path]:
    """``{split: [shard paths]}`` and the input folder. A folder with a manifest gives all its splits."""
    if shards is None:
        from asuka.data.samples import ensure_sample_shards

        splits = ensure_sample_shards()
    elif isinstance(shards, (str, Path)) and Path(shards).is_dir():
        splits = manifest_splits(shards)
    else:
        urls = [shards] if isinstance(shards, (str, Path)) else list(shards)
        splits = {split: [u for s in urls for u in wds.shardlists.expand_urls(str(s))]}
    missing = [p for paths in splits.values() for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"shards: {len(missing)} local shard(s) not found, e.g. {missing[:3]}")
    first = next((p for paths in splits.values() for p in paths), None)
    if first is None:
        raise ValueError("shards is empty; pass shard paths, a brace pattern or a folder with a manifest.json")
    return splits, Path(first).parent


def plan(splits: dict[str, list[str]], output_dir: Path) -> list[ShardJob]:
    """Every input shard with its output path; clashing output names raise ``ValueError``."""
    jobs, names = [], set()
    for name, paths in splits.items():
        for path in paths:
            target = output_dir / Path(path).name
            if target.name in names:
                raise ValueError(f"two input shards are both named {target.name!r}; give them distinct names")
            names.add(target.name)
            jobs.append(ShardJob(name, str(path), str(target), 0))
    return jobs


def is_done(job: ShardJob) -> bool:
    return Path(job.target).is_file() and Path(job.target + DONE_SUFFIX).is_file()


def run(
    pipeline: str | None = None,
    shards: str | list[str] | None = None,
    output_dir: str | None = None,
    split: str = "train",
    t_range: tuple[int, int] = (500, 1000),
    fraction: float = 1.0,
    batch_size: int = 4,
    num_workers: int = 2,
    seed: int = 0,
    trainer: dict[str, Any] | None = None,
) -> Path:
    """Write latent-augmented copies of ``shards`` (module docstring); returns the output folder.

    Args:
        pipeline: SD-1.5-inpainting pipeline folder (``unet/`` with 9 input channels, ``vae/``, ``text_encoder/``,
            ``tokenizer/``, ``scheduler/``); ``"tiny"`` = the tiny random one of the CPU demos.
        shards: a folder with ``manifest.json`` (all its splits), shard paths or a brace pattern (split ``split``);
            None = the bundled sample shards.
        output_dir: where the new shards go; default ``<input folder>/latent-aug``.
        t_range: timesteps ``[t_min, t_max)`` (paper: 500, 1000).
        fraction: share of keys augmented (1 = every image; training then picks 50 % per step).
        batch_size / num_workers: per rank. seed: seeds the per-key draws.
        trainer: ``lightning.Trainer`` arguments (``accelerator``, ``devices``, ``num_nodes``, ``precision``, ...).
    """
    if pipeline is None:
        raise ValueError("pass --pipeline: an SD-1.5-inpainting pipeline folder (or 'tiny' for the CPU demo)")
    if not (0 <= t_range[0] < t_range[1] <= 1000):
        raise ValueError(f"t_range must satisfy 0 <= t_min < t_max <= 1000, got {t_range}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    if batch_size < 1 or num_workers < 0:
        raise ValueError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size}, {num_workers}")
    pipeline = expand_tiny(pipeline)
    splits, input_dir = _inputs(shards, split)
    out = Path(output_dir) if output_dir is not None else input_dir / "latent-aug"
    out.mkdir(parents=True, exist_ok=True)
    jobs = plan(splits, out)
    runner = Trainer(**{"logger": False, "enable_checkpointing": False, **(trainer or {}),
                        "use_distributed_sampler": False, "callbacks": [ShardWriter()]})
    pending = [job for job in jobs if not is_done(job)]
    mine = [ShardJob(j.split, j.source, j.target, count_samples(j.source))
            for j in pending[runner.global_rank::runner.world_size]]
    if runner.is_global_zero:
        print(f"latent augmentation: {len(jobs)} shards, {len(jobs) - len(pending)} already done, "
              f"{len(pending)} to write into {out}", flush=True)
    if mine or runner.world_size > 1:
        warnings.filterwarnings("ignore", message=".*(infer the batch indices|`__len__` defined).*")
        dataset = ShardSamples(mine, batch_size=batch_size, seed=seed, t_range=t_range, fraction=fraction)
        loader = DataLoader(dataset, batch_size=None, num_workers=min(num_workers, len(mine)))
        runner.predict(LatentAugmenter(pipeline), dataloaders=loader, return_predictions=False)
        runner.strategy.barrier()
    if runner.is_global_zero:
        if all(is_done(job) for job in jobs):
            write_manifest(out, {name: [Path(j.target) for j in jobs if j.split == name] for name in splits},
                           extra={"latent_augmentation": {"source": str(input_dir), "field": AUG_FIELD,
                                                          "t_range": list(t_range), "fraction": fraction, "seed": seed,
                                                          "pipeline": str(pipeline)}})
            print(f"done: {out / MANIFEST_NAME}", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    """The command; bad arguments and files end with a one-line error (exit status 2)."""
    from jsonargparse import CLI

    run_command("python -m trainers.latent_augment", lambda args: CLI(run, args=args), argv)


if __name__ == "__main__":
    main()

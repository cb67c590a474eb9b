"""``InpaintingDataModule``: webdataset shards -> canonical inpainting batches, for LightningCLI.

Batches are dicts: ``image`` (B,3,H,W) in [-1,1], ``mask`` (B,1,H,W) with 1 = hole, ``masked_image``
= image * (1 - mask), ``key`` (list[str]), ``skipped`` (int64 scalar: corrupt samples the producing
worker skipped since its previous batch) and, per entry of ``paired_image_keys``, one more image
tensor with the identical crop and flip plus a ``<name>_present`` bool (B,) vector.

Training draws samples with replacement from this rank's disjoint slice of the shards (:mod:`asuka.data.pipeline`);
every batch, with its samples, crops and masks, is a pure function of ``seed``, the rank and the batch's position in
the run. Every rank yields exactly ``epoch_batches`` batches per epoch, so DDP never waits on a rank with fewer
shards. The position is saved in every checkpoint (the training loader's ``state_dict``), so a resumed run — after
``kill -9`` at any step, or a SLURM requeue — continues the stream exactly where the checkpoint was taken: the same
batches as the run that was never interrupted, and nothing trained on twice. Training shards must be local,
uncompressed tar files (they are indexed for direct access).

Validation reads ``val_shards`` once, in order, with centre crops and masks seeded by the sample
key: the same images and masks on every run, every rank (the set is meant to be small).

``skipped_samples`` (datamodule attribute, summed in ``on_before_batch_transfer`` on the host from
the per-batch ``skipped`` field, so no device sync) is the number of corrupt samples skipped so far
by this rank's training and validation streams; log it from the LightningModule, e.g.
``self.log("data/skipped", float(self.trainer.datamodule.skipped_samples))``.

With ``train_shards: null`` the bundled sample set (:func:`asuka.data.samples.ensure_sample_shards`)
is used for training and validation, so ``python -m trainers.fit`` runs offline out of the box.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from lightning.pytorch import LightningDataModule

from asuka.data.pipeline import ResumableLoader, TrainStream, TrainTransform, finish_batch, val_pipeline
from asuka.data.samples import ensure_sample_shards
from asuka.data.shards import IMAGE_EXTENSIONS, MANIFEST_NAME, manifest_shards
from asuka.masks import get_mask_generator
from trainers.checks import check_positive_ints

__all__ = ["InpaintingDataModule", "resolve_shards"]

_REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "gcs://", "hf://", "ais://")


def resolve_shards(spec: list[str] | str, *, split: str, name: str, local: bool = False) -> list[str]:
    """Expand a shard spec: a list of paths/URLs, a brace pattern (``train-{000000..000099}.tar``),
    or a folder holding a ``manifest.json`` (its ``split`` shards). Local files must exist; ``local``: URLs
    (``pipe:``, ``s3://``, ...) are refused."""
    if isinstance(spec, (str, Path)):
        spec = str(spec)
        if os.path.isdir(spec):
            if not os.path.isfile(os.path.join(spec, MANIFEST_NAME)):
                raise FileNotFoundError(f"{name}={spec!r} is a folder without {MANIFEST_NAME}; pass shard paths, "
                                        "a brace pattern, or a folder written by `python -m asuka.data.make_shards`")
            return manifest_shards(spec, split)
        urls = wds.shardlists.expand_urls(spec)
    else:
        urls = [u for s in spec for u in wds.shardlists.expand_urls(str(s))]
    if not urls:
        raise ValueError(f"{name} is empty; pass at least one shard")
    remote = [u for u in urls if u.startswith(_REMOTE_PREFIXES)]
    if local and remote:
        raise ValueError(f"{name} must be local tar files (they are indexed so that a resumed run continues the exact "
                         f"stream); got {remote[0]!r}: mount or copy the shards")
    missing = [u for u in urls if not u.startswith(_REMOTE_PREFIXES) and not os.path.isfile(u)]
    if missing:
        raise FileNotFoundError(f"{name}: {len(missing)} shard(s) not found, e.g. {missing[:3]}")
    return urls


class InpaintingDataModule(LightningDataModule):
    """Inpainting batches from webdataset shards (module docstring).

    Args:
        train_shards: shard paths / URLs, a brace pattern, or a folder with a manifest; None = the
            bundled sample set (then ``val_shards`` defaults to its validation split).
        val_shards: the fixed validation shards (same forms); None = no validation, unless
            ``train_shards`` is None.
        resolution: crop size of the stage (MAE 256, aligner 512, decoder 256).
        batch_size: per-device batch size; ``val_batch_size`` defaults to it.
        num_workers: DataLoader workers per rank for training; ``val_num_workers`` defaults to it.
        mask_recipe: a named recipe of :func:`asuka.masks.get_mask_generator` (``asuka_train``,
            ``misato_eval``, ``lama_thick_256``, ...); ``mask_options`` are its overrides.
        val_mask_recipe / val_mask_options: the validation masks (default: the training recipe).
        object_masks: object-shape source for recipes with object masks (COCO ``.json``, folder of
            PNGs, shape-bank ``.npz``); None = the bundled demo shapes.
        crop_scale / crop_ratio: random-resized-crop area and aspect ranges (MAE-FAR: (0.2, 1.0)).
        hflip: horizontal-flip probability.
        epoch_batches: batches per epoch on every rank.
        val_samples: cap on validation samples (None = all).
        seed: base seed of sample choice, crops and masks (and of the validation masks).
        image_keys: sample fields tried, in order, for the image.
        paired_image_keys: ``{sample field: batch name}``, e.g. ``{"aug.png": "aug_image"}``: extra
            images stored in the same sample that get the same crop and flip as ``image``.
        paired_missing: ``"image"`` (a sample without the field uses its own image, ``<name>_present``
            False) or ``"skip"`` (such samples are skipped as corrupt).
        max_failure_ratio: the stream stops with an error when more than this share of (at least
            20) attempts fail. Empty or unreadable training shards are skipped with a warning (counted in
            ``failing_shards``); when no shard holds a sample, training stops at once with a clear error.
        sample_root: where the bundled sample set is built (default ``~/.cache/asuka``).
        pin_memory: DataLoader ``pin_memory`` (None = when CUDA is available). ``persistent_workers``: keep
            the validation workers between validations (the training workers run across epochs anyway).
        device_transform: False: the loaders yield the canonical float batches (converted from the
            workers' uint8 batches in the main process). True: they yield compact uint8 batches
            (``image`` uint8, ``mask`` uint8, no ``masked_image``) and the conversion runs on the
            device in ``on_after_batch_transfer`` (4x less host-to-device traffic; recommended on
            GPUs when the batch goes through Lightning).
    """

    def __init__(
        self,
        train_shards: list[str] | str | None = None,
        val_shards: list[str] | str | None = None,
        resolution: int = 256,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        val_num_workers: int | None = None,
        mask_recipe: str = "asuka_train",
        mask_options: dict[str, Any] | None = None,
        val_mask_recipe: str | None = None,
        val_mask_options: dict[str, Any] | None = None,
        object_masks: str | None = None,
        crop_scale: tuple[float, float] = (0.2, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        epoch_batches: int = 1000,
        val_samples: int | None = None,
        seed: int = 0,
        image_keys: list[str] | None = None,
        paired_image_keys: dict[str, str] | None = None,
        paired_missing: str = "image",
        max_failure_ratio: float = 0.5,
        sample_root: str | None = None,
        pin_memory: bool | None = None,
        persistent_workers: bool = False,
        device_transform: bool = False,
    ):
        super().__init__()
        check_positive_ints(resolution=resolution, batch_size=batch_size, epoch_batches=epoch_batches)
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if not 0.0 < max_failure_ratio <= 1.0:
            raise ValueError(f"max_failure_ratio must be in (0, 1], got {max_failure_ratio}")
        if not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {crop_scale}")
        if paired_missing not in ("image", "skip"):
            raise ValueError(f"paired_missing must be 'image' or 'skip', got {paired_missing!r}")
        reserved = {"image", "mask", "masked_image", "key", "skipped"}
        clash = reserved & set((paired_image_keys or {}).values())
        if clash:
            raise ValueError(f"paired_image_keys maps to reserved batch names {sorted(clash)}; choose other names")
        self.save_hyperparameters()
        self.train_shards, self.val_shards = train_shards, val_shards
        self.resolution, self.batch_size = resolution, batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.val_num_workers = num_workers if val_num_workers is None else val_num_workers
        self.mask_recipe, self.mask_options = mask_recipe, dict(mask_options or {})
        self.val_mask_recipe = val_mask_recipe or mask_recipe
        self.val_mask_options = dict(val_mask_options if val_mask_options is not None else self.mask_options)
        self.object_masks = object_masks
        self.crop_scale, self.crop_ratio, self.hflip = tuple(crop_scale), tuple(crop_ratio), hflip
        self.epoch_batches, self.val_samples, self.seed = epoch_batches, val_samples, seed
        self.image_keys = tuple(image_keys or IMAGE_EXTENSIONS)
        self.paired_image_keys = dict(paired_image_keys or {})
        self.paired_missing, self.max_failure_ratio = paired_missing, max_failure_ratio
        self.sample_root, self.persistent_workers = sample_root, persistent_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.device_transform = device_transform
        self.skipped_samples = 0
        self.failing_shards = 0
        self._train_urls: list[str] | None = None
        self._train_stream: TrainStream | None = None
        self._val_urls: list[str] = []

    # ------------------------------------------------------------------------------ setup
    def prepare_data(self) -> None:
        if self.train_shards is None:
            ensure_sample_shards(self.sample_root)

    def _mask_generator(self, recipe: str, options: dict):
        options = dict(options)
        if self.object_masks is not None and recipe in ("asuka_train", "misato_eval", "object"):
            options.setdefault("object_masks", self.object_masks)
        return get_mask_generator(recipe, **options)

    def setup(self, stage: str | None = None) -> None:
        if self._train_urls is not None:
            return
        if self.train_shards is None:
            sample = ensure_sample_shards(self.sample_root)
            self._train_urls = sample["train"]
            self._val_urls = sample["val"] if self.val_shards is None else resolve_shards(
                self.val_shards, split="val", name="val_shards")
        else:
            self._train_urls = resolve_shards(self.train_shards, split="train", name="train_shards", local=True)
            self._val_urls = [] if self.val_shards is None else resolve_shards(
                self.val_shards, split="val", name="val_shards")
        self._train_masks = self._mask_generator(self.mask_recipe, self.mask_options)
        same = (self.val_mask_recipe, self.val_mask_options) == (self.mask_recipe, self.mask_options)
        # Generators hold no random state (it comes from the rng argument), so one serves both streams and an
        # object-shape source (e.g. a large COCO .json) is read once.
        self._val_masks = self._train_masks if same else self._mask_generator(self.val_mask_recipe,
                                                                              self.val_mask_options)

    # ------------------------------------------------------------------------- dataloaders
    def _rank_world(self) -> dict:
        """The trainer's global rank and world size when attached (else env / torch.distributed)."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return {"rank": trainer.global_rank, "world_size": trainer.world_size}
        return {}

    def train_dataloader(self) -> ResumableLoader:
        """The training loader; it starts at the current epoch of an attached trainer (Lightning then restores the
        exact position of a mid-epoch checkpoint through the loader's ``load_state_dict``)."""
        self.setup("fit")
        if self._train_stream is None:  # indexes the shards once
            transform = TrainTransform(
                resolution=self.resolution, mask_generator=self._train_masks, image_keys=self.image_keys,
                paired=self.paired_image_keys, paired_missing=self.paired_missing, scale=self.crop_scale,
                ratio=self.crop_ratio, hflip=self.hflip)
            self._train_stream = TrainStream(
                self._train_urls, transform=transform, batch_size=self.batch_size, seed=self.seed,
                max_failure_ratio=self.max_failure_ratio, **self._rank_world())
            self.failing_shards = self._train_stream.failing_shards
        trainer = getattr(self, "trainer", None)
        start = trainer.current_epoch * self.epoch_batches if trainer is not None else 0
        return ResumableLoader(
            self._train_stream, epoch_batches=self.epoch_batches, num_workers=self.num_workers,
            pin_memory=self.pin_memory, transform=None if self.device_transform else finish_batch, start=start,
            resume_position=self._resume_position if trainer is not None else None)

    def _resume_position(self) -> int:
        """The training batch a run resumed from a checkpoint written now starts with, by Lightning's own restart
        rule: a checkpoint taken after a step's work (``on_train_batch_end``: ModelCheckpoint) resumes with the next
        batch, one taken during a step (SLURM's ``SIGUSR1`` at any moment) redoes that step's batch."""
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        step_done = progress.ready == progress.started == progress.processed
        return self.trainer.current_epoch * self.epoch_batches + (progress.processed if step_done
                                                                  else progress.completed)

    def val_dataloader(self) -> wds.WebLoader | list:
        self.setup("validate")
        if not self._val_urls:
            return []
        pipeline = val_pipeline(
            self._val_urls, resolution=self.resolution, batch_size=self.val_batch_size, mask_generator=self._val_masks,
            mask_seed=self.seed, image_keys=self.image_keys, paired=self.paired_image_keys,
            paired_missing=self.paired_missing, max_samples=self.val_samples, max_failure_ratio=self.max_failure_ratio)
        workers = self.val_num_workers
        loader = wds.WebLoader(pipeline, batch_size=None, num_workers=workers, pin_memory=self.pin_memory,
                               persistent_workers=self.persistent_workers and workers > 0)
        return loader if self.device_transform else loader.map(finish_batch)

    # ------------------------------------------------------------------------------ hooks
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, dict) and "skipped" in batch:
            self.skipped_samples += int(batch["skipped"])  # CPU tensor: no device sync
        if isinstance(batch, dict) and "position" in batch:  # a training batch: the model does not see its position
            batch = {k: v for k, v in batch.items() if k != "position"}
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return finish_batch(batch) if isinstance(batch, dict) and "image" in batch else batch

    def state_dict(self) -> dict:
        return {"skipped_samples": self.skipped_samples}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped_samples = int(state_dict.get("skipped_samples", 0))

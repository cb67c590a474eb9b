"""Training and validation pipelines over webdataset shards (no Lightning here).

Training stream (:class:`TrainStream`, wrapped by :class:`ResumableLoader`): **every batch is a pure function of its
position** in the run, so a run resumed from a checkpoint (``kill -9``, SLURM requeue) sees exactly the samples, crops
and masks of the run that was never interrupted, and never replays what it already trained on.

1. This rank's shards: the shard list is split by rank into disjoint slices (``shards[rank::world_size]``; with
   fewer shards than ranks the slices wrap, with a warning). Each shard is indexed once (tar member offsets,
   :func:`index_shard`; uncompressed local tars), so any sample can be read directly.
2. Batch ``g`` of the rank (``g`` counts batches from the start of the run; epoch ``g // epoch_batches``) holds the
   samples at positions ``g * batch_size + i``. Sample position ``s`` is drawn uniformly with replacement from all
   indexed samples of the rank by ``default_rng([seed, rank, s, attempt])``, which also draws its crop, flip and mask.
   A sample that cannot be read or decoded is counted and replaced by the next ``attempt``.
3. :class:`TrainTransform`: decode, random-resized crop (torchvision's algorithm; MAE-FAR uses scale (0.2, 1.0),
   bicubic) to ``resolution``, horizontal flip, a mask from a generator; paired image fields get the identical crop
   and flip.
4. :func:`collate` makes compact uint8 batches, which :func:`finish_batch` (in the main process, or on the device)
   turns into the canonical dicts: ``image`` (B,3,H,W) in [-1,1], ``mask`` (B,1,H,W) 1 = hole, ``masked_image`` =
   image * (1 - mask), ``key`` list[str], ``skipped`` (int64 scalar: samples skipped while drawing this batch),
   plus one tensor per paired field. Training batches also carry ``position`` (their ``g``; the datamodule removes
   it before the batch reaches the model).

DataLoader worker ``w`` of ``W`` makes batches ``start + w, start + w + W, ...``; the loader returns worker outputs in
round-robin order, so the batches arrive in position order whatever the number of workers. :class:`ResumableLoader`
keeps one worker iterator across epochs, yields ``epoch_batches`` batches per epoch (the same count on every rank, so
DDP never waits) and saves / restores its position (``state_dict``, the protocol Lightning checkpoints).

Failures: shards that are empty or cannot be indexed are counted as failing shards and skipped with a warning; when
no shard of the rank holds a sample the stream stops at once with :class:`DataStreamError`. Undecodable samples are
skipped and counted; when more than ``max_failure_ratio`` of at least ``min_failures`` attempts fail (or 1000 in a
row), the stream stops with :class:`DataStreamError` instead of spinning forever.

Validation (:func:`val_pipeline`): the listed shards once, in order, no resampling; centre crop (shorter side
resized to ``resolution``); masks seeded by a hash of the sample key, so the set is identical on every run;
DataLoader workers take every ``num_workers``-th sample.
"""

from __future__ import annotations

import tarfile
import warnings
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Iterator, Sequence

import cv2
import numpy as np
import torch
import webdataset as wds
from webdataset.gopen import gopen
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from asuka.data.shards import IMAGE_EXTENSIONS, decode_image

__all__ = [
    "DataStreamError", "FailureCounter", "ShardIndex", "index_shard", "TrainStream", "ResumableLoader", "tar_samples",
    "TrainTransform", "ValTransform", "collate", "finish_batch", "random_resized_crop_box", "crop_resize",
    "center_crop_resize", "key_seed", "rank_shards", "val_pipeline", "worker_slot",
]

MAX_CONSECUTIVE_FAILURES = 1000


class DataStreamError(RuntimeError):
    """The data stream cannot go on: no readable sample, or too many failing ones."""


def worker_slot() -> tuple[int, int, int, int]:
    """(rank, world_size, worker, num_workers); honours RANK/WORLD_SIZE env vars and torch.distributed."""
    return wds.utils.pytorch_worker_info()


# ------------------------------------------------------------------------------------------ failures


@dataclass
class FailureCounter:
    """Counts good and failed samples of one stream (one copy per worker process); stops a hopeless stream."""

    max_failure_ratio: float = 0.5
    min_failures: int = 20
    ok: int = 0
    failed: int = 0
    consecutive: int = 0
    pending_skips: int = 0
    last_error: str = ""

    def record_ok(self) -> None:
        self.ok += 1
        self.consecutive = 0

    def record_failure(self, exc: BaseException) -> None:
        self.failed += 1
        self.consecutive += 1
        self.pending_skips += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        total = self.ok + self.failed
        if (self.failed >= self.min_failures and self.failed > self.max_failure_ratio * total) \
                or self.consecutive >= MAX_CONSECUTIVE_FAILURES:
            raise DataStreamError(
                f"the data stream is failing: {self.failed} of {total} samples could not be read or decoded "
                f"({self.consecutive} in a row; limit max_failure_ratio={self.max_failure_ratio}); last error: "
                f"{self.last_error}. Check the shard paths and rebuild corrupt shards with "
                "`python -m asuka.data.make_shards`.")

    def handler(self, exc: BaseException) -> bool:
        """webdataset exception handler: count, maybe stop, otherwise continue."""
        self.record_failure(exc)
        return True

    def take_skips(self) -> int:
        n, self.pending_skips = self.pending_skips, 0
        return n


# ------------------------------------------------------------------------------------ shard index


def index_shard(path: str) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """``[(key, {field: (byte offset, size)})]`` of an uncompressed tar shard, in file order (webdataset's key and
    field split: the basename up to its first dot is the key). Raises ``OSError``/``tarfile.TarError``."""
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    with tarfile.open(path, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            split = wds.tariterators.base_plus_ext(member.name)
            if split[0] is None:
                continue
            samples.setdefault(split[0], {})[split[1]] = (member.offset_data, member.size)
    return list(samples.items())


def rank_shards(urls: Sequence[str], rank: int, world_size: int) -> list[str]:
    """This rank's disjoint slice ``urls[rank::world_size]`` (wraps, with a warning, when there are too few)."""
    urls = list(urls)
    if not urls:
        raise DataStreamError("no training shards given")
    if len(urls) >= world_size:
        return urls[rank::world_size]
    warnings.warn(f"{len(urls)} training shards for {world_size} ranks: ranks share shards; write more shards "
                  "(make_shards --maxcount) so every rank gets its own", stacklevel=2)
    return [urls[rank % len(urls)]]


class ShardIndex:
    """Every sample of a list of shards, addressable by number: ``(shard number, key, {field: (offset, size)})``.

    Shards that are empty or cannot be indexed are listed in ``failing`` (``"path: reason"``) and hold no samples.
    """

    def __init__(self, urls: Sequence[str]) -> None:
        self.urls = list(urls)
        self.samples: list[tuple[int, str, dict[str, tuple[int, int]]]] = []
        self.failing: list[str] = []
        for number, url in enumerate(self.urls):
            try:
                entries = index_shard(url)
            except (OSError, tarfile.TarError, EOFError) as error:
                self.failing.append(f"{url}: cannot be read as an uncompressed tar ({error})")
                continue
            if not entries:
                self.failing.append(f"{url}: holds no samples")
            self.samples.extend((number, key, fields) for key, fields in entries)

    def __len__(self) -> int:
        return len(self.samples)


class _ShardReader:
    """Reads sample fields by offset, keeping the most recently used shard files open."""

    def __init__(self, urls: Sequence[str], max_open: int = 16) -> None:
        self.urls, self.max_open = list(urls), max_open
        self.files: OrderedDict[int, BinaryIO] = OrderedDict()

    def read(self, number: int, offset: int, size: int) -> bytes:
        f = self.files.pop(number, None)
        if f is None:
            f = open(self.urls[number], "rb")
            if len(self.files) >= self.max_open:
                self.files.popitem(last=False)[1].close()
        self.files[number] = f
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise EOFError(f"{self.urls[number]} is truncated at byte {offset + len(data)}")
        return data

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()


# ------------------------------------------------------------------------------- geometry


def random_resized_crop_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                            rng: np.random.Generator) -> tuple[int, int, int, int]:
    """torchvision ``RandomResizedCrop.get_params`` with an explicit generator: (top, left, h, w)."""
    area = height * width
    log_ratio = (np.log(ratio[0]), np.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = float(np.exp(rng.uniform(*log_ratio)))
        w = int(round(np.sqrt(target * aspect)))
        h = int(round(np.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height  # fallback: central crop with the closest allowed aspect
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def crop_resize(image: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """Crop ``box`` and resize to ``size``²: area filter when shrinking (antialiased, like PIL's
    bicubic in torchvision), bicubic when enlarging."""
    top, left, h, w = box
    crop = image[top:top + h, left:left + w]
    interp = cv2.INTER_AREA if (h >= size and w >= size) else cv2.INTER_CUBIC
    return cv2.resize(crop, (size, size), interpolation=interp)


def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    side = min(h, w)
    return crop_resize(image, ((h - side) // 2, (w - side) // 2, side, side), size)


def key_seed(key: str, seed: int) -> np.random.SeedSequence:
    """A seed that depends only on the sample key (stable across runs and machines) and ``seed``."""
    return np.random.SeedSequence([seed, zlib.crc32(key.encode("utf-8"))])


# ------------------------------------------------------------------------------ transforms


def _find_image(sample: dict, image_keys: Sequence[str]) -> bytes:
    for k in image_keys:
        if k in sample:
            return sample[k]
    fields = sorted(k for k in sample if not k.startswith("__"))
    raise KeyError(f"sample {sample.get('__key__')!r} has no image field {list(image_keys)} (fields: {fields})")


@dataclass
class _Transform:
    resolution: int
    mask_generator: Callable
    image_keys: tuple[str, ...] = IMAGE_EXTENSIONS
    paired: dict[str, str] = field(default_factory=dict)
    paired_missing: str = "image"

    def __post_init__(self):
        if self.paired_missing not in ("image", "skip"):
            raise ValueError(f"paired_missing must be 'image' or 'skip', got {self.paired_missing!r}")

    def fields(self) -> tuple[str, ...]:
        """The sample fields this transform may read."""
        return (*self.image_keys, *self.paired)

    def _decode(self, sample: dict) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, bool]]:
        image = decode_image(_find_image(sample, self.image_keys))
        paired, present = {}, {}
        for field_name, out_name in self.paired.items():
            if field_name in sample:
                other = decode_image(sample[field_name])
                if other.shape != image.shape:
                    raise ValueError(f"paired field {field_name!r} of {sample['__key__']!r} has shape {other.shape}, "
                                     f"image has {image.shape}")
                paired[out_name], present[out_name] = other, True
            elif self.paired_missing == "image":
                paired[out_name], present[out_name] = image, False
            else:
                raise KeyError(f"sample {sample['__key__']!r} lacks paired field {field_name!r}")
        return image, paired, present

    def _geometry(self, image: np.ndarray, rng: np.random.Generator) -> Callable[[np.ndarray], np.ndarray]:
        raise NotImplementedError

    def process(self, sample: dict, rng: np.random.Generator, mask_rng: np.random.Generator) -> dict:
        """One processed sample (``key``, ``image``, ``mask``, paired fields); raises on a bad sample."""
        key = sample["__key__"]
        image, paired, present = self._decode(sample)
        geometry = self._geometry(image, rng)
        out = {"key": key, "image": geometry(image), "mask": self.mask_generator(self.resolution, self.resolution,
                                                                                 mask_rng)}
        for name, arr in paired.items():
            out[name] = geometry(arr)
            out[f"{name}_present"] = present[name]
        return out


@dataclass
class TrainTransform(_Transform):
    """Random-resized crop (``scale``, ``ratio``), horizontal flip with probability ``hflip``, mask from the
    sample's generator. Paired fields get the identical crop and flip."""

    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5

    def _geometry(self, image: np.ndarray, rng: np.random.Generator) -> Callable[[np.ndarray], np.ndarray]:
        box = random_resized_crop_box(image.shape[0], image.shape[1], self.scale, self.ratio, rng)
        flip = bool(rng.random() < self.hflip)

        def apply(arr: np.ndarray) -> np.ndarray:
            out = crop_resize(arr, box, self.resolution)
            return out[:, ::-1] if flip else out

        return apply


@dataclass
class ValTransform(_Transform):
    """Centre crop to ``resolution``; the mask is seeded by the sample key (identical every run). As a webdataset
    stage it processes a stream of samples, skipping and counting bad ones in ``counter``."""

    mask_seed: int = 0
    counter: FailureCounter = field(default_factory=FailureCounter)

    def _geometry(self, image: np.ndarray, rng: np.random.Generator) -> Callable[[np.ndarray], np.ndarray]:
        return lambda arr: center_crop_resize(arr, self.resolution)

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        for sample in src:
            try:
                key = sample["__key__"]
                rng = np.random.default_rng(key_seed(key, self.mask_seed))
                out = self.process(sample, rng, rng)
            except Exception as exc:  # noqa: BLE001 - any bad sample is skipped and counted
                self.counter.record_failure(exc)
                continue
            self.counter.record_ok()
            out["skipped"] = self.counter.take_skips()
            yield out


def _chw_uint8(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2)))


def collate(samples: list[dict]) -> dict:
    """Stack processed samples into a *compact* batch: ``image`` (and paired images) uint8 (B,3,H,W),
    ``mask`` uint8 (B,1,H,W), ``key``, ``skipped``; :func:`finish_batch` turns it into the canonical
    float batch. Moving uint8 between processes is 7x less traffic than the float tensors."""
    batch = {"image": _chw_uint8([s["image"] for s in samples]),
             "mask": torch.from_numpy(np.stack([s["mask"] for s in samples])[:, None].astype(np.uint8)),
             "key": [s["key"] for s in samples],
             "skipped": torch.tensor(sum(s.get("skipped", 0) for s in samples), dtype=torch.int64)}
    for name in samples[0]:
        if name.endswith("_present"):
            base = name[: -len("_present")]
            batch[base] = _chw_uint8([s[base] for s in samples])
            batch[name] = torch.tensor([s[name] for s in samples], dtype=torch.bool)
    return batch


def _unit_numpy(x: torch.Tensor) -> torch.Tensor:
    y = x.numpy().astype(np.float32)
    y *= 1 / 127.5
    y -= 1.0
    return torch.from_numpy(y)


def finish_batch(batch: dict) -> dict:
    """Compact batch -> canonical batch: ``image`` float32 in [-1, 1], ``mask`` float32 {0, 1},
    ``masked_image`` = image * (1 - mask), paired images float32 in [-1, 1]. Works on any device
    (CPU math is single-threaded numpy); a batch that is already float is returned unchanged."""
    if batch["image"].dtype != torch.uint8:
        return batch
    out = dict(batch)
    names = ["image"] + [k[: -len("_present")] for k in batch if k.endswith("_present")]
    on_cpu = batch["image"].device.type == "cpu"
    for name in names:
        x = batch[name]
        out[name] = _unit_numpy(x) if on_cpu else x.float().mul_(1 / 127.5).sub_(1.0)
    out["mask"] = batch["mask"].float()
    out["masked_image"] = out["image"] * (1.0 - out["mask"])
    return out


# ------------------------------------------------------------------------------- pipelines


class TrainStream(IterableDataset):
    """Training batches of one rank at given positions (module docstring); iterate after :meth:`start_at`.

    The shard index is built in the constructor (in the main process, before workers start) and travels to the
    workers with the object. Raises :class:`DataStreamError` when none of the rank's shards holds a sample.
    """

    def __init__(self, urls: Sequence[str], *, transform: TrainTransform, batch_size: int, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None, max_failure_ratio: float = 0.5,
                 min_failures: int = 20) -> None:
        super().__init__()
        if rank is None or world_size is None:
            rank, world_size = worker_slot()[:2]
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.transform, self.batch_size = transform, batch_size
        self.max_failure_ratio, self.min_failures = max_failure_ratio, min_failures
        self.index = ShardIndex(rank_shards(urls, rank, world_size))
        if not len(self.index):
            raise DataStreamError(f"no training sample can be read: all {len(self.index.urls)} shards of rank "
                                  f"{rank} are failing ({'; '.join(self.index.failing[:3])}"
                                  f"{'; ...' if len(self.index.failing) > 3 else ''})")
        if self.index.failing:
            warnings.warn(f"{len(self.index.failing)} of {len(self.index.urls)} training shards are failing and "
                          f"skipped: {'; '.join(self.index.failing[:3])}{'; ...' if len(self.index.failing) > 3 else ''}",
                          stacklevel=2)
        self.start = 0

    @property
    def failing_shards(self) -> int:
        return len(self.index.failing)

    def start_at(self, position: int) -> None:
        """The next iterator starts at batch ``position`` (counted from the start of the run)."""
        self.start = int(position)

    def _sample(self, position: int, reader: _ShardReader, counter: FailureCounter) -> dict:
        wanted = self.transform.fields()
        attempt = 0
        while True:
            rng = np.random.default_rng([self.seed, self.rank, position, attempt])
            number, key, fields = self.index.samples[int(rng.integers(len(self.index)))]
            try:
                sample = {"__key__": key}
                for name in wanted:
                    if name in fields:
                        sample[name] = reader.read(number, *fields[name])
                out = self.transform.process(sample, rng, rng)
            except Exception as exc:  # noqa: BLE001 - any bad sample is skipped, counted and replaced
                counter.record_failure(exc)
                attempt += 1
                continue
            counter.record_ok()
            return out

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        counter = FailureCounter(self.max_failure_ratio, self.min_failures)
        reader = _ShardReader(self.index.urls)
        position = self.start + worker
        try:
            while True:
                samples = [self._sample(position * self.batch_size + i, reader, counter)
                           for i in range(self.batch_size)]
                batch = collate(samples)
                batch["skipped"] = torch.tensor(counter.take_skips(), dtype=torch.int64)
                batch["position"] = position
                yield batch
                position += num_workers
        finally:
            reader.close()


class ResumableLoader:
    """The training loader: a ``DataLoader`` over a :class:`TrainStream`, ``epoch_batches`` batches per epoch.

    Epoch ``e`` is the batches ``[e * epoch_batches, (e + 1) * epoch_batches)``; an iteration starts at the next
    epoch boundary, or, right after :meth:`load_state_dict` (or ``start``), at the saved position. One worker
    iterator runs across epochs; it is rebuilt only when the next batch it would give is not the one wanted.

    ``state_dict()`` is ``{"position": the batch a resumed run must start with}``, which Lightning stores in
    checkpoints and hands back on resume (its ``state_dict`` protocol for stateful loaders). A trainer fetches ahead
    and may be stopped in the middle of a step (SLURM's signal), so the position comes from ``resume_position``
    (a callable the trainer side provides: the batch the trainer's own resume logic will ask for next); without it,
    the batch after the last one handed out.
    """

    def __init__(self, stream: TrainStream, *, epoch_batches: int, num_workers: int = 0, pin_memory: bool = False,
                 transform: Callable[[dict], dict] | None = None, start: int = 0,
                 resume_position: Callable[[], int] | None = None) -> None:
        self.stream, self.epoch_batches, self.transform = stream, epoch_batches, transform
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.resume_position = resume_position
        self._resume: int | None = int(start)
        self._handed = int(start)  # the batch after the last one handed out
        self._iterator: Iterator[dict] | None = None
        self._iterator_next = -1

    def __len__(self) -> int:
        return self.epoch_batches

    def state_dict(self) -> dict[str, Any]:
        return {"position": int(self.resume_position()) if self.resume_position is not None else self._handed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = self._handed = int(state["position"])

    def _batches_from(self, position: int) -> Iterator[dict]:
        if self._iterator is None or self._iterator_next != position:
            self._iterator = None  # ends the old workers
            self.stream.start_at(position)
            loader = DataLoader(self.stream, batch_size=None, num_workers=self.num_workers,
                                pin_memory=self.pin_memory)
            self._iterator = iter(loader)
            self._iterator_next = position
        return self._iterator

    def __iter__(self) -> Iterator[dict]:
        n = self.epoch_batches
        start = self._resume if self._resume is not None else -(-self._handed // n) * n
        self._resume = None
        iterator = self._batches_from(start)
        for expected in range(start, (start // n + 1) * n):
            batch = next(iterator)
            self._iterator_next = self._handed = expected + 1
            if batch["position"] != expected:
                raise RuntimeError(f"training batches arrive out of order: got {batch['position']}, "
                                   f"expected {expected}")
            yield self.transform(batch) if self.transform is not None else batch


class _ValShards(IterableDataset):
    """The validation shard list, once, in order."""

    def __init__(self, urls: Sequence[str]):
        super().__init__()
        self.urls = list(urls)

    def __iter__(self) -> Iterator[dict]:
        return iter([{"url": u} for u in self.urls])


def tar_samples(handler: Callable[[Exception], bool] = wds.handlers.reraise_exception
                ) -> Callable[[Iterator[dict]], Iterator[dict]]:
    """webdataset's ``tarfile_to_samples`` with each shard file closed as soon as its samples are read or the stream
    is abandoned (validation stopping early): its ``url_opener`` leaves the file to the garbage collector.
    ``tar_samples()(iter([{"url": path}]))`` yields the samples of one shard."""
    tar = wds.tariterators

    def opened(src: Iterator[dict]) -> Iterator[dict]:
        for sample in src:
            try:
                stream = gopen(sample["url"])
            except Exception as exn:  # noqa: BLE001 (the handler decides, as in url_opener)
                exn.args = exn.args + (sample["url"],)
                if handler(exn):
                    continue
                break
            try:
                yield {**sample, "stream": stream}
            finally:
                stream.close()

    def samples(src: Iterator[dict]) -> Iterator[dict]:
        return tar.group_by_keys(tar.tar_file_expander(opened(src), handler=handler), handler=handler)

    return samples


def _every_nth_for_worker(src: Iterator[dict]) -> Iterator[dict]:
    _, _, worker, num_workers = worker_slot()
    for i, sample in enumerate(src):
        if i % num_workers == worker:
            yield sample


def val_pipeline(urls: Sequence[str], *, resolution: int, batch_size: int, mask_generator: Callable,
                 mask_seed: int = 0, image_keys: Sequence[str] = IMAGE_EXTENSIONS, paired: dict[str, str] | None = None,
                 paired_missing: str = "image", max_samples: int | None = None,
                 max_failure_ratio: float = 0.5, min_failures: int = 20) -> wds.DataPipeline:
    """The fixed validation set: every rank reads all of it (it is small), in shard order."""
    counter = FailureCounter(max_failure_ratio, min_failures)
    stages = [_ValShards(urls), tar_samples(counter.handler)]
    if max_samples is not None:
        stages.append(wds.slice(max_samples))
    stages += [
        _every_nth_for_worker,
        ValTransform(resolution=resolution, mask_generator=mask_generator, image_keys=tuple(image_keys),
                     paired=dict(paired or {}), paired_missing=paired_missing, mask_seed=mask_seed, counter=counter),
        wds.batched(batch_size, collation_fn=collate, partial=True),
    ]
    return wds.DataPipeline(*stages)

"""The bundled sample shard set: real photographs shipped with scikit-image, no network.

``ensure_sample_shards(root)`` builds (once) ``root/asuka-sample-shards-v1/`` with 64 training
samples in 8 shards (enough for 2 ranks x 2 workers x 2) and 8 validation samples in 2 shards, plus
a ``manifest.json``. Training samples are seeded random square crops (scale 0.35-1 of the shorter
side, random horizontal flip) of 8 photographs (astronaut, chelsea, coffee, rocket, the stereo
motorcycle, hubble deep field, immunohistochemistry, camera man), stored as JPEG (q95) with the
shorter side 320; validation samples are centre crops. The build takes about a second, is
idempotent, and is safe when several processes call it at once (it is written to a temporary
folder that is atomically renamed into place; the loser of the race discards its copy).

Command: ``python -m asuka.data.samples --out DIR`` (prints the shard paths).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np

from asuka.data.shards import MANIFEST_NAME, encode_image, manifest_shards, write_manifest, write_shards

__all__ = ["ensure_sample_shards", "sample_photos", "default_sample_root", "SAMPLE_SET_NAME"]

SAMPLE_SET_NAME = "asuka-sample-shards-v1"
_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle", "hubble_deep_field",
           "immunohistochemistry", "camera")
_STORED_SIZE = 320
_TRAIN_CROPS_PER_PHOTO = 8
_TRAIN_PER_SHARD = 8
_VAL_PER_SHARD = 4


def default_sample_root() -> Path:
    """``$ASUKA_CACHE`` or ``$XDG_CACHE_HOME/asuka`` or ``~/.cache/asuka``."""
    if os.environ.get("ASUKA_CACHE"):
        return Path(os.environ["ASUKA_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "asuka"


def sample_photos() -> dict[str, np.ndarray]:
    """The bundled photographs as RGB uint8 arrays (grey ones are stacked to RGB)."""
    from skimage import data

    photos = {}
    for name in _PHOTOS:
        img = getattr(data, name)()
        if isinstance(img, tuple):  # stereo_motorcycle -> (left, right, disparity)
            img = img[0]
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        photos[name] = np.ascontiguousarray(img[..., :3].astype(np.uint8))
    return photos


def _square_crop(img: np.ndarray, side: int, y0: int, x0: int, flip: bool) -> np.ndarray:
    crop = img[y0:y0 + side, x0:x0 + side]
    crop = cv2.resize(crop, (_STORED_SIZE, _STORED_SIZE), interpolation=cv2.INTER_AREA if side > _STORED_SIZE
                      else cv2.INTER_CUBIC)
    return crop[:, ::-1] if flip else crop


def _sample(key: str, rgb: np.ndarray, meta: dict) -> dict:
    return {"__key__": key, "jpg": encode_image(rgb, "jpg", 95), "json": json.dumps(meta).encode()}


def _train_samples(photos: dict[str, np.ndarray], rng: np.random.Generator):
    """Crop ``i`` of every photo, then crop ``i + 1``, ... so every shard mixes photographs."""
    crops = []
    for name, img in photos.items():
        h, w = img.shape[:2]
        for i in range(_TRAIN_CROPS_PER_PHOTO):
            side = int(min(h, w) * rng.uniform(0.35, 1.0))
            y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            crops.append((i, name, side, y0, x0, bool(rng.random() < 0.5)))
    for i, name, side, y0, x0, flip in sorted(crops, key=lambda c: c[0]):
        meta = {"source": f"skimage.data.{name}", "crop": [x0, y0, side, side], "flip": flip}
        yield _sample(f"{name}_{i:02d}", _square_crop(photos[name], side, y0, x0, flip), meta)


def _val_samples(photos: dict[str, np.ndarray]):
    for name, img in photos.items():
        h, w = img.shape[:2]
        side = min(h, w)
        y0, x0 = (h - side) // 2, (w - side) // 2
        meta = {"source": f"skimage.data.{name}", "crop": [x0, y0, side, side], "flip": False}
        yield _sample(f"{name}_val", _square_crop(img, side, y0, x0, False), meta)


def _build(folder: Path) -> None:
    photos = sample_photos()
    rng = np.random.default_rng(20231207)
    splits = {"train": write_shards(_train_samples(photos, rng), folder, "train", maxcount=_TRAIN_PER_SHARD),
              "val": write_shards(_val_samples(photos), folder, "val", maxcount=_VAL_PER_SHARD)}
    write_manifest(folder, splits, skipped={"train": 0, "val": 0},
                   extra={"source": "scikit-image bundled photographs", "stored_short_side": _STORED_SIZE})


def ensure_sample_shards(root: str | Path | None = None) -> dict[str, list[str]]:
    """Build the sample shard set under ``root`` (default :func:`default_sample_root`) if needed and
    return ``{"train": [tar paths], "val": [tar paths]}``."""
    root = Path(root) if root is not None else default_sample_root()
    folder = root / SAMPLE_SET_NAME
    if not (folder / MANIFEST_NAME).is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{SAMPLE_SET_NAME}-", dir=root))
        try:
            _build(tmp)
            tmp.chmod(0o755)  # mkdtemp creates 0700
            try:
                tmp.rename(folder)  # atomic; fails if another process finished first
            except OSError:
                if not (folder / MANIFEST_NAME).is_file():
                    raise RuntimeError(f"{folder} exists but holds no {MANIFEST_NAME}; delete it and retry") from None
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return {split: manifest_shards(folder, split) for split in ("train", "val")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the bundled sample shard set (scikit-image photographs).")
    parser.add_argument("--out", default=None, help=f"root folder (default {default_sample_root()})")
    args = parser.parse_args(argv)
    shards = ensure_sample_shards(args.out)
    for split, paths in shards.items():
        print(f"{split}: {len(paths)} shards")
        for p in paths:
            print(f"  {p}")


if __name__ == "__main__":
    main()

"""Webdataset shard helpers: clean keys, writing with a manifest, image decoding.

A sample is a dict with ``__key__`` and fields by extension (``jpg``/``png``: encoded image bytes,
``json``: metadata). Keys never contain dots (webdataset splits the extension at the first dot of
the basename) nor slashes. Every shard directory gets a ``manifest.json``::

    {"format": "asuka-shards-v1", "splits": {"train": {"samples": N, "shards": [
        {"name": "train-000000.tar", "samples": 100, "bytes": ..., "sha256": "..."}, ...]}},
     "skipped": {"train": 0}, ...}
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from pathlib import Path
from typing import Iterable, Iterator

import cv2
import numpy as np
from PIL import ImageOps

from asuka.image_limits import DEFAULT_MAX_PIXELS, ImageTooLargeError, image_size, read_header

__all__ = [
    "clean_key", "unique_keys", "encode_image", "decode_image", "read_image_file", "resize_short_side", "write_shards",
    "count_samples", "describe_shard", "write_manifest", "read_manifest", "manifest_shards", "manifest_splits",
    "MANIFEST_NAME", "IMAGE_EXTENSIONS",
]

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "asuka-shards-v1"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]+")


def clean_key(text: str) -> str:
    """A webdataset-safe key: every run of characters outside ``[A-Za-z0-9_-]`` (dots, slashes,
    spaces, ...) becomes one ``_``."""
    key = _BAD_KEY_CHARS.sub("_", text).strip("_")
    return key or "sample"


def unique_keys(names: Iterable[str]) -> Iterator[str]:
    """Clean keys, de-duplicated by appending ``_1``, ``_2``, ... (stable for a given input order)."""
    seen: set[str] = set()
    for name in names:
        base = key = clean_key(name)
        i = 0
        while key in seen:
            i += 1
            key = f"{base}_{i}"
        seen.add(key)
        yield key


def encode_image(rgb: np.ndarray, fmt: str = "jpg", quality: int = 95) -> bytes:
    """Encode an RGB uint8 (H,W,3) array as ``jpg``/``png``/``webp`` bytes."""
    fmt = fmt.lower()
    params = {"jpg": [cv2.IMWRITE_JPEG_QUALITY, quality], "jpeg": [cv2.IMWRITE_JPEG_QUALITY, quality],
              "webp": [cv2.IMWRITE_WEBP_QUALITY, quality], "png": [cv2.IMWRITE_PNG_COMPRESSION, 3]}
    if fmt not in params:
        raise ValueError(f"image format must be one of {sorted(params)}, got {fmt!r}")
    ok, buf = cv2.imencode("." + fmt, np.ascontiguousarray(rgb[..., ::-1]), params[fmt])
    if not ok:
        raise ValueError(f"could not encode an image of shape {rgb.shape} as {fmt}")
    return buf.tobytes()


def decode_image(data: bytes, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode image bytes to RGB uint8 (H,W,3); grey and RGBA become RGB. The size is checked from the header
    first (:mod:`asuka.image_limits`). Raises ValueError on bad data and images above ``max_pixels``."""
    try:
        image_size(data, max_pixels=max_pixels, what="the image")
    except ImageTooLargeError:
        raise
    except ValueError as error:
        raise ValueError(f"undecodable image bytes ({error})") from None
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if arr is None:
        raise ValueError("undecodable image bytes")
    return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)


def read_image_file(path: str | Path, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file as RGB uint8 (H,W,3) with its EXIF orientation applied. The size is checked from the
    header before decoding; a truncated or corrupt file raises ``ValueError`` (never a grey-filled image)."""
    image_size(path, max_pixels=max_pixels)
    try:
        with read_header(path) as img:
            img.load()  # Pillow raises on truncated data (libjpeg would fill the rest with grey)
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey: keep the high byte, like OpenCV
                grey = (np.asarray(img, dtype=np.int64) >> 8).clip(0, 255).astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=-1)
            return np.asarray(img.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"{path} cannot be decoded ({type(error).__name__}: {error}); it is truncated or "
                         "corrupt") from None


def resize_short_side(rgb: np.ndarray, size: int | None) -> tuple[np.ndarray, float]:
    """Downscale (area) so the shorter side is ``size``; never upscales. Returns (image, scale)."""
    h, w = rgb.shape[:2]
    if size is None or min(h, w) <= size:
        return rgb, 1.0
    scale = size / min(h, w)
    out = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    return out, scale


def count_samples(path: str | Path) -> int:
    """Number of samples (distinct keys) in a tar shard."""
    with tarfile.open(path) as tar:
        return len({m.name.split("/")[-1].split(".", 1)[0] for m in tar.getmembers() if m.isfile()})


def describe_shard(path: str | Path) -> dict:
    """Manifest entry of one tar shard: name, number of samples (distinct keys), bytes, sha256."""
    path = Path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"name": path.name, "samples": count_samples(path), "bytes": path.stat().st_size,
            "sha256": digest.hexdigest()}


def write_shards(samples: Iterable[dict], out_dir: str | Path, prefix: str = "train", *, maxcount: int = 1000,
                 maxsize: float = 3e9) -> list[Path]:
    """Write ``samples`` with ``webdataset.ShardWriter`` to ``out_dir/{prefix}-%06d.tar``; returns the paths."""
    import webdataset as wds

    if maxcount < 1:
        raise ValueError(f"maxcount must be >= 1, got {maxcount}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with wds.ShardWriter(str(out_dir / f"{clean_key(prefix)}-%06d.tar"), maxcount=maxcount, maxsize=maxsize,
                         verbose=0, post=lambda fname: written.append(Path(fname))) as sink:
        for sample in samples:
            key = sample["__key__"]
            if key != clean_key(key):
                raise ValueError(f"sample key {key!r} is not clean (use asuka.data.shards.clean_key)")
            sink.write(sample)
    return sorted(written)


def write_manifest(out_dir: str | Path, splits: dict[str, list[Path | dict]], *,
                   skipped: dict[str, int] | None = None, extra: dict | None = None) -> Path:
    """Describe every shard of every split in ``out_dir/manifest.json``.

    A split lists shard paths (read and hashed by :func:`describe_shard`) or entries already described, e.g. kept
    from the folder's previous manifest (written as given, without reading the shard again).
    """
    out_dir = Path(out_dir)
    manifest = {"format": MANIFEST_FORMAT, "splits": {}, "skipped": dict(skipped or {}), **(extra or {})}
    for name, paths in splits.items():
        entries = [p if isinstance(p, dict) else describe_shard(p) for p in paths]
        manifest["splits"][name] = {"samples": sum(e["samples"] for e in entries), "shards": entries}
    path = out_dir / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(path)
    return path


def read_manifest(out_dir: str | Path) -> dict:
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {out_dir}; build the shards first")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} has format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    return manifest


def manifest_shards(out_dir: str | Path, split: str) -> list[str]:
    """Absolute shard paths of ``split`` listed in ``out_dir``'s manifest."""
    manifest = read_manifest(out_dir)
    if split not in manifest["splits"]:
        raise ValueError(f"split {split!r} not in {out_dir}/{MANIFEST_NAME}; it has {sorted(manifest['splits'])} "
                         f"(write it with `python -m asuka.data.make_shards --split {split} ...`)")
    return _shard_paths(out_dir, manifest["splits"][split])


def manifest_splits(out_dir: str | Path) -> dict[str, list[str]]:
    """``{split: absolute shard paths}`` for every split of ``out_dir``'s manifest."""
    return {name: _shard_paths(out_dir, info) for name, info in read_manifest(out_dir)["splits"].items()}


def _shard_paths(out_dir: str | Path, split_info: dict) -> list[str]:
    return [str(Path(out_dir, e["name"]).resolve()) for e in split_info["shards"]]

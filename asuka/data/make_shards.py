"""Write webdataset shards from a folder of images.

    python -m asuka.data.make_shards --images DIR --out DIR [--coco-annotations FILE] [--size N]
        [--maxcount N] [--split train] [--format jpg] [--quality 95] [--workers N] [--max-pixels N]

Each sample holds the image (``jpg``/``png``/``webp``; the shorter side downscaled to ``--size`` when
given, never upscaled) and ``json`` metadata (source path relative to ``--images``, original and
stored size). With ``--coco-annotations``, images are matched to COCO ``images[*].file_name`` and the
metadata gets ``objects``: category id, ``iscrowd`` and polygons (RLE decoded to outer contours) in
stored-image pixels; the annotations are also written as a pre-decoded object-shape bank
``object_shapes.npz`` for ``object_masks=`` of the mask recipes.

Keys are clean (``[A-Za-z0-9_-]``, no dots), unique, and derived from the relative path. Unreadable
images — corrupt or truncated files (never stored grey-filled), and images above ``--max-pixels`` (checked from the
header before decoding, :mod:`asuka.image_limits`) — are skipped, counted and the first few named. Bad arguments end
with a one-line error and exit status 2. ``OUT/manifest.json`` lists every shard with its sample count and
sha256. Shards are named ``{split}-%06d.tar``; run once per split (``--split val``), the manifest
keeps the other splits already in ``OUT``.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from multiprocessing import Pool
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from asuka.image_limits import DEFAULT_MAX_PIXELS

from asuka.data.shapes import ShapeBank, coco_annotation_polygons
from asuka.data.shards import (MANIFEST_NAME, clean_key, encode_image, read_image_file, read_manifest,
                               resize_short_side, unique_keys, write_manifest, write_shards)

__all__ = ["make_shards", "list_images", "main"]

_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted for a reproducible order."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in _SUFFIXES)


def _coco_objects(path: Path) -> dict[str, list[dict]]:
    """``file_name`` (and its basename) -> list of {category_id, iscrowd, polygons} in source pixels."""
    data = json.loads(path.read_text())
    if "images" not in data or "annotations" not in data:
        raise ValueError(f"{path} is not a COCO instances file (needs 'images' and 'annotations')")
    by_id = {im["id"]: im["file_name"] for im in data["images"]}
    objects: dict[str, list[dict]] = {name: [] for name in by_id.values()}
    for ann in data["annotations"]:
        name = by_id.get(ann.get("image_id"))
        if name is None or not ann.get("segmentation"):
            continue
        polys = coco_annotation_polygons(ann)
        objects[name].append({"category_id": ann.get("category_id"), "iscrowd": int(ann.get("iscrowd", 0)),
                              "polygons": [p.tolist() for p in polys]})
    for name in list(objects):
        objects.setdefault(Path(name).name, objects[name])
    return objects


def _encode_one(job: tuple[str, str, list | None], *, root: str, size: int | None, fmt: str, quality: int,
                max_pixels: int | None) -> dict | str:
    """Read, resize and encode one image (runs in worker processes); the reason as a string when unreadable."""
    key, rel, objects = job
    try:
        rgb = read_image_file(Path(root) / rel, max_pixels=max_pixels)
    except ValueError as error:
        return f"{rel}: {error}"
    if rgb.size == 0:
        return f"{rel}: empty image"
    h, w = rgb.shape[:2]
    rgb, scale = resize_short_side(rgb, size)
    meta = {"source": rel, "original_size": [w, h], "size": [rgb.shape[1], rgb.shape[0]]}
    if objects is not None:
        meta["objects"] = [{**o, "polygons": [[[round(x * scale, 2), round(y * scale, 2)] for x, y in poly]
                                              for poly in o["polygons"]]} for o in objects]
    return {"__key__": key, fmt: encode_image(rgb, fmt, quality), "json": json.dumps(meta).encode()}


def make_shards(images: str | Path, out: str | Path, *, coco_annotations: str | Path | None = None,
                size: int | None = None, maxcount: int = 1000, split: str = "train", fmt: str = "jpg",
                quality: int = 95, workers: int = 0, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                progress: bool = True) -> dict:
    """Build shards (module docstring); returns ``{"shards": [...], "samples": n, "skipped": n,
    "skipped_files": ["relative path: reason", ...]}``."""
    images, out = Path(images), Path(out)
    if not images.is_dir():
        raise FileNotFoundError(f"--images folder not found: {images}")
    if size is not None and size < 8:
        raise ValueError(f"--size must be >= 8, got {size}")
    if maxcount < 1:
        raise ValueError(f"--maxcount must be >= 1 (samples per shard), got {maxcount}")
    if not 1 <= quality <= 100:
        raise ValueError(f"--quality must be in 1..100, got {quality}")
    if workers < 0:
        raise ValueError(f"--workers must be >= 0, got {workers}")
    if max_pixels is not None and max_pixels < 1:
        raise ValueError(f"--max-pixels must be >= 1, got {max_pixels}")
    files = list_images(images)
    if not files:
        raise FileNotFoundError(f"no images ({sorted(_SUFFIXES)}) under {images}")
    objects = _coco_objects(Path(coco_annotations)) if coco_annotations is not None else None
    rels = [p.relative_to(images).as_posix() for p in files]
    keys = unique_keys(str(Path(r).with_suffix("")) for r in rels)
    jobs = [(k, r, None if objects is None else objects.get(r, objects.get(Path(r).name, [])))
            for k, r in zip(keys, rels)]
    encode = partial(_encode_one, root=str(images), size=size, fmt=fmt, quality=quality, max_pixels=max_pixels)
    counts = {"written": 0, "skipped": 0}
    skipped_files: list[str] = []

    def samples(results: Iterator[dict | str]) -> Iterator[dict]:
        bar = tqdm(results, total=len(jobs), desc=f"shards:{split}", unit="img", disable=not progress)
        for sample in bar:
            if isinstance(sample, str):
                counts["skipped"] += 1
                skipped_files.append(sample)
                bar.set_postfix(skipped=counts["skipped"])
                continue
            counts["written"] += 1
            yield sample

    if workers > 0:
        with Pool(workers) as pool:
            paths = write_shards(samples(pool.imap(encode, jobs, chunksize=16)), out, split, maxcount=maxcount)
    else:
        paths = write_shards(samples(map(encode, jobs)), out, split, maxcount=maxcount)

    splits, skipped = {}, {}
    if (out / MANIFEST_NAME).is_file():  # keep other splits written earlier into the same folder
        old = read_manifest(out)
        for name, entry in old["splits"].items():
            if name != split:
                splits[name] = list(entry["shards"])  # described already: not re-read and re-hashed
                skipped[name] = old.get("skipped", {}).get(name, 0)
    splits[split], skipped[split] = paths, counts["skipped"]
    extra = {"source": str(images.resolve()), "image_format": fmt, "short_side": size}
    shapes = [o["polygons"] for _, _, objs in jobs for o in (objs or []) if o["polygons"]]
    if shapes:  # the sharded images' objects, pre-decoded for ObjectShape(object_masks=...)
        extra["object_shapes"] = ShapeBank.from_shapes(shapes).save(out / "object_shapes.npz").name
    write_manifest(out, splits, skipped=skipped, extra=extra)
    return {"shards": [str(p) for p in paths], "samples": counts["written"], "skipped": counts["skipped"],
            "skipped_files": skipped_files}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m asuka.data.make_shards", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, help="folder of images (searched recursively)")
    parser.add_argument("--out", required=True, help="output folder for the shards and manifest.json")
    parser.add_argument("--coco-annotations", default=None, help="COCO instances JSON: store object polygons")
    parser.add_argument("--size", type=int, default=None, help="downscale the shorter side to N (never upscales)")
    parser.add_argument("--maxcount", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--split", default="train", help="shard name prefix / manifest split (default train)")
    parser.add_argument("--format", default="jpg", choices=["jpg", "png", "webp"], help="stored image format")
    parser.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality (default 95)")
    parser.add_argument("--workers", type=int, default=0, help="encoding processes (default 0 = in process)")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help=f"skip images with more pixels, read from the header (default {DEFAULT_MAX_PIXELS})")
    args = parser.parse_args(argv)
    try:
        result = make_shards(args.images, args.out, coco_annotations=args.coco_annotations, size=args.size,
                             maxcount=args.maxcount, split=clean_key(args.split), fmt=args.format,
                             quality=args.quality, workers=args.workers, max_pixels=args.max_pixels)
    except (ValueError, OSError) as error:  # bad arguments and files: one line, no traceback
        print(f"{parser.prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    print(f"wrote {result['samples']} samples in {len(result['shards'])} shards to {args.out} "
          f"({result['skipped']} unreadable images skipped)")
    for line in result["skipped_files"][:5]:
        print(f"  skipped {line}")
    if result["skipped"] > 5:
        print(f"  ... and {result['skipped'] - 5} more")
    return 0


if __name__ == "__main__":
    sys.exit(main())

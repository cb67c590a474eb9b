"""Write webdataset shards from a folder of images.

    python -m asuka.data.make_shards --images DIR --out DIR [--coco-annotations FILE] [--size N]
        [--maxcount N] [--split train] [--format jpg] [--quality 95] [--workers N]

Each sample holds the image (``jpg``/``png``/``webp``; the shorter side downscaled to ``--size`` when
given, never upscaled) and ``json`` metadata (source path relative to ``--images``, original and
stored size). With ``--coco-annotations``, images are matched to COCO ``images[*].file_name`` and the
metadata gets ``objects``: category id, ``iscrowd`` and polygons (RLE decoded to outer contours) in
stored-image pixels; the annotations are also written as a pre-decoded object-shape bank
``object_shapes.npz`` for ``object_masks=`` of the mask recipes.

Keys are clean (``[A-Za-z0-9_-]``, no dots), unique, and derived from the relative path. Unreadable
images are skipped and counted. ``OUT/manifest.json`` lists every shard with its sample count and
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

import cv2
from tqdm import tqdm

from asuka.data.shapes import ShapeBank, coco_annotation_polygons
from asuka.data.shards import (MANIFEST_NAME, clean_key, encode_image, read_manifest, resize_short_side,
                               unique_keys, write_manifest, write_shards)

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


def _encode_one(job: tuple[str, str, list | None], *, root: str, size: int | None, fmt: str, quality: int) -> dict | None:
    """Read, resize and encode one image (runs in worker processes); None when unreadable."""
    key, rel, objects = job
    bgr = cv2.imread(str(Path(root) / rel), cv2.IMREAD_COLOR)
    if bgr is None or bgr.size == 0:
        return None
    rgb = bgr[..., ::-1]
    h, w = rgb.shape[:2]
    rgb, scale = resize_short_side(rgb, size)
    meta = {"source": rel, "original_size": [w, h], "size": [rgb.shape[1], rgb.shape[0]]}
    if objects is not None:
        meta["objects"] = [{**o, "polygons": [[[round(x * scale, 2), round(y * scale, 2)] for x, y in poly]
                                              for poly in o["polygons"]]} for o in objects]
    return {"__key__": key, fmt: encode_image(rgb, fmt, quality), "json": json.dumps(meta).encode()}


def make_shards(images: str | Path, out: str | Path, *, coco_annotations: str | Path | None = None,
                size: int | None = None, maxcount: int = 1000, split: str = "train", fmt: str = "jpg",
                quality: int = 95, workers: int = 0, progress: bool = True) -> dict:
    """Build shards (module docstring); returns ``{"shards": [...], "samples": n, "skipped": n}``."""
    images, out = Path(images), Path(out)
    if not images.is_dir():
        raise FileNotFoundError(f"--images folder not found: {images}")
    if size is not None and size < 8:
        raise ValueError(f"--size must be >= 8, got {size}")
    files = list_images(images)
    if not files:
        raise FileNotFoundError(f"no images ({sorted(_SUFFIXES)}) under {images}")
    objects = _coco_objects(Path(coco_annotations)) if coco_annotations is not None else None
    rels = [p.relative_to(images).as_posix() for p in files]
    keys = unique_keys(str(Path(r).with_suffix("")) for r in rels)
    jobs = [(k, r, None if objects is None else objects.get(r, objects.get(Path(r).name, [])))
            for k, r in zip(keys, rels)]
    encode = partial(_encode_one, root=str(images), size=size, fmt=fmt, quality=quality)
    counts = {"written": 0, "skipped": 0}

    def samples(results: Iterator[dict | None]) -> Iterator[dict]:
        bar = tqdm(results, total=len(jobs), desc=f"shards:{split}", unit="img", disable=not progress)
        for sample in bar:
            if sample is None:
                counts["skipped"] += 1
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
    return {"shards": [str(p) for p in paths], "samples": counts["written"], "skipped": counts["skipped"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
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
    args = parser.parse_args(argv)
    result = make_shards(args.images, args.out, coco_annotations=args.coco_annotations, size=args.size,
                         maxcount=args.maxcount, split=clean_key(args.split), fmt=args.format, quality=args.quality,
                         workers=args.workers)
    print(f"wrote {result['samples']} samples in {len(result['shards'])} shards to {args.out} "
          f"({result['skipped']} unreadable images skipped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Object-shape banks: pre-decoded object outlines for the object-shape mask generator.

ASUKA's object-shape masks come from COCO instance segments (paper §3.1). Decoding COCO polygons or
RLE for every training mask would be slow, so shapes are decoded **once** into a compact bank of
polygons normalised to their bounding box (``points`` in [0, 1]²). Drawing a shape is then one
``cv2.fillPoly`` call at any size, position and flip.

Sources (:func:`load_shape_bank`):

- a COCO instances JSON (``annotations[*].segmentation`` as polygons, or RLE through pycocotools);
- a folder of segmentation PNGs (one object per file; every non-zero pixel is object);
- an ``.npz`` bank written by :meth:`ShapeBank.save` (``make_shards --coco-annotations`` writes one);
- ``None`` / ``"bundled"``: a small demo bank derived from scikit-image's bundled images (the horse
  silhouette, the camera man, the scikit-image logo, coins, glyphs of the ``text`` image and a few
  binary blobs). It exists so demos and tests run offline; it is far less diverse than COCO, so
  paper-scale training should pass a COCO source.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np

from asuka.image_limits import DEFAULT_MAX_PIXELS, image_size

__all__ = ["ShapeBank", "load_shape_bank", "bundled_shape_bank", "polygons_from_binary"]

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


def polygons_from_binary(mask: np.ndarray, *, min_points: int = 3) -> list[np.ndarray]:
    """Outer contours (float32 (N,2) x/y pixel coordinates) of a binary mask; holes are filled."""
    binary = np.ascontiguousarray(mask > 0, dtype=np.uint8)
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [c.reshape(-1, 2).astype(np.float32) for c in contours if len(c) >= min_points]


def _shoelace(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _read_segmentation(path: Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A segmentation image as grey uint8; the size is checked from the header first (:mod:`asuka.image_limits`)."""
    image_size(path, max_pixels=max_pixels)
    grey = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if grey is None:
        raise ValueError(f"{path} cannot be decoded as a segmentation image")
    return grey


@dataclass(frozen=True)
class ShapeBank:
    """Object outlines normalised to their bounding box.

    ``points`` (P,2) float32 in [0,1] (x, y); ``poly_offsets`` (n_polys+1,) indexes ``points``;
    ``shape_offsets`` (n_shapes+1,) indexes polygons; ``aspect`` = bbox width / height in pixels;
    ``fill`` = polygon area / bbox area (used to hit a target hole area).
    """

    points: np.ndarray
    poly_offsets: np.ndarray
    shape_offsets: np.ndarray
    aspect: np.ndarray
    fill: np.ndarray

    def __len__(self) -> int:
        return len(self.aspect)

    @classmethod
    def from_shapes(cls, shapes: Iterable[Sequence[np.ndarray]], *, min_size: float = 4.0) -> "ShapeBank":
        """Build from shapes given as lists of (N,2) x/y polygons in any pixel coordinates.

        Shapes whose bounding box is smaller than ``min_size`` pixels on a side are dropped.
        """
        points, poly_off, shape_off, aspect, fill = [], [0], [0], [], []
        for polys in shapes:
            polys = [np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in polys]
            polys = [p for p in polys if len(p) >= 3]
            if not polys:
                continue
            allp = np.concatenate(polys)
            lo, hi = allp.min(0), allp.max(0)
            size = hi - lo
            if size.min() < min_size:
                continue
            area = sum(_shoelace(p) for p in polys)
            for p in polys:
                points.append(((p - lo) / size).astype(np.float32))
                poly_off.append(poly_off[-1] + len(p))
            shape_off.append(len(poly_off) - 1)
            aspect.append(size[0] / size[1])
            fill.append(min(max(area / (size[0] * size[1]), 1e-3), 1.0))
        if not aspect:
            raise ValueError("no usable object shapes found (every shape was empty or smaller than min_size)")
        return cls(
            points=np.concatenate(points),
            poly_offsets=np.asarray(poly_off, dtype=np.int64),
            shape_offsets=np.asarray(shape_off, dtype=np.int64),
            aspect=np.asarray(aspect, dtype=np.float32),
            fill=np.asarray(fill, dtype=np.float32),
        )

    @classmethod
    def from_binary_masks(cls, masks: Iterable[np.ndarray]) -> "ShapeBank":
        """One shape per binary mask (all its outer contours)."""
        return cls.from_shapes(polygons_from_binary(m) for m in masks)

    @classmethod
    def from_coco(cls, path: str | Path, *, max_shapes: int | None = None, min_area: float = 64.0,
                  seed: int = 0) -> "ShapeBank":
        """Decode a COCO instances JSON: polygons directly, RLE (``iscrowd``) through pycocotools.

        ``max_shapes`` keeps a random subset (seeded) to bound memory for huge annotation files.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"COCO annotation file not found: {path}")
        with open(path) as f:
            data = json.load(f)
        if "annotations" not in data:
            raise ValueError(f"{path} is not a COCO instances file (no 'annotations' list)")
        anns = [a for a in data["annotations"] if a.get("area", min_area) >= min_area and a.get("segmentation")]
        if max_shapes is not None and len(anns) > max_shapes:
            idx = np.random.default_rng(seed).choice(len(anns), size=max_shapes, replace=False)
            anns = [anns[i] for i in sorted(idx)]
        images = {im["id"]: im for im in data.get("images", [])}
        return cls.from_shapes(coco_annotation_polygons(a, images.get(a.get("image_id"))) for a in anns)

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ShapeBank":
        """One shape per segmentation image in ``folder`` (non-zero pixels = object)."""
        folder = Path(folder)
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"no segmentation images ({sorted(_IMAGE_SUFFIXES)}) found under {folder}")
        return cls.from_binary_masks(_read_segmentation(f) > 127 for f in files)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:  # file handle: np.savez would otherwise append ".npz"
            np.savez_compressed(f, points=self.points, poly_offsets=self.poly_offsets,
                                shape_offsets=self.shape_offsets, aspect=self.aspect, fill=self.fill)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ShapeBank":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"shape bank not found: {path}")
        with np.load(path, allow_pickle=False) as z:
            missing = {"points", "poly_offsets", "shape_offsets", "aspect", "fill"} - set(z.files)
            if missing:
                raise ValueError(f"{path} is not a shape bank; missing arrays {sorted(missing)}")
            return cls(**{k: z[k] for k in ("points", "poly_offsets", "shape_offsets", "aspect", "fill")})

    def subset(self, indices: Sequence[int]) -> "ShapeBank":
        """A bank with only the shapes at ``indices``."""
        shapes = []
        for i in indices:
            j0, j1 = self.shape_offsets[i], self.shape_offsets[i + 1]
            polys = [self.points[self.poly_offsets[j]:self.poly_offsets[j + 1]] for j in range(j0, j1)]
            shapes.append((polys, self.aspect[i], self.fill[i]))
        points = [p for polys, _, _ in shapes for p in polys]
        poly_sizes = [len(p) for p in points]
        shape_sizes = [len(polys) for polys, _, _ in shapes]
        return ShapeBank(points=np.concatenate(points),
                         poly_offsets=np.concatenate([[0], np.cumsum(poly_sizes)]).astype(np.int64),
                         shape_offsets=np.concatenate([[0], np.cumsum(shape_sizes)]).astype(np.int64),
                         aspect=np.asarray([a for _, a, _ in shapes], np.float32),
                         fill=np.asarray([f for _, _, f in shapes], np.float32))

    def polygons(self, index: int, x0: float, y0: float, box_w: float, box_h: float,
                 flip_x: bool = False, flip_y: bool = False) -> list[np.ndarray]:
        """Shape ``index`` as int32 pixel polygons inside the box (x0, y0, box_w, box_h)."""
        out = []
        for j in range(self.shape_offsets[index], self.shape_offsets[index + 1]):
            p = self.points[self.poly_offsets[j]:self.poly_offsets[j + 1]]
            x = 1.0 - p[:, 0] if flip_x else p[:, 0]
            y = 1.0 - p[:, 1] if flip_y else p[:, 1]
            out.append(np.stack([x0 + x * box_w, y0 + y * box_h], axis=1).round().astype(np.int32))
        return out


def coco_annotation_polygons(ann: dict, image: dict | None = None) -> list[np.ndarray]:
    """Polygons of one COCO annotation (polygon list, or RLE / uncompressed RLE via pycocotools)."""
    seg = ann["segmentation"]
    if isinstance(seg, list):
        return [np.asarray(p, dtype=np.float32).reshape(-1, 2) for p in seg if len(p) >= 6]
    from pycocotools import mask as mask_utils

    if isinstance(seg.get("counts"), list):  # uncompressed RLE
        h, w = seg["size"]
        seg = mask_utils.frPyObjects(seg, h, w)
    return polygons_from_binary(mask_utils.decode(seg))


def _bundled_binary_masks() -> list[np.ndarray]:
    from skimage import data
    from skimage.filters import threshold_otsu

    def components(binary: np.ndarray, min_area: int) -> list[np.ndarray]:
        n, labels, stats, _ = cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=8)
        return [labels == i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= min_area]

    masks = [~data.horse()]
    camera = data.camera()
    masks += components(camera < threshold_otsu(camera), 5000)  # the camera man
    masks += components(data.logo()[..., 3] > 127, 500)
    coins = data.coins()
    masks += components(coins > threshold_otsu(coins), 300)
    text = data.text()
    masks += components(text < threshold_otsu(text), 100)
    for seed in range(3):
        blobs = data.binary_blobs(length=256, blob_size_fraction=0.15, volume_fraction=0.3, rng=seed)
        masks += components(blobs, 200)
    return masks


@lru_cache(maxsize=1)
def bundled_shape_bank() -> ShapeBank:
    """Demo bank from scikit-image's bundled images (offline; see the module docstring). Shapes
    covering less than 20 % of their bounding box (thin diagonal fragments) are dropped."""
    bank = ShapeBank.from_binary_masks(_bundled_binary_masks())
    return bank.subset(np.flatnonzero(bank.fill >= 0.2))


def load_shape_bank(source: "str | Path | ShapeBank | None" = None, *, max_shapes: int | None = None) -> ShapeBank:
    """Resolve an object-shape source: bank, ``.npz``, COCO ``.json`` (at most ``max_shapes`` random
    annotations), folder of PNGs, or None / ``"bundled"``."""
    if isinstance(source, ShapeBank):
        return source
    if source is None or source == "bundled":
        return bundled_shape_bank()
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"object_masks source not found: {path} (pass a COCO .json, a folder of PNGs, "
                                "a shape-bank .npz, or None for the bundled demo shapes)")
    if path.is_dir():
        return ShapeBank.from_folder(path)
    if path.suffix == ".npz":
        return ShapeBank.load(path)
    if path.suffix == ".json":
        return ShapeBank.from_coco(path, max_shapes=max_shapes)
    raise ValueError(f"object_masks={source!r}: expected a COCO .json, a folder of PNGs or a shape-bank .npz")

"""Inpainting mask generators and named recipes (ASUKA paper §3.1, §4; LaMa ``saicinpainting/training/data/masks.py``).

Every generator is a callable ``gen(height, width, rng: np.random.Generator) -> np.ndarray`` of
float32 (H, W) with **1 = hole**. Generators are small picklable dataclasses, so they travel to
DataLoader workers, and all randomness comes from the ``rng`` argument (no global state).

Mask bases:

- :class:`LamaIrregular`, :class:`LamaRectangles`, :class:`LamaMixed`: LaMa's
  ``make_random_irregular_mask`` / ``make_random_rectangle_mask`` / ``MixedMaskGenerator`` with the
  ``configs/data_gen/random_{thin,medium,thick}_{256,512}.yaml`` presets, including
  ``max_tamper_area: 0.5`` (masks covering more than half the image are redrawn).
- :class:`CoModMask`: Co-Mod-GAN's ``RandomMask`` (``MultiFill(10, s/2)``, ``MultiFill(5, s)`` and
  ``RandomBrush(20, s)``); Co-Mod's native polarity (0 = hole) is converted here.
- :class:`Rectangle`, :class:`ComplementRectangle`: regular masks (the complement keeps one rectangle).
- :class:`ObjectShape`: object outlines (COCO segments, PNG folder or the bundled demo bank; see
  :mod:`asuka.data.shapes`) randomly scaled, moved and flipped onto the canvas.
- :class:`AsukaMixture`: the ASUKA mix — 50 % object-shape (united with an irregular mask 50 % of the
  time), 40 % irregular (Co-Mod or LaMa), 10 % regular — with the hole ratio kept in a range.

Hole-ratio control (:func:`enforce_hole_ratio`): a candidate outside the range is redrawn (from the
same mask basis, so the mixture's basis frequencies are exact) at most ``max_tries`` times; then the
last candidate is repaired deterministically by :func:`repair_hole_ratio` — never an endless loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Protocol

import cv2
import numpy as np

from asuka.data.shapes import ShapeBank, load_shape_bank

__all__ = [
    "MaskGenerator", "LamaIrregular", "LamaRectangles", "LamaMixed", "CoModMask", "Rectangle",
    "ComplementRectangle", "ObjectShape", "AsukaMixture", "enforce_hole_ratio", "repair_hole_ratio",
    "hole_ratio", "get_mask_generator", "available_recipes", "RECIPES",
]


class MaskGenerator(Protocol):
    def __call__(self, height: int, width: int, rng: np.random.Generator) -> np.ndarray: ...


def _check_args(height: int, width: int, rng) -> None:
    if not (isinstance(height, (int, np.integer)) and isinstance(width, (int, np.integer))) or height < 8 or width < 8:
        raise ValueError(f"mask size must be integers >= 8, got height={height!r}, width={width!r}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), got {type(rng).__name__}")


def hole_ratio(mask: np.ndarray) -> float:
    """Fraction of hole pixels (mask > 0)."""
    return np.count_nonzero(mask) / mask.size


def _to_float(mask: np.ndarray) -> np.ndarray:
    return (mask > 0).astype(np.float32)


class _Base:
    """Shared ``__call__``: argument checks, then ``_generate`` (uint8 {0,1}), then float32."""

    def __call__(self, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
        _check_args(height, width, rng)
        return _to_float(self._generate(int(height), int(width), rng))

    def _generate(self, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
        return self.draw(height, width, rng)

    def draw(self, height: int, width: int, rng: np.random.Generator) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError


def _scale(value: float, height: int, width: int, reference: int | None) -> float:
    return value if reference is None else value * min(height, width) / reference


def _pixels(value: float, height: int, width: int, reference: int | None, minimum: int = 0) -> int:
    """A pixel size scaled to the canvas (see ``reference_size``), rounded, at least ``minimum``."""
    return max(minimum, int(round(_scale(value, height, width, reference))))


# --------------------------------------------------------------------------------------------- LaMa


@dataclass(frozen=True)
class LamaIrregular(_Base):
    """LaMa ``make_random_irregular_mask`` (line strokes; angles are integer radians + 0.01 as in LaMa).

    ``reference_size``: when set, lengths and widths are scaled by ``min(H, W) / reference_size``.
    """

    max_angle: int = 4
    max_len: int = 60
    max_width: int = 20
    min_times: int = 0
    max_times: int = 10
    reference_size: int | None = None

    def draw(self, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
        mask = np.zeros((height, width), np.uint8)
        max_len = _pixels(self.max_len, height, width, self.reference_size, 1)
        max_width = _pixels(self.max_width, height, width, self.reference_size, 1)
        base_len = _scale(10, height, width, self.reference_size)
        base_w = _pixels(5, height, width, self.reference_size, 1)
        times = int(rng.integers(self.min_times, self.max_times + 1))
        if times == 0:
            return mask
        # All random numbers in a few vectorised draws (same distributions as LaMa's scalar calls).
        starts = rng.integers((width, height), size=(times, 2)).tolist()
        n_seg = (1 + rng.integers(5, size=times)).tolist()
        total = sum(n_seg)
        angles = (0.01 + rng.integers(self.max_angle, size=total)).tolist()
        lengths = (base_len + rng.integers(max_len, size=total)).tolist()
        brushes = (base_w + rng.integers(max_width, size=total)).tolist()
        k = 0
        for i in range(times):
            x, y = starts[i]
            for _ in range(n_seg[i]):
                angle = 2 * math.pi - angles[k] if i % 2 == 0 else angles[k]
                ex = min(max(int(x + lengths[k] * math.sin(angle)), 0), width)
                ey = min(max(int(y + lengths[k] * math.cos(angle)), 0), height)
                cv2.line(mask, (x, y), (ex, ey), 1, brushes[k])
                x, y = ex, ey
                k += 1
        return mask


@dataclass(frozen=True)
class LamaRectangles(_Base):
    """LaMa ``make_random_rectangle_mask`` (``min_times``..``max_times`` boxes inside a margin)."""

    margin: int = 10
    bbox_min_size: int = 30
    bbox_max_size: int = 100
    min_times: int = 0
    max_times: int = 3
    reference_size: int | None = None

    def draw(self, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
        mask = np.zeros((height, width), np.uint8)
        margin = _pixels(self.margin, height, width, self.reference_size)
        bmin = _pixels(self.bbox_min_size, height, width, self.reference_size, 1)
        bmax = _pixels(self.bbox_max_size, height, width, self.reference_size)
        bmax = min(bmax, height - 2 * margin, width - 2 * margin)
        if bmax <= bmin:
            raise ValueError(f"canvas {height}x{width} is too small for boxes of {bmin}..{bmax} px with margin {margin}")
        for _ in range(int(rng.integers(self.min_times, self.max_times + 1))):
            bw, bh = int(rng.integers(bmin, bmax)), int(rng.integers(bmin, bmax))
            x0 = int(rng.integers(margin, width - margin - bw + 1))
            y0 = int(rng.integers(margin, height - margin - bh + 1))
            mask[y0:y0 + bh, x0:x0 + bw] = 1
        return mask


@dataclass(frozen=True)
class LamaMixed(_Base):
    """LaMa ``MixedMaskGenerator`` (irregular / box chosen by renormalised probabilities), plus the
    data_gen ``max_tamper_area`` filter: masks with hole ratio above it are redrawn (bounded)."""

    irregular: LamaIrregular = field(default_factory=LamaIrregular)
    box: LamaRectangles | None = None
    irregular_proba: float = 1.0
    box_proba: float = 0.0
    max_tamper_area: float = 0.5
    max_tries: int = 10

    def draw(self, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
        p_box = self.box_proba / (self.irregular_proba + self.box_proba) if self.box is not None else 0.0
        return (self.box if rng.random() < p_box else self.irregular).draw(height, width, rng)

    def _generate(self, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
        # (0, max_tamper_area]: LaMa drops masks above the area; empty masks are redrawn too.
        return enforce_hole_ratio(self.draw, height, width, rng, (1.0 / (height * width), self.max_tamper_area),
                                  self.max_tries)


# ------------------------------------------------------------------------------------------- Co-Mod


@dataclass(frozen=True)
class CoModMask(_Base):
    """Co-Mod-GAN ``RandomMask(s, hole_range)`` generalised to H x W (zsyzzsoft/co-mod-gan
    ``training/mask_generator.py``): random rectangles (``MultiFill(int(10*coef), s//2)`` and
    ``MultiFill(int(5*coef), s)``, which may cross the border), then ``RandomBrush(int(20*coef), s)``
    strokes of 4-18 vertices, width 12-48, mean angle 2π/5 ± 2π/15, radius ~ N(diag/8, diag/16)
    clipped to [0, diag/4], and random flips; redrawn until ``hole_range[0] < ratio < hole_range[1]``.
    Co-Mod's hole = 0 is inverted: the result has 1 = hole. MAT's 512 variant uses counts 5/3/9.

    ``reference_size``: when set, brush widths scale by ``min(H, W) / reference_size`` (Co-Mod used
    fixed widths at 512²).
    """

    hole_range: tuple[float, float] = (0.0, 1.0)
    small_rects: int = 10
    large_rects: int = 5
    brushes: int = 20
    min_vertex: int = 4
    max_vertex: int = 18
    min_width: float = 12.0
    max_width: float = 48.0
    reference_size: int | None = None
    max_tries: int = 20

    def draw(self, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
        coef = min(self.hole_range[0] + self.hole_range[1], 1.0)
        hole = np.zeros((height, width), np.uint8)
        for tries, (mh, mw) in ((int(self.small_rects * coef), (height // 2, width // 2)),
                                (int(self.large_rects * coef), (height, width))):
            n = int(rng.integers(tries)) if tries > 0 else 0
            if n == 0:
                continue
            u = rng.random((n, 4))
            for uw, uh, ux, uy in u.tolist():
                w, h = int(uw * mw), int(uh * mh)  # randint(max_size)
                ww, hh = w // 2, h // 2
                x = -ww + int(ux * (width - w + 2 * ww))  # randint(-ww, s - w + ww)
                y = -hh + int(uy * (height - h + 2 * hh))
                hole[max(y, 0):min(y + h, height), max(x, 0):min(x + w, width)] = 1
        return np.maximum(hole, self._brush(height, width, int(self.brushes * coef), rng))

    def _brush(self, height: int, width: int, max_tries: int, rng: np.random.Generator) -> np.ndarray:
        mask = np.zeros((height, width), np.uint8)
        strokes = int(rng.integers(max_tries)) if max_tries > 0 else 0
        if strokes > 0:
            radius = math.sqrt(height * height + width * width) / 8
            mean_angle, angle_range = 2 * math.pi / 5, 2 * math.pi / 15
            n_vertex = rng.integers(self.min_vertex, self.max_vertex, size=strokes)
            total = int(n_vertex.sum())
            spread = rng.uniform(0, angle_range, size=(strokes, 2))
            a_min = np.repeat(mean_angle - spread[:, 0], n_vertex)
            a_max = np.repeat(mean_angle + spread[:, 1], n_vertex)
            ang = a_min + (a_max - a_min) * rng.random(total)
            first = np.concatenate([[0], np.cumsum(n_vertex)[:-1]])
            even = (np.arange(total) - np.repeat(first, n_vertex)) % 2 == 0
            ang[even] = 2 * math.pi - ang[even]
            r = np.clip(rng.normal(radius, radius // 2, size=total), 0, 2 * radius)
            starts = rng.integers((width, height), size=(strokes, 2))
            widths = [max(1, int(_scale(w, height, width, self.reference_size)))
                      for w in rng.uniform(self.min_width, self.max_width, size=strokes).tolist()]
            # Ragged (stroke, vertex) steps padded to the longest stroke; the clipped walk runs
            # column by column (clipping makes it sequential per stroke, as in Co-Mod).
            longest = int(n_vertex.max())
            valid = np.arange(longest)[None, :] < n_vertex[:, None]
            steps = np.zeros((strokes, longest, 2))
            steps[valid] = np.stack([r * np.cos(ang), r * np.sin(ang)], axis=1)
            verts = np.empty((strokes, longest + 1, 2), np.int64)
            verts[:, 0] = starts
            limit = np.array([width, height])
            for j in range(longest):
                verts[:, j + 1] = np.clip(verts[:, j] + steps[:, j], 0, limit).astype(np.int64)
            verts = verts.astype(np.int32)
            # OpenCV draws thick lines with round caps, which are Co-Mod's per-vertex discs.
            for s, w in enumerate(widths):
                cv2.polylines(mask, [verts[s, :int(n_vertex[s]) + 1]], False, 1, thickness=w)
        if rng.random() > 0.5:
            mask = mask[::-1]
        if rng.random() > 0.5:
            mask = mask[:, ::-1]
        return mask

    def _generate(self, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
        lo, hi = self.hole_range
        eps = 1.0 / (height * width)  # Co-Mod's bounds are exclusive
        return enforce_hole_ratio(self.draw, height, width, rng, (lo + eps, hi - eps), self.max_tries)


# ------------------------------------------------------------------------------------------ regular


@dataclass(frozen=True)
class Rectangle(_Base):
    """One axis-aligned rectangular hole, sides uniform in ``side_range`` × (H, W) [infer: the paper
    gives no sizes; (0.3, 0.85) puts the hole ratio mostly inside ASUKA's [0.1, 0.75]]."""

    side_range: tuple[float, float] = (0.3, 0.85)

    def draw(self, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
        mask = np.zeros((height, width), np.uint8)
        h = max(1, int(round(rng.uniform(*self.side_range) * height)))
        w = max(1, int(round(rng.uniform(*self.side_range) * width)))
        y0, x0 = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
        mask[y0:y0 + h, x0:x0 + w] = 1
        return mask


@dataclass(frozen=True)
class ComplementRectangle(_Base):
    """Complement of a rectangle: only one rectangle (sides in ``side_range`` × (H, W)) is kept, the
    rest is hole [infer: (0.5, 0.95) gives hole ratios of about 0.1-0.75]."""

    side_range: tuple[float, float] = (0.5, 0.95)

    def draw(self, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
        return 1 - Rectangle(self.side_range).draw(height, width, rng)


# ----------------------------------------------------------------------------------- object shapes


class ObjectShape(_Base):
    """An object outline from a :class:`~asuka.data.shapes.ShapeBank`, scaled so that it covers a
    random fraction ``area_range`` of the canvas (aspect ratio jittered by ``aspect_jitter``), moved to
    a random position (kept inside the canvas when it fits) and flipped horizontally / vertically
    with probability 0.5 each [infer: the paper only says "COCO object segments"].

    ``object_masks``: a COCO instances ``.json`` (polygons and RLE), a folder of segmentation PNGs, a
    shape-bank ``.npz`` (written by ``make_shards --coco-annotations``), a :class:`ShapeBank`, or None
    for the small bundled demo bank (scikit-image shapes; use COCO for real training).
    """

    def __init__(self, object_masks: "str | ShapeBank | None" = None, area_range: tuple[float, float] = (0.05, 0.5),
                 aspect_jitter: tuple[float, float] = (0.8, 1.25), max_shapes: int | None = 200_000):
        if not 0 < area_range[0] <= area_range[1]:
            raise ValueError(f"area_range must satisfy 0 < low <= high, got {area_range}")
        self.object_masks = object_masks
        self.area_range = tuple(area_range)
        self.aspect_jitter = tuple(aspect_jitter)
        self.bank = load_shape_bank(object_masks, max_shapes=max_shapes)

    def __repr__(self) -> str:
        return f"ObjectShape(object_masks={self.object_masks!r}, shapes={len(self.bank)}, area_range={self.area_range})"

    def draw(self, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
        mask = np.zeros((height, width), np.uint8)
        i = int(rng.integers(len(self.bank)))
        aspect = float(self.bank.aspect[i]) * math.exp(rng.uniform(*np.log(self.aspect_jitter)))
        box_area = rng.uniform(*self.area_range) * height * width / float(self.bank.fill[i])
        bh = math.sqrt(box_area / aspect)
        bw = aspect * bh
        shrink = min(1.0, 1.5 * width / bw, 1.5 * height / bh)  # sparse shapes: at most 1.5x the canvas
        bw, bh = bw * shrink, bh * shrink
        x0 = rng.uniform(min(0.0, width - bw), max(0.0, width - bw))
        y0 = rng.uniform(min(0.0, height - bh), max(0.0, height - bh))
        polys = self.bank.polygons(i, x0, y0, bw, bh, flip_x=rng.random() < 0.5, flip_y=rng.random() < 0.5)
        cv2.fillPoly(mask, polys, 1)
        return mask


# ------------------------------------------------------------------------------- ratio control


def _centered_rect(height: int, width: int, fraction: float) -> tuple[slice, slice]:
    """Centered rectangle with the image's aspect covering at least ``fraction`` of the pixels."""
    s = math.sqrt(min(max(fraction, 0.0), 1.0))
    h, w = min(height, math.ceil(s * height)), min(width, math.ceil(s * width))
    while h * w < fraction * height * width and (h < height or w < width):
        h, w = min(height, h + 1), min(width, w + 1)
    y0, x0 = (height - h) // 2, (width - w) // 2
    return slice(y0, y0 + h), slice(x0, x0 + w)


def repair_hole_ratio(mask: np.ndarray, low: float, high: float) -> np.ndarray:
    """Deterministically bring ``mask``'s hole ratio into [low, high] (the documented fallback).

    Too small: unite with a centered rectangle of area ``low + (high - 2 low)/2`` (result in
    [that, that + low)). Too large: keep (un-hole) a centered rectangle of area
    ``(1 - high) + ((high - low) - (1 - high))/2`` (result in (r - that, 1 - that]). Both land inside
    the range whenever ``high >= 2 low`` and ``2 high - 1 >= low`` (true for ASUKA's [0.1, 0.75] and
    MISATO's [0.2, 0.8]); otherwise, or if rounding misses, the result is a centered rectangle hole
    of ratio (low + high)/2.
    """
    h, w = mask.shape
    r = hole_ratio(mask)
    if low <= r <= high:
        return mask
    out = mask.copy()
    if r < low:
        out[_centered_rect(h, w, low + 0.5 * max(0.0, high - 2 * low))] = 1
    else:
        out[_centered_rect(h, w, (1 - high) + 0.5 * max(0.0, (high - low) - (1 - high)))] = 0
    if not low <= hole_ratio(out) <= high:
        out = np.zeros_like(mask)
        out[_centered_rect(h, w, 0.5 * (low + high))] = 1
    return out


def enforce_hole_ratio(draw: Callable[[int, int, np.random.Generator], np.ndarray], height: int, width: int,
                       rng: np.random.Generator, hole_range: tuple[float, float], max_tries: int) -> np.ndarray:
    """Draw until the hole ratio is in ``hole_range`` (at most ``max_tries`` draws), then repair."""
    low, high = hole_range
    mask = None
    for _ in range(max(1, max_tries)):
        mask = draw(height, width, rng)
        if low <= hole_ratio(mask) <= high:
            return mask
    return repair_hole_ratio(mask, low, high)


# ------------------------------------------------------------------------------------- mixture

_MIXTURE_KINDS = ("object", "irregular", "regular")


@dataclass
class AsukaMixture(_Base):
    """ASUKA's mask mix (paper §3.1): per mask, a basis is chosen with ``probs`` (object-shape,
    irregular, regular) = (0.5, 0.4, 0.1); an object mask is united with an irregular one with
    probability ``union_prob`` = 0.5; irregular = Co-Mod or LaMa (``irregular`` list with
    ``irregular_weights``); regular = rectangle or complement-rectangle (``regular`` list, uniform).
    The hole ratio is kept in ``hole_range`` = [0.1, 0.75] by redrawing from the *same* basis (so
    the basis frequencies are exact) at most ``max_tries`` times, then :func:`repair_hole_ratio`.

    MISATO's evaluation recipe is the same with ``probs = (0.5, 0.4, 0)`` and [0.2, 0.8] (§4).

    Irregular defaults [infer; the paper names the generators, not their mix]: Co-Mod (weight 1/2,
    widths scaled from its 512² setting) and LaMa thin / medium / thick (1/6 each, the 256 presets
    scaled to the canvas).
    """

    object_masks: "str | ShapeBank | None" = None
    probs: tuple[float, float, float] = (0.5, 0.4, 0.1)
    union_prob: float = 0.5
    hole_range: tuple[float, float] = (0.1, 0.75)
    max_tries: int = 20
    object_area_range: tuple[float, float] = (0.05, 0.5)
    irregular: tuple = field(default_factory=lambda: (
        CoModMask(reference_size=512),
        _scaled_lama("thin_256"),
        _scaled_lama("medium_256"),
        _scaled_lama("thick_256"),
    ))
    irregular_weights: tuple[float, ...] = (0.5, 1 / 6, 1 / 6, 1 / 6)
    regular: tuple = field(default_factory=lambda: (Rectangle(), ComplementRectangle()))

    def __post_init__(self) -> None:
        p = np.asarray(self.probs, dtype=np.float64)
        if p.shape != (3,) or (p < 0).any() or p.sum() <= 0:
            raise ValueError(f"probs must be three non-negative numbers (object, irregular, regular), got {self.probs}")
        lo, hi = self.hole_range
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"hole_range must satisfy 0 <= low < high <= 1, got {self.hole_range}")
        if len(self.irregular_weights) != len(self.irregular):
            raise ValueError("irregular_weights must have one weight per irregular generator")
        self._p = p / p.sum()
        w = np.asarray(self.irregular_weights, dtype=np.float64)
        self._w = w / w.sum()
        self._object = ObjectShape(self.object_masks, area_range=self.object_area_range) if self._p[0] > 0 else None

    def _irregular(self, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
        return self.irregular[int(rng.choice(len(self.irregular), p=self._w))].draw(height, width, rng)

    def draw_kind(self, kind: str, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
        """One candidate of basis ``kind``: ``object``, ``object+irregular`` (united), ``irregular``
        or ``regular`` (uint8, 1 = hole)."""
        if kind.startswith("object"):
            mask = self._object.draw(height, width, rng)
            if kind == "object+irregular":
                np.maximum(mask, self._irregular(height, width, rng), out=mask)
            return mask
        if kind == "irregular":
            return self._irregular(height, width, rng)
        return self.regular[int(rng.integers(len(self.regular)))].draw(height, width, rng)

    def sample(self, height: int, width: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
        """(mask float32 1 = hole, basis kind). The basis (and the object/irregular union) is chosen
        once per mask; out-of-range candidates are redrawn from that basis."""
        _check_args(height, width, rng)
        kind = _MIXTURE_KINDS[int(rng.choice(3, p=self._p))]
        if kind == "object" and rng.random() < self.union_prob:
            kind = "object+irregular"
        mask = enforce_hole_ratio(lambda h, w, g: self.draw_kind(kind, h, w, g), int(height), int(width), rng,
                                  self.hole_range, self.max_tries)
        return _to_float(mask), kind

    def __call__(self, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
        return self.sample(height, width, rng)[0]


# -------------------------------------------------------------------------------------- recipes

# LaMa configs/data_gen/random_{thin,medium,thick}_{256,512}.yaml (advimman/lama), max_tamper_area 0.5.
_LAMA_PRESETS: dict[str, LamaMixed] = {
    "thin_256": LamaMixed(LamaIrregular(max_angle=4, max_len=40, max_width=10, min_times=4, max_times=50)),
    "medium_256": LamaMixed(LamaIrregular(max_angle=4, max_len=100, max_width=50, min_times=4, max_times=5),
                            LamaRectangles(margin=0, bbox_min_size=10, bbox_max_size=50, min_times=1, max_times=5),
                            box_proba=0.3),
    "thick_256": LamaMixed(LamaIrregular(max_angle=4, max_len=200, max_width=100, min_times=1, max_times=5),
                           LamaRectangles(margin=10, bbox_min_size=30, bbox_max_size=150, min_times=1, max_times=3),
                           box_proba=0.3),
    "thin_512": LamaMixed(LamaIrregular(max_angle=4, max_len=100, max_width=20, min_times=4, max_times=70)),
    "medium_512": LamaMixed(LamaIrregular(max_angle=4, max_len=200, max_width=100, min_times=4, max_times=10),
                            LamaRectangles(margin=0, bbox_min_size=30, bbox_max_size=150, min_times=1, max_times=5),
                            box_proba=0.3),
    "thick_512": LamaMixed(LamaIrregular(max_angle=4, max_len=450, max_width=250, min_times=1, max_times=5),
                           LamaRectangles(margin=10, bbox_min_size=30, bbox_max_size=300, min_times=1, max_times=4),
                           box_proba=0.3),
}


def _scaled_lama(name: str) -> LamaMixed:
    """A 256 LaMa preset with pixel sizes scaled to the canvas (``reference_size=256``)."""
    p = _LAMA_PRESETS[name]
    return replace(p, irregular=replace(p.irregular, reference_size=256),
                   box=None if p.box is None else replace(p.box, reference_size=256))


RECIPES: dict[str, Callable[..., MaskGenerator]] = {
    "asuka_train": lambda **kw: AsukaMixture(**kw),
    "misato_eval": lambda **kw: AsukaMixture(**{"probs": (0.5, 0.4, 0.0), "hole_range": (0.2, 0.8), **kw}),
    **{f"lama_{name}": (lambda name: lambda **kw: replace(_LAMA_PRESETS[name], **kw))(name) for name in _LAMA_PRESETS},
    "comod": lambda **kw: CoModMask(**kw),
    "mat_512": lambda **kw: CoModMask(**{"small_rects": 5, "large_rects": 3, "brushes": 9, **kw}),
    "lama_irregular": lambda **kw: LamaIrregular(**kw),
    "lama_rectangles": lambda **kw: LamaRectangles(**kw),
    "rectangle": lambda **kw: Rectangle(**kw),
    "complement_rectangle": lambda **kw: ComplementRectangle(**kw),
    "object": lambda **kw: ObjectShape(**kw),
}


def available_recipes() -> list[str]:
    return sorted(RECIPES)


def get_mask_generator(name: str, **overrides) -> MaskGenerator:
    """A mask generator for the named recipe, with constructor ``overrides`` (e.g. ``object_masks=``,
    ``hole_range=``). Recipes: ``asuka_train``, ``misato_eval``, ``lama_{thin,medium,thick}_{256,512}``,
    ``comod``, ``mat_512``, ``lama_irregular``, ``lama_rectangles``, ``rectangle``,
    ``complement_rectangle``, ``object``."""
    if name not in RECIPES:
        raise ValueError(f"unknown mask recipe {name!r}; choose one of {available_recipes()}")
    try:
        return RECIPES[name](**overrides)
    except TypeError as exc:
        raise TypeError(f"bad override for mask recipe {name!r}: {exc}") from None

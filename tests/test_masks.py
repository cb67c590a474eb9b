"""Mask generators: shape/dtype/polarity, hole-ratio bounds, mixture frequencies, seeding, shape banks."""

from __future__ import annotations

import json
from collections import Counter

import cv2
import numpy as np
import pytest

from asuka.data.shapes import ShapeBank, bundled_shape_bank, load_shape_bank
from asuka.masks import (AsukaMixture, CoModMask, ComplementRectangle, LamaIrregular, ObjectShape, Rectangle,
                         available_recipes, enforce_hole_ratio, get_mask_generator, hole_ratio, repair_hole_ratio)

ALL = available_recipes()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("size", [(128, 128), (96, 160)])
def test_every_recipe_shape_dtype_binary(name, size):
    gen = get_mask_generator(name)
    rng = np.random.default_rng(0)
    for _ in range(5):
        m = gen(*size, rng)
        assert m.shape == size and m.dtype == np.float32
        assert set(np.unique(m)) <= {0.0, 1.0}


def test_polarity_regular_masks():
    rng = np.random.default_rng(1)
    for _ in range(50):
        m = Rectangle()(100, 120, rng)
        ys, xs = np.nonzero(m)  # the hole is one filled rectangle
        assert m[ys.min():ys.max() + 1, xs.min():xs.max() + 1].all()
        assert 0.3 ** 2 - 0.02 <= m.mean() <= 0.85 ** 2 + 0.02
        c = ComplementRectangle()(100, 120, rng)
        ys, xs = np.nonzero(c == 0)  # only one rectangle is kept, the rest is hole
        assert not c[ys.min():ys.max() + 1, xs.min():xs.max() + 1].any()
        assert c.sum() == c.size - len(ys)


def test_polarity_strokes_are_holes():
    rng = np.random.default_rng(2)
    # Co-Mod draws holes as 0; with brushes only, strokes are sparse so 1 = hole means a small ratio.
    brush_only = CoModMask(small_rects=0, large_rects=0, brushes=3, min_width=4, max_width=6)
    ratios = [brush_only(256, 256, rng).mean() for _ in range(50)]
    assert 0 < max(ratios) < 0.3
    lama = get_mask_generator("lama_thin_256")
    assert all(0 < lama(256, 256, rng).mean() <= 0.5 for _ in range(50))  # max_tamper_area 0.5


def test_object_shape_polarity_and_placement():
    square = np.zeros((50, 50), bool)
    square[10:40, 5:45] = True
    bank = ShapeBank.from_binary_masks([square])
    gen = ObjectShape(bank, area_range=(0.2, 0.2), aspect_jitter=(1.0, 1.0))
    rng = np.random.default_rng(3)
    for _ in range(20):
        m = gen(128, 128, rng)
        ys, xs = np.nonzero(m)
        box = m[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        assert box.all()  # a filled rectangle of the shape's aspect (40:30)
        assert abs(box.shape[1] / box.shape[0] - 40 / 30) < 0.1
        assert abs(m.mean() - 0.2) < 0.02


def test_lama_presets_match_lama_configs():
    # advimman/lama configs/data_gen/random_{thin,medium,thick}_{256,512}.yaml
    expected = {
        "lama_thin_256": ((4, 50, 10, 40), None),
        "lama_medium_256": ((4, 5, 50, 100), (0, 10, 50, 1, 5)),
        "lama_thick_256": ((1, 5, 100, 200), (10, 30, 150, 1, 3)),
        "lama_thin_512": ((4, 70, 20, 100), None),
        "lama_medium_512": ((4, 10, 100, 200), (0, 30, 150, 1, 5)),
        "lama_thick_512": ((1, 5, 250, 450), (10, 30, 300, 1, 4)),
    }
    for name, (irr, box) in expected.items():
        g = get_mask_generator(name)
        i = g.irregular
        assert (i.min_times, i.max_times, i.max_width, i.max_len, i.max_angle) == (*irr, 4)
        assert g.max_tamper_area == 0.5
        if box is None:
            assert g.box is None
        else:
            b = g.box
            assert (b.margin, b.bbox_min_size, b.bbox_max_size, b.min_times, b.max_times) == box
            assert g.box_proba == 0.3 and g.irregular_proba == 1


@pytest.mark.parametrize("name,bounds", [("asuka_train", (0.1, 0.75)), ("misato_eval", (0.2, 0.8))])
def test_hole_ratio_bounds_over_1000_samples(name, bounds):
    gen = get_mask_generator(name)
    rng = np.random.default_rng(4)
    ratios = np.array([gen(128, 128, rng).mean() for _ in range(1000)])
    assert ratios.min() >= bounds[0] and ratios.max() <= bounds[1]
    assert ratios.std() > 0.1  # a spread of sizes, not the fallback rectangle every time


def test_mixture_frequencies():
    gen = get_mask_generator("asuka_train")
    rng = np.random.default_rng(5)
    n = 3000
    kinds = Counter(gen.sample(64, 64, rng)[1] for _ in range(n))
    obj = kinds["object"] + kinds["object+irregular"]
    tol = 4 * np.sqrt(0.25 / n)  # 4 sigma of a proportion
    assert abs(obj / n - 0.5) < tol
    assert abs(kinds["irregular"] / n - 0.4) < tol
    assert abs(kinds["regular"] / n - 0.1) < tol
    assert abs(kinds["object+irregular"] / obj - 0.5) < 4 * np.sqrt(0.25 / obj)

    misato = get_mask_generator("misato_eval")
    kinds = Counter(misato.sample(64, 64, rng)[1] for _ in range(1000))
    assert kinds["regular"] == 0  # no rectangle / complement masks in the MISATO recipe
    assert abs((kinds["object"] + kinds["object+irregular"]) / 1000 - 5 / 9) < 4 * np.sqrt(0.25 / 1000)


@pytest.mark.parametrize("name", ["asuka_train", "misato_eval", "comod", "lama_thick_256", "object"])
def test_seeding(name):
    gen = get_mask_generator(name)
    a = [gen(96, 96, np.random.default_rng(7)) for _ in range(3)]
    seq1 = [gen(96, 96, r) for r in [np.random.default_rng(11)] for _ in range(10)]
    rng = np.random.default_rng(11)
    seq2 = [gen(96, 96, rng) for _ in range(10)]
    rng = np.random.default_rng(12)
    other = [gen(96, 96, rng) for _ in range(10)]
    assert all(np.array_equal(a[0], x) for x in a)
    assert all(np.array_equal(x, y) for x, y in zip(seq1, seq2))
    assert not all(np.array_equal(x, y) for x, y in zip(seq2, other))


def test_worker_seeds_differ():
    gen = get_mask_generator("asuka_train")
    masks = {w: gen(64, 64, np.random.default_rng(np.random.SeedSequence([0, 0, w]))) for w in range(4)}
    assert len({m.tobytes() for m in masks.values()}) == 4


def test_repair_is_deterministic_and_in_range():
    empty, full = np.zeros((64, 80), np.uint8), np.ones((64, 80), np.uint8)
    speck = empty.copy()
    speck[3:5, 3:5] = 1
    for lo, hi in [(0.1, 0.75), (0.2, 0.8), (0.45, 0.55), (0.0 + 1 / 5120, 1 - 1 / 5120)]:
        for m in (empty, full, speck):
            out = repair_hole_ratio(m, lo, hi)
            assert lo <= hole_ratio(out) <= hi
            assert np.array_equal(out, repair_hole_ratio(m, lo, hi))
    big = full.copy()
    big[:5] = 0
    out = repair_hole_ratio(big, 0.1, 0.75)
    assert (out <= big).all()  # too large: holes are only removed, the shape is kept elsewhere


def test_enforce_hole_ratio_never_loops():
    calls = []

    def always_empty(h, w, rng):
        calls.append(1)
        return np.zeros((h, w), np.uint8)

    out = enforce_hole_ratio(always_empty, 32, 32, np.random.default_rng(0), (0.1, 0.75), max_tries=5)
    assert len(calls) == 5 and 0.1 <= hole_ratio(out) <= 0.75


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown mask recipe"):
        get_mask_generator("nope")
    with pytest.raises(TypeError, match="bad override"):
        get_mask_generator("lama_thick_256", not_a_field=1)
    gen = get_mask_generator("rectangle")
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        gen(64, 64, 0)
    with pytest.raises(ValueError, match="mask size"):
        gen(4, 64, np.random.default_rng(0))
    with pytest.raises(ValueError, match="hole_range"):
        AsukaMixture(hole_range=(0.8, 0.2))
    with pytest.raises(FileNotFoundError, match="object_masks"):
        get_mask_generator("asuka_train", object_masks="/does/not/exist.npz")


def test_overrides_reach_the_generator():
    gen = get_mask_generator("asuka_train", hole_range=(0.3, 0.4), probs=(0, 1, 0))
    rng = np.random.default_rng(8)
    assert all(0.3 <= gen(64, 64, rng).mean() <= 0.4 for _ in range(50))
    lama = get_mask_generator("lama_irregular", max_times=0, min_times=0)
    assert lama(64, 64, rng).sum() == 0
    assert isinstance(get_mask_generator("lama_irregular"), LamaIrregular)


# ----------------------------------------------------------------------------------- shape banks


def _coco_file(tmp_path):
    from pycocotools import mask as mask_utils

    disk = np.zeros((60, 80), np.uint8)
    cv2.circle(disk, (40, 30), 20, 1, -1)
    rle = mask_utils.encode(np.asfortranarray(disk))
    rle["counts"] = rle["counts"].decode()
    coco = {
        "images": [{"id": 1, "file_name": "a.jpg", "height": 60, "width": 80}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "iscrowd": 0, "area": 600.0,
             "segmentation": [[10, 10, 50, 10, 50, 40, 10, 40]]},
            {"id": 2, "image_id": 1, "category_id": 1, "iscrowd": 1, "area": float(disk.sum()), "segmentation": rle},
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco))
    return path, disk


def test_shape_bank_from_coco_polygons_and_rle(tmp_path):
    path, disk = _coco_file(tmp_path)
    bank = ShapeBank.from_coco(path)
    assert len(bank) == 2
    assert abs(bank.aspect[0] - 40 / 30) < 1e-5 and abs(bank.fill[0] - 1.0) < 1e-5  # the rectangle polygon
    assert abs(bank.aspect[1] - 1.0) < 0.06 and abs(bank.fill[1] - np.pi / 4) < 0.06  # the RLE disk
    out = bank.save(tmp_path / "bank.npz")
    again = load_shape_bank(str(out))
    assert all(np.array_equal(getattr(bank, f), getattr(again, f)) for f in ("points", "poly_offsets", "aspect"))
    gen = get_mask_generator("object", object_masks=str(path))
    assert gen(64, 64, np.random.default_rng(0)).any()


def test_shape_bank_from_png_folder(tmp_path):
    for i in range(3):
        m = np.zeros((40, 40), np.uint8)
        cv2.rectangle(m, (5 + i, 5), (30, 20 + 5 * i), 255, -1)
        cv2.imwrite(str(tmp_path / f"seg_{i}.png"), m)
    bank = load_shape_bank(str(tmp_path))
    assert len(bank) == 3
    with pytest.raises(FileNotFoundError):
        ShapeBank.from_folder(tmp_path / "empty_missing")


def test_bundled_bank_is_offline_and_varied():
    bank = bundled_shape_bank()
    assert len(bank) >= 40
    assert len(bank.subset([0, 2])) == 2 and bank.subset([1]).aspect[0] == bank.aspect[1]
    assert bank.aspect.std() > 0.1 and bank.fill.min() >= 0.2

"""Large images (issue 17): with ``compact`` loading only the processed crop is ever float, the result equals the
float path's bit for bit, and a 9000×9000 image with a small hole stays under a measured memory bound."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from asuka.pipelines._common import SoftMaskWarning, load_image, load_mask, run_inpainting
from asuka.tensors import to_uint8

REPO = Path(__file__).resolve().parent.parent


def _toy_model(x, m):
    """Deterministic stand-in for a method: a colour ramp in the hole, the input elsewhere."""
    ramp = torch.linspace(-0.9, 0.9, x.shape[-1]).expand_as(x)
    return torch.where(m >= 0.5, ramp, x * 0.5)


@pytest.mark.parametrize("strategy, paste_back", [("crop", True), ("crop", False), ("original", True)])
def test_compact_path_equals_the_float_path(tmp_path, strategy, paste_back):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (2, 900, 840, 3), np.uint8)  # above the crop trigger (800)
    mask = np.zeros((2, 900, 840, 1), np.uint8)
    mask[0, 400:450, 300:380] = 255  # item 1 has no hole: returned as it is
    kwargs = dict(hd_strategy=strategy, paste_back=paste_back, max_size=None)
    reference = to_uint8(run_inpainting(_toy_model, image, mask, **kwargs))
    compact = run_inpainting(_toy_model, image, mask, compact=True, **kwargs)
    assert compact.dtype == torch.uint8 and torch.equal(compact, reference)


def test_compact_masks_equal_float_masks(tmp_path):
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, (300, 200), np.uint8)  # soft: warns once, not once per band
    alpha = np.stack([grey, rng.integers(0, 256, (300, 200), np.uint8)], axis=-1)
    labels = (grey > 128).astype(np.uint8)
    for arr in (grey, alpha, labels):
        with warnings.catch_warnings(record=True) as float_warnings:
            warnings.simplefilter("always")
            expected = load_mask(arr)
        with warnings.catch_warnings(record=True) as compact_warnings:
            warnings.simplefilter("always")
            from asuka.pipelines._common import _compact_mask_from_numpy

            got = _compact_mask_from_numpy(arr, "mask", band_pixels=1000)
        assert got.dtype == torch.uint8 and torch.equal(got.float(), expected)
        count = sum(issubclass(w.category, SoftMaskWarning) for w in float_warnings)
        assert sum(issubclass(w.category, SoftMaskWarning) for w in compact_warnings) == count
    path = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 256, (40, 30, 3), np.uint8)).save(path)
    assert torch.equal(load_image(path, compact=True).float() / 255 * 2 - 1, load_image(path))


_PEAK = """
import sys
import torch
from asuka.cli import save_image
from asuka.pipelines._common import load_image, load_mask, run_inpainting, to_pil

def peak_kb():  # this process's peak RSS (VmHWM; ru_maxrss would include the forking parent's, kept across exec)
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmHWM")).split()[1])

def model(x, m):  # the method's work on the crop is the same whatever the image size: a stand-in
    return torch.where(m >= 0.5, torch.zeros_like(x), x)

idle = peak_kb()  # everything imported, nothing loaded
image = load_image(sys.argv[1], compact=True)
mask = load_mask(sys.argv[2], compact=True)
result = run_inpainting(model, image, mask, compact=True, max_size=None)
save_image(to_pil(result)[0], sys.argv[3])
print("PEAK_KB", peak_kb(), idle)
"""


def test_9000_square_image_with_a_small_hole_stays_under_the_memory_bound(tmp_path):
    """The large-image path of ``asuka inpaint`` (compact loading, crop, paste-back, atomic write) on a 9000×9000
    PNG with a 200×200 hole: peak RSS above the process's idle peak stays under 1.2 GB (measured 0.93 GB; the image
    is 243 MB as uint8; the float path of the past took 6.1 GB). The method itself only sees the 456×456 crop."""
    tile = np.random.default_rng(0).integers(0, 256, (90, 90, 3), np.uint8)
    Image.fromarray(np.tile(tile, (100, 100, 1))).save(tmp_path / "big.png", compress_level=1)
    mask = np.zeros((9000, 9000), np.uint8)
    mask[4400:4600, 4400:4600] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out_path = tmp_path / "out.bmp"  # lossless and quick to write (PNG compression would dominate the test's time)
    run = subprocess.run([sys.executable, "-c", _PEAK, str(tmp_path / "big.png"), str(tmp_path / "mask.png"),
                          str(out_path)], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                         text=True, timeout=900)
    rows = [row for row in run.stdout.splitlines() if row.startswith("PEAK_KB")]
    assert rows, run.stderr[-2000:]
    work, idle = (int(v) * 1024 for v in rows[-1].split()[1:])
    assert work - idle < 1.2e9, f"peak RSS above idle: {(work - idle) / 1e9:.2f} GB (measured 0.93 GB)"
    out = np.asarray(Image.open(out_path))
    known = np.asarray(Image.open(tmp_path / "big.png"))
    assert out.shape == (9000, 9000, 3) and np.array_equal(out[:4400], known[:4400])  # known pixels exact
    assert (out[4400:4600, 4400:4600] == 128).all()  # the hole: the stand-in's grey (0 -> 128)

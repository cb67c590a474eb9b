"""MAE preprocessing equals the official ``cv2.resize(INTER_AREA)`` pipeline (``datas/misato_dataset.py::prepare_data``)
at every size: fractional area weights when shrinking, OpenCV's area-linear rule when growing; away from the hole
with the default mask-aware resize, everywhere with the official full-image resize."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from asuka.models.mae import IMAGENET_MEAN, IMAGENET_STD, preprocess, resize_image

SIZES = [(384, 384), (300, 420), (200, 200), (1024, 768), (200, 300)]  # (H, W); 200 grows; 200x300 is mixed


def _image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _mask(h: int, w: int) -> torch.Tensor:
    mask = torch.zeros(1, 1, h, w)
    mask[..., h // 3: h // 2 + 7, w // 4: w // 2 + 11] = 1
    return mask


def _official(image: torch.Tensor, mask: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """prepare_data on float input: cv2 INTER_AREA image, ImageNet norm, cv2 INTER_NEAREST mask, hole -> 0."""
    rgb = ((image[0].permute(1, 2, 0).numpy() + 1) / 2).astype(np.float32)
    x = cv2.resize(rgb, (256, 256), interpolation=cv2.INTER_AREA)
    x = (x - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    m = cv2.resize(mask[0, 0].numpy(), (256, 256), interpolation=cv2.INTER_NEAREST)
    return x * (m < 0.5)[..., None], m


@pytest.mark.parametrize("size", SIZES)
def test_resize_equals_cv2_inter_area(size):
    h, w = size
    image = _image(h, w)
    ref = cv2.resize(image[0].permute(1, 2, 0).numpy(), (256, 256), interpolation=cv2.INTER_AREA)
    out = resize_image(image, (256, 256))[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(out, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("size", SIZES)
def test_preprocess_equals_official_away_from_the_hole(size):
    h, w = size
    image, mask = _image(h, w, seed=1), _mask(h, w)
    ref, ref_mask = _official(image, mask)
    x, m = preprocess(image, mask)
    assert np.array_equal(m[0, 0].numpy(), ref_mask)
    # Output pixels whose source footprint (one source pixel of margin either side) holds no hole pixel.
    near = F.interpolate(F.max_pool2d(mask, 5, stride=1, padding=2), size=(256, 256), mode="area") > 0
    far = ~near[0, 0].numpy()
    assert far.mean() > 0.5
    np.testing.assert_allclose(x[0].permute(1, 2, 0).numpy()[far], ref[far], atol=2e-5, rtol=0)
    full, _ = preprocess(image, mask, known_only=False)  # the official full-image resize, everywhere
    np.testing.assert_allclose(full[0].permute(1, 2, 0).numpy(), ref, atol=2e-5, rtol=0)


def test_preprocess_is_batched_and_keeps_device_and_dtype():
    images = torch.cat([_image(300, 420, seed=s) for s in (2, 3)])
    masks = torch.cat([_mask(300, 420), torch.zeros(1, 1, 300, 420)])
    x, m = preprocess(images, masks)
    for i in range(2):
        xi, mi = preprocess(images[i:i + 1], masks[i:i + 1])
        torch.testing.assert_close(x[i:i + 1], xi, atol=1e-6, rtol=0)
        assert torch.equal(m[i:i + 1], mi)
    assert resize_image(images.double(), (256, 256)).dtype == torch.float64

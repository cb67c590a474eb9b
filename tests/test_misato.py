"""MISATO loader on a generated fake folder (512: same names; 1024: "00" + name; domains by index)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from asuka.data.misato import MisatoDataset, list_misato, misato_domain

INDICES = [0, 499, 500, 1000, 1501]


def _fake_misato(root, resolution, indices=INDICES, size=16, mask_size=None, ext=".png"):
    rng = np.random.default_rng(resolution)
    (root / str(resolution) / "image").mkdir(parents=True)
    (root / str(resolution) / "mask").mkdir(parents=True)
    masks = {}
    for i in indices:
        name = f"{i:04d}"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            root / str(resolution) / "image" / (name + ext))
        m = np.zeros((mask_size or size,) * 2, np.uint8)
        m[2:2 + i % 7 + 3, 4:12] = 255  # 255 = hole
        mask_name = ("00" + name) if resolution == 1024 else name
        Image.fromarray(m).save(root / str(resolution) / "mask" / (mask_name + ".png"))
        masks[name] = m
    return masks


def test_domains_by_index():
    assert [misato_domain(i) for i in (0, 499, 500, 999, 1000, 1499, 1500, 1999)] == [
        "landscape", "landscape", "indoor", "indoor", "building", "building", "background", "background"]
    with pytest.raises(ValueError):
        misato_domain(2000)


def test_512_layout(tmp_path):
    masks = _fake_misato(tmp_path, 512)
    ds = MisatoDataset(tmp_path, 512)
    assert len(ds) == len(INDICES)
    assert ds.domain_counts() == {"landscape": 2, "indoor": 1, "building": 1, "background": 1}
    item = ds[2]
    assert item["key"] == "0500" and item["domain"] == "indoor" and item["index"] == 500
    assert item["image"].shape == (3, 16, 16) and -1 <= item["image"].min() and item["image"].max() <= 1
    assert torch.equal(item["mask"][0], torch.from_numpy(masks["0500"] == 255).float())  # 255 -> 1 = hole
    only = MisatoDataset(tmp_path, 512, domains=["background"])
    assert [it.key for it in only.items] == ["1501"]


def test_1024_layout_uses_00_prefix(tmp_path):
    masks = _fake_misato(tmp_path, 1024, indices=[3, 700, 1200], ext=".jpg")
    items = list_misato(tmp_path, 1024)
    assert [(it.key, it.mask_path.name) for it in items] == [
        ("0003", "000003.png"), ("0700", "000700.png"), ("1200", "001200.png")]
    item = MisatoDataset(tmp_path, 1024)[1]
    assert torch.equal(item["mask"][0], torch.from_numpy(masks["0700"] == 255).float())


def test_mask_resized_to_image(tmp_path):
    _fake_misato(tmp_path, 512, indices=[10], size=16, mask_size=32)
    item = MisatoDataset(tmp_path, 512)[0]
    assert item["mask"].shape == (1, 16, 16) and item["image"].shape == (3, 16, 16)


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="512"):
        list_misato(tmp_path, 512)
    _fake_misato(tmp_path, 1024, indices=[1, 2])
    (tmp_path / "1024" / "mask" / "000002.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"000002\.png.*|'00' \+ the image name"):
        list_misato(tmp_path, 1024)
    with pytest.raises(ValueError, match="resolution"):
        list_misato(tmp_path, 256)
    with pytest.raises(ValueError, match="unknown MISATO domains"):
        list_misato(tmp_path, 1024, domains=["space"])

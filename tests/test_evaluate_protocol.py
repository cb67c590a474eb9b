"""Evaluation protocols (``--protocol asuka|comod|lama``), the IDS group-size rule and Grad's empty-edge convention."""

from __future__ import annotations

import json

import numpy as np
import pytest
import skimage.data
import torch
import torchvision
from PIL import Image

from asuka.cli import main
from asuka.errors import InputError
from asuka.evaluation.aggregate import summarise
from asuka.evaluation.protocols import PROTOCOLS, protocol_settings
from asuka.evaluation.report import markdown_table
from asuka.metrics import boundary_gradient, ids_min_pairs, save_random_inception_weights

SIZE = 64


@pytest.fixture(scope="module")
def misato(tmp_path_factory):
    """A MISATO-shaped 512 folder of five items across domains (indices 0, 1, 500, 1000, 1500)."""
    root = tmp_path_factory.mktemp("misato")
    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket()]
    for folder in ("image", "mask"):
        (root / "512" / folder).mkdir(parents=True)
    for j, index in enumerate((0, 1, 500, 1000, 1500)):
        name = f"{index:04d}.png"
        Image.fromarray(photos[j % 4]).resize((SIZE, SIZE), Image.Resampling.BICUBIC).save(root / "512" / "image" / name)
        mask = np.zeros((SIZE, SIZE), np.uint8)
        mask[10:30 + 4 * j, 8:40] = 255
        Image.fromarray(mask).save(root / "512" / "mask" / name)
    return root


def test_protocol_settings_fix_every_convention_and_refuse_contradictions():
    asuka = protocol_settings("asuka", resolution=1024)
    assert asuka == {"metrics": ("psnr", "ssim", "lpips", "fid", "ids", "grad"), "lpips_net": "alex",
                     "inception_variant": "torchvision", "inception_resize": "pil", "ids_pca_dim": 1024,
                     "ssim_gray": True, "grad_empty_edge": "zero", "protocol": "asuka"}
    lama = protocol_settings("lama", resolution=512)
    assert lama["ssim_gray"] is False and lama["lpips_net"] == "vgg" and lama["inception_variant"] == "fidelity"
    assert protocol_settings("comod", resolution=512)["ids_pca_dim"] is None
    assert protocol_settings("default", resolution=512, explicit={"lpips_net": "vgg", "ssim_gray": None}) == {
        "lpips_net": "vgg", "protocol": "default"}
    # a subset of the protocol's metrics keeps its conventions; an agreeing explicit value is fine
    assert protocol_settings("asuka", resolution=512, explicit={"metrics": ["psnr", "ssim"],
                                                                "lpips_net": "alex"})["metrics"] == ["psnr", "ssim"]
    with pytest.raises(InputError, match="lpips_net: protocol 'asuka' sets it to 'alex', not 'vgg'"):
        protocol_settings("asuka", resolution=512, explicit={"lpips_net": "vgg"})
    with pytest.raises(InputError, match=r"metrics: .*\['clip'\] are not part of it"):
        protocol_settings("lama", resolution=512, explicit={"metrics": ["fid", "clip"]})
    with pytest.raises(InputError, match="unknown protocol 'cvpr'"):
        protocol_settings("cvpr", resolution=512)
    assert set(PROTOCOLS) == {"default", "asuka", "comod", "lama"}


def test_cli_protocol_asuka_records_every_convention(misato, tmp_path, capsys):
    """`asuka evaluate --protocol asuka` on a MISATO-shaped folder: metrics.json names the protocol and each
    convention; ground truth as predictions gives PSNR 70 dB, SSIM 1, Grad 0, FID ~0."""
    torch.manual_seed(0)
    alex = tmp_path / "alexnet.pth"
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), alex)
    inception = save_random_inception_weights(tmp_path / "tv.pth", variant="torchvision")
    preds = tmp_path / "preds"
    preds.mkdir()
    for p in (misato / "512" / "image").iterdir():
        Image.open(p).save(preds / p.name)
    out = tmp_path / "out"
    code = main(["evaluate", "--protocol", "asuka", "--predictions", str(preds), "--data", str(misato), "--out",
                 str(out), "--lpips-weights", str(alex), "--inception-weights", str(inception), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    saved = json.loads((out / "metrics.json").read_text())
    settings = saved["settings"]
    assert settings["protocol"] == "asuka" and settings["metrics"] == ["psnr", "ssim", "lpips", "fid", "ids", "grad"]
    assert settings["inception_variant"] == "torchvision" and settings["inception_resize"] == "pil"
    assert settings["ids_pca_dim"] == 512 and settings["lpips_net"] == "alex"
    assert settings["ssim"].startswith("grayscale") and settings["grad_empty_edge"] == "zero"
    overall = saved["overall"]
    assert overall["psnr"] == pytest.approx(70.0) and overall["ssim"] == pytest.approx(1.0)
    assert overall["grad"] == pytest.approx(0.0) and overall["fid"] == pytest.approx(0.0, abs=1e-6)
    assert overall["u_ids"] is None  # PCA to 512 needs at least 256 pairs

    assert main(["evaluate", "--protocol", "asuka", "--lpips-net", "vgg", "--predictions", str(preds), "--data",
                 str(misato), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--lpips-net" in err and "protocol 'asuka'" in err


def _records(domains: dict[str, int]) -> list[dict]:
    records = []
    for domain, count in domains.items():
        records += [{"key": f"{domain}{i:03d}", "domain": domain, "hole_ratio": 0.25, "psnr": 30.0}
                    for i in range(count)]
    return records


def test_ids_is_reported_only_for_large_enough_groups():
    dim = 8
    minimum = ids_min_pairs(dim)  # 36
    records = _records({"big": minimum + 4, "small": 10})
    g = torch.Generator().manual_seed(0)
    real = torch.randn(len(records), dim, generator=g)
    fake = torch.randn(len(records), dim, generator=g)
    meta = {"metrics": ["psnr", "ids"], "kid_subsets": 10, "kid_subset_size": 10, "ids_pca_dim": None}
    result = summarise(meta, records, real, fake)
    assert result["by_domain"]["big"]["u_ids"] is not None and result["by_domain"]["big"]["ids_reliable"]
    assert result["by_domain"]["small"]["u_ids"] is None and result["by_domain"]["small"]["ids_min_pairs"] == minimum
    assert result["overall"]["ids_reliable"] is True
    table = markdown_table(result)
    assert f"at least {minimum} image pairs" in table and "biased low" not in table

    few = records[:20]
    result = summarise(meta, few, real[:20], fake[:20])
    assert result["overall"]["u_ids"] is not None and result["overall"]["ids_reliable"] is False
    assert "biased low" in markdown_table(result)


def test_grad_empty_edge_convention():
    gt = torch.rand(2, 3, 16, 16) * 2 - 1
    no_hole = torch.zeros(2, 1, 16, 16)
    assert torch.isnan(boundary_gradient(gt, gt, no_hole)).all()
    assert torch.equal(boundary_gradient(gt, gt, no_hole, empty_edge="zero"), torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="empty_edge"):
        boundary_gradient(gt, gt, no_hole, empty_edge="one")

"""``asuka evaluate``: discovery, resumable prediction, the composite protocol, groups, shards and merge."""

from __future__ import annotations

import json

import numpy as np
import pytest
import skimage.data
import torch
import torchvision
from PIL import Image

from asuka.cli import main
from asuka.evaluation.aggregate import hole_bin, load_shards, summarise
from asuka.evaluation.dataset import discover
from asuka.evaluation.distributed import Shard, parse_shard
from asuka.evaluation.predict import predict
from asuka.evaluation.runner import EvalConfig, evaluate
from asuka.evaluation.scoring import MetricConfig, MetricSuite, write_shard
from asuka.metrics import fid_from_features, inception_discriminative_scores, save_random_inception_weights
from asuka.errors import InputError

SIZE = 64
# (MISATO index, hole side in px): four domains, hole ratios 1.6 % .. 39 %
ITEMS = [(0, 8), (1, 16), (500, 24), (1000, 32), (1500, 40)]


def _write_set(image_dir, mask_dir, names):
    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket()]
    image_dir.mkdir(parents=True)
    mask_dir.mkdir(parents=True)
    for j, (name, side) in enumerate(names):
        Image.fromarray(photos[j % 4]).resize((SIZE, SIZE), Image.Resampling.BICUBIC).save(image_dir / f"{name}.png")
        mask = np.zeros((SIZE, SIZE), np.uint8)
        mask[12:12 + side, 6:6 + side] = 255
        Image.fromarray(mask).save(mask_dir / f"{name}.png")


@pytest.fixture(scope="module")
def misato(tmp_path_factory):
    root = tmp_path_factory.mktemp("misato")
    _write_set(root / "512" / "image", root / "512" / "mask", [(f"{i:04d}", s) for i, s in ITEMS])
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), folder / "squeeze.pth")
    return {"inception": str(save_random_inception_weights(folder / "inception.pth")),
            "lpips": str(folder / "squeeze.pth")}


def _gt_as_predictions(misato, folder):
    folder.mkdir(parents=True, exist_ok=True)
    for p in (misato / "512" / "image").iterdir():
        Image.open(p).save(folder / p.name)
    return folder


# ---------------------------------------------------------------- discovery and shards
def test_discover_misato_layouts_and_folder_pairs(misato, tmp_path):
    items = discover(misato)
    assert [i.key for i in items] == [f"{i:04d}" for i, _ in ITEMS]
    assert [i.domain for i in items] == ["landscape", "landscape", "indoor", "building", "background"]
    assert discover(misato / "512") == items  # the resolution folder itself, as ASUKA's --gt_dir
    _write_set(tmp_path / "set" / "images", tmp_path / "set" / "masks", [("a", 8), ("b", 16)])
    pair = discover(tmp_path / "set")
    assert [(i.key, i.domain) for i in pair] == [("a", "all"), ("b", "all")]
    assert discover(tmp_path / "set" / "images", masks=tmp_path / "set" / "masks") == pair
    (tmp_path / "set" / "masks" / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match="no mask"):
        discover(tmp_path / "set")
    with pytest.raises(FileNotFoundError, match="data: "):
        discover(tmp_path / "nowhere")


def test_shards_partition_and_hole_bins():
    items = list(range(11))
    parts = [Shard(i, 3).take(items) for i in range(3)]
    assert sorted(sum(parts, [])) == items and parts[1] == [1, 4, 7, 10]
    assert parse_shard("2/4") == Shard(2, 4)
    with pytest.raises(ValueError, match="shard: "):
        parse_shard("4/4")
    assert [hole_bin(r) for r in (0.0, 0.0999, 0.1, 0.55, 0.9, 1.0)] == [
        "0-10%", "0-10%", "10-20%", "50-60%", "90-100%", "90-100%"]


# ---------------------------------------------------------------- prediction
class NoiseRunner:
    """Returns each image's own generator noise: exposes seeding, batching and call counts."""

    multiple = 8

    def __init__(self):
        self.calls = 0

    def __call__(self, image, mask, *, generator, progress_bar):
        self.calls += 1
        assert isinstance(generator, list) and len(generator) == image.shape[0]
        return torch.stack([torch.rand(image.shape[1:], generator=g) * 2 - 1 for g in generator])


def _painter(monkeypatch, runner, name="noise-test"):
    from asuka.api import Inpainter
    from asuka.pipelines import _registry as registry

    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    registry.register_method(name, build=lambda model, **_: runner, default_model="none")
    return Inpainter(name)


def test_predict_is_resumable_and_independent_of_batch_size(misato, tmp_path, monkeypatch):
    items = list(enumerate(discover(misato)))
    runner = NoiseRunner()
    painter = _painter(monkeypatch, runner)
    assert predict(items, tmp_path / "b1", painter, batch_size=1, seed=3, progress=False) == 5
    assert runner.calls == 5
    assert predict(items, tmp_path / "b1", painter, batch_size=1, seed=3, progress=False) == 0  # resumed: nothing
    assert runner.calls == 5
    (tmp_path / "b1" / "0500.png").unlink()
    assert predict(items, tmp_path / "b1", painter, batch_size=2, seed=3, progress=False) == 1
    assert predict(items, tmp_path / "b3", _painter(monkeypatch, NoiseRunner(), "noise-test-2"), batch_size=3, seed=3,
                   progress=False) == 5
    for _, item in items:
        a = np.asarray(Image.open(tmp_path / "b1" / f"{item.key}.png"))
        b = np.asarray(Image.open(tmp_path / "b3" / f"{item.key}.png"))
        assert np.array_equal(a, b), item.key
    assert not list((tmp_path / "b1").glob(".*.tmp"))


# ---------------------------------------------------------------- protocol and metrics
def test_perfect_predictions_score_known_values(misato, weights, tmp_path):
    """Predictions equal to the ground truth: PSNR 70 dB (eps 1e-7), SSIM 1, Grad 0, LPIPS 0, FID ~0,
    U-IDS 0.5 (every feature carries both labels), P-IDS 0."""
    preds = _gt_as_predictions(misato, tmp_path / "preds")
    config = EvalConfig(data=str(misato), out=str(tmp_path / "out"), predictions=str(preds), progress=False, limit=4,
                        metrics=MetricConfig(lpips_net="squeeze", lpips_weights=weights["lpips"],
                                             inception_weights=weights["inception"]))
    result = evaluate(config)
    overall = result["overall"]
    assert overall["n"] == 4
    assert overall["psnr"] == pytest.approx(70.0) and overall["psnr_known"] == pytest.approx(70.0)
    assert overall["ssim"] == pytest.approx(1.0) and overall["grad"] == pytest.approx(0.0)
    assert overall["lpips_squeeze"] == pytest.approx(0.0, abs=1e-7)
    assert overall["fid"] == pytest.approx(0.0, abs=1e-6)
    assert overall["u_ids"] == 0.5 and overall["p_ids"] == 0.0 and overall["kid_subset_size"] == 4
    assert list(result["by_domain"]) == ["landscape", "indoor", "building"]
    assert result["by_domain"]["landscape"]["n"] == 2 and result["by_domain"]["indoor"]["fid"] is None
    assert list(result["by_hole_ratio"]) == ["0-10%", "10-20%", "20-30%"]
    assert result["by_hole_ratio"]["0-10%"]["n"] == 2
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["settings"]["lpips_net"] == "squeeze" and saved["settings"]["inception_variant"] == "fidelity"
    assert "LPIPS-squeeze" in (tmp_path / "out" / "metrics.md").read_text()
    assert Image.open(tmp_path / "out" / "examples.png").size == (4 * 128, 4 * 128)


def test_composite_protocol_ignores_pixels_outside_the_hole(misato):
    """Garbage outside the hole does not change composite metrics but does change the known-region ones."""
    suite = MetricSuite(MetricConfig())
    gt = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    mask = torch.zeros(2, 1, SIZE, SIZE)
    mask[..., 10:30, 10:30] = 0.7  # soft mask: thresholded at 0.5
    fill = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    pasted = torch.where(mask >= 0.5, fill, gt)
    garbage = torch.where(mask >= 0.5, fill, -gt)
    a, _ = suite.score(pasted, gt, mask)
    b, _ = suite.score(garbage, gt, mask)
    for name in ("psnr", "ssim", "grad"):
        assert torch.allclose(a[name], b[name]), name
    assert torch.allclose(a["psnr_known"], torch.full((2,), 70.0, dtype=torch.float64))
    assert (b["psnr_known"] < 20).all()
    assert torch.allclose(a["hole_ratio"], torch.full((2,), 400 / SIZE ** 2, dtype=torch.float64))


def test_shards_then_merge_equal_one_process(misato, tmp_path):
    preds = _gt_as_predictions(misato, tmp_path / "preds")
    preds.joinpath("0500.png").write_bytes((misato / "512" / "image" / "0001.png").read_bytes())  # one wrong
    common = ["evaluate", "--predictions", str(preds), "--data", str(misato), "--no-progress"]
    assert main(common + ["--out", str(tmp_path / "one")]) == 0
    for i in range(2):
        assert main(common + ["--out", str(tmp_path / "two"), "--shard", f"{i}/2"]) == 0
    assert not (tmp_path / "two" / "metrics.json").exists()
    assert main(["evaluate", "--merge", "--out", str(tmp_path / "two")]) == 0
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    for group in ("overall", "by_domain", "by_hole_ratio"):
        assert json.dumps(one[group], sort_keys=True) == json.dumps(two[group], sort_keys=True), group
    assert one["overall"]["psnr"] < 70.0 and one["by_domain"]["indoor"]["psnr"] < 70.0
    assert one["by_domain"]["building"]["psnr"] == pytest.approx(70.0)


def test_merge_realigns_shard_features_with_sorted_records(tmp_path):
    """Shard files hold features in their own order; the merge sorts by key and must keep rows paired."""
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    keys = [f"{i:02d}" for i in range(6)]
    meta = {"metrics": ["fid", "ids"], "kid_subsets": 10, "kid_subset_size": 100, "ids_pca_dim": None}
    for index, rows in enumerate(([4, 0, 2], [5, 1, 3])):  # deliberately unsorted within and across shards
        records = [{"key": keys[r], "domain": "all", "hole_ratio": 0.05 + 0.1 * r} for r in rows]
        write_shard(tmp_path, Shard(index, 2).name, records, real[rows], fake[rows], meta)
    _, records, merged_real, merged_fake = load_shards(tmp_path)
    assert [r["key"] for r in records] == keys
    assert torch.equal(merged_real, real) and torch.equal(merged_fake, fake)
    summary = summarise(meta, records, merged_real, merged_fake)
    assert summary["overall"]["fid"] == pytest.approx(fid_from_features(real, fake))
    assert summary["overall"]["p_ids"] == inception_discriminative_scores(real, fake)["p_ids"]
    assert summary["by_hole_ratio"]["0-10%"]["fid"] is None  # one image: undefined
    (tmp_path / "0001-of-0002.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"shards \[1\] of 2"):
        load_shards(tmp_path)


def test_method_run_through_registry(misato, tmp_path, tiny_inpaint_dir):
    out = tmp_path / "sd"
    args = ["evaluate", "--method", "sd", "--model", str(tiny_inpaint_dir), "--data", str(misato), "--out",
            str(out), "--steps", "2", "--batch-size", "3", "--limit", "3", "--no-progress"]
    assert main(args) == 0
    first = {p.name: p.stat().st_mtime_ns for p in (out / "predictions").iterdir()}
    assert sorted(first) == ["0000.png", "0001.png", "0500.png"]
    assert main(args) == 0  # resumed: nothing is recomputed
    assert {p.name: p.stat().st_mtime_ns for p in (out / "predictions").iterdir()} == first
    result = json.loads((out / "metrics.json").read_text())
    assert result["settings"]["method"] == "sd" and result["overall"]["n"] == 3
    assert set(result["overall"]) >= {"psnr", "ssim", "grad", "psnr_known", "ssim_known"}


def test_cli_errors_are_one_line(misato, tmp_path, capsys):
    assert main(["evaluate", "--predictions", str(tmp_path), "--data", str(misato), "--out", str(tmp_path / "o"),
                 "--metrics", "fid"]) == 1
    assert "--inception-weights" in capsys.readouterr().err
    assert main(["evaluate", "--predictions", str(tmp_path), "--data", str(misato), "--out",
                 str(tmp_path / "o")]) == 1
    assert "prediction(s) missing" in capsys.readouterr().err
    assert main(["evaluate", "--data", str(misato), "--out", str(tmp_path / "o")]) == 1
    assert "--method" in capsys.readouterr().err
    assert main(["evaluate", "--merge", "--out", str(tmp_path / "empty")]) == 1
    assert "no shard results" in capsys.readouterr().err
    with pytest.raises(InputError, match="clip_model: the clip metric needs a CLIP model"):
        MetricConfig(metrics=["clip"]).resolved()


@pytest.mark.slow
def test_torchrun_two_ranks_merge_on_rank0(misato, tmp_path):
    """Two torchrun ranks split the set, meet at a gloo barrier, and rank 0 writes the same report as one process."""
    import socket
    import subprocess
    import sys

    preds = _gt_as_predictions(misato, tmp_path / "preds")
    preds.joinpath("0001.png").write_bytes((misato / "512" / "image" / "0500.png").read_bytes())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["evaluate", "--predictions", str(preds), "--data", str(misato), "--no-progress"]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(port), "-m", "asuka", *args, "--out", str(tmp_path / "tr")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "tr" / "shards").iterdir()) == ["0000-of-0002.json",
                                                                              "0001-of-0002.json"]
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "tr" / "metrics.json").read_text())
    assert json.dumps(one["by_hole_ratio"], sort_keys=True) == json.dumps(two["by_hole_ratio"], sort_keys=True)
    assert one["overall"] == two["overall"] and one["overall"]["psnr"] < 70.0

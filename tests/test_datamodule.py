"""InpaintingDataModule: batches, rank/worker split, epochs, validation, corrupt samples, paired fields."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from asuka.data.pipeline import DataStreamError, random_resized_crop_box, rank_shards
from asuka.data.samples import ensure_sample_shards
from asuka.data.shards import encode_image, write_shards
from trainers.datamodule import InpaintingDataModule


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return ensure_sample_shards(tmp_path_factory.mktemp("samples"))


def _dm(train, val=None, **kw):
    kw = {"resolution": 32, "batch_size": 4, "num_workers": 0, "epoch_batches": 3, **kw}
    dm = InpaintingDataModule(train_shards=train, val_shards=val, **kw)
    dm.setup("fit")
    return dm


def _shard_of_key(paths):
    """Sample key -> shard path (webdataset's key: the member path up to the first dot of its file name); read with
    tarfile, which closes each shard (``wds.WebDataset`` leaves its files to the garbage collector)."""
    import re
    import tarfile

    keys = {}
    for path in paths:
        with tarfile.open(path) as tar:
            for name in tar.getnames():
                keys[re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name).group(1)] = path
    return keys


def test_batch_contract(sample):
    dm = _dm(sample["train"], mask_recipe="asuka_train")
    batches = list(dm.train_dataloader())
    assert len(batches) == 3
    b = batches[0]
    assert b["image"].shape == (4, 3, 32, 32) and b["image"].dtype == torch.float32
    assert b["mask"].shape == (4, 1, 32, 32) and set(b["mask"].unique().tolist()) <= {0.0, 1.0}
    assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0
    assert torch.equal(b["masked_image"], b["image"] * (1 - b["mask"]))
    assert isinstance(b["key"], list) and len(b["key"]) == 4 and int(b["skipped"]) == 0
    ratios = torch.cat([x["mask"] for x in batches]).mean(dim=(1, 2, 3))
    assert (ratios >= 0.1).all() and (ratios <= 0.75).all()
    assert dm.batch_size == 4


def test_device_transform_gives_the_same_batches(sample):
    floats = list(_dm(sample["train"]).train_dataloader())
    dm = _dm(sample["train"], device_transform=True)
    compact = list(dm.train_dataloader())
    assert compact[0]["image"].dtype == torch.uint8 and "masked_image" not in compact[0]
    for f, c in zip(floats, compact):
        done = dm.on_after_batch_transfer(c, 0)
        for k in ("image", "mask", "masked_image"):
            assert torch.equal(f[k], done[k])
        assert dm.on_after_batch_transfer(done, 0) is done  # idempotent on float batches


def test_default_is_the_bundled_sample_set(tmp_path):
    dm = InpaintingDataModule(sample_root=str(tmp_path), resolution=32, batch_size=2, num_workers=0, epoch_batches=1)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm._train_urls) == 8 and len(dm._val_urls) == 2
    assert next(iter(dm.train_dataloader()))["image"].shape == (2, 3, 32, 32)


def test_two_rank_split_is_disjoint_with_equal_batch_counts(sample, monkeypatch):
    shard_of = _shard_of_key(sample["train"])
    slices = [set(rank_shards(sample["train"], r, 2)) for r in range(2)]
    assert all(len(s) >= 1 for s in slices)
    assert sum(len(s) for s in slices) == len(sample["train"]) and len(set().union(*slices)) == len(sample["train"])

    used, counts, masks = {}, {}, {}
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dm = _dm(sample["train"], num_workers=2, epoch_batches=5)
        batches = list(dm.train_dataloader())
        counts[rank] = len(batches)
        used[rank] = {shard_of[k] for b in batches for k in b["key"]}
        masks[rank] = torch.cat([b["mask"] for b in batches])
    assert counts == {0: 5, 1: 5}
    assert used[0] and used[1] and not used[0] & used[1]
    assert not torch.equal(masks[0], masks[1])  # mask generators are seeded per rank


def test_epochs_differ_and_runs_repeat(sample):
    def run(seed):
        loader = _dm(sample["train"], seed=seed).train_dataloader()
        return [torch.cat([b["mask"] for b in loader]) for _ in range(2)]

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # same seed: same stream
    assert not torch.equal(a[0], a[1])  # a new epoch draws new masks
    assert not torch.equal(a[0], c[0])  # another seed, another stream


def test_workers_do_not_change_the_stream(sample):
    def epochs(num_workers):
        loader = _dm(sample["train"], num_workers=num_workers).train_dataloader()
        return [b for _ in range(2) for b in loader]

    alone, with_workers = epochs(0), epochs(2)
    assert [b["position"] for b in with_workers] == list(range(6))
    for a, b in zip(alone, with_workers):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])


def test_validation_is_fixed(sample):
    def val(num_workers):
        dm = _dm(sample["train"], sample["val"], val_num_workers=num_workers, val_batch_size=3)
        return {k: (b["image"][i], b["mask"][i]) for b in dm.val_dataloader() for i, k in enumerate(b["key"])}

    first, second, with_workers = val(0), val(0), val(2)
    assert len(first) == 8
    for k, (img, m) in first.items():
        for other in (second, with_workers):
            assert torch.equal(img, other[k][0]) and torch.equal(m, other[k][1])
    assert _dm(sample["train"], None).val_dataloader() == []


def _corrupt_shards(tmp_path, n_good=10, n_bad=3, shards=2):
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n_good + n_bad):
        if i % 4 == 1 and sum(1 for s in samples if s["__key__"].startswith("bad")) < n_bad:
            samples.append({"__key__": f"bad_{i}", "jpg": b"\xff\xd8 garbage"})
        else:
            samples.append({"__key__": f"good_{i}", "jpg": encode_image(rng.integers(0, 256, (40, 40, 3), np.uint8))})
    return [str(p) for p in write_shards(samples, tmp_path, "c", maxcount=len(samples) // shards + 1)]


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    paths = _corrupt_shards(tmp_path)
    dm = _dm(paths, paths, val_batch_size=4)
    batches = list(dm.val_dataloader())
    keys = [k for b in batches for k in b["key"]]
    assert len(keys) == 10 and all(k.startswith("good") for k in keys)
    assert sum(int(b["skipped"]) for b in batches) == 3
    for b in batches:
        dm.on_before_batch_transfer(b, 0)
    assert dm.skipped_samples == 3

    train = list(dm.train_dataloader())
    assert all(k.startswith("good") for b in train for k in b["key"])
    assert sum(int(b["skipped"]) for b in train) > 0


def test_mostly_failing_stream_stops_with_clear_error(tmp_path):
    bad = tmp_path / "bad-000000.tar"
    with tarfile.open(bad, "w") as tar:
        for i in range(30):
            data = b"\x00 not an image"
            info = tarfile.TarInfo(f"s{i}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    not_a_tar = tmp_path / "junk-000000.tar"
    not_a_tar.write_bytes(b"junk" * 100)
    with pytest.raises(DataStreamError, match="max_failure_ratio"):
        next(iter(_dm([str(bad)]).train_dataloader()))
    with pytest.raises(DataStreamError, match="no training sample can be read.*junk-000000.tar"):
        _dm([str(not_a_tar)]).train_dataloader()


def test_paired_fields_share_crop_and_flip(tmp_path):
    rng = np.random.default_rng(3)
    samples = []
    for i in range(12):
        img = rng.integers(0, 256, (48, 64, 3), np.uint8)
        s = {"__key__": f"s{i}", "png": encode_image(img, "png")}
        if i % 3:
            s["aug.png"] = encode_image(255 - img, "png")  # an exactly inverted copy
        samples.append(s)
    paths = [str(p) for p in write_shards(samples, tmp_path, "p", maxcount=6)]
    dm = _dm(paths, paths, paired_image_keys={"aug.png": "aug_image"}, crop_scale=(0.3, 1.0))
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        for b in loader:
            present = b["aug_image_present"]
            inverted = (b["aug_image"] + b["image"]).abs().amax(dim=(1, 2, 3))
            same = (b["aug_image"] - b["image"]).abs().amax(dim=(1, 2, 3))
            assert (inverted[present] <= 2.5 / 127.5).all()  # same crop and flip (resize rounding only)
            assert (same[~present] == 0).all()  # missing field: the image itself
            assert present.any() or (~present).any()
    dm_skip = _dm(paths, paired_image_keys={"aug.png": "aug_image"}, paired_missing="skip")
    assert all(b["aug_image_present"].all() for b in dm_skip.train_dataloader())


def test_random_resized_crop_box_bounds():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = random_resized_crop_box(50, 90, (0.2, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= top and top + h <= 50 and 0 <= left and left + w <= 90
        assert 0.2 * 50 * 90 * 0.85 <= h * w <= 50 * 90


def test_bad_arguments(sample, tmp_path):
    with pytest.raises(FileNotFoundError, match="train_shards"):
        _dm([str(tmp_path / "missing.tar")])
    with pytest.raises(FileNotFoundError, match="manifest"):
        _dm(str(tmp_path))
    with pytest.raises(ValueError, match="batch_size"):
        InpaintingDataModule(batch_size=0)
    with pytest.raises(ValueError, match="reserved"):
        InpaintingDataModule(paired_image_keys={"aug.png": "mask"})
    with pytest.raises(ValueError, match="unknown mask recipe"):
        _dm(sample["train"], mask_recipe="nope")
    folder_dm = _dm(str(Path(sample["train"][0]).parent))  # a folder with a manifest: its train split
    assert len(folder_dm._train_urls) == 8 and len(folder_dm._val_urls) == 0


def test_lightning_fit_uses_equal_epochs_and_counts_skips(sample):
    import lightning.pytorch as pl

    class Probe(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.train_batches, self.val_batches = [], 0

        def training_step(self, batch, _):
            assert batch["image"].dtype == torch.float32 and batch["mask"].dtype == torch.float32
            assert torch.equal(batch["masked_image"], batch["image"] * (1 - batch["mask"]))
            self.train_batches.append(self.current_epoch)
            return (self.w * batch["masked_image"].mean()).sum()

        def validation_step(self, batch, _):
            self.val_batches += 1

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = InpaintingDataModule(train_shards=sample["train"], val_shards=sample["val"], resolution=32, batch_size=2,
                              num_workers=0, epoch_batches=3, device_transform=True)
    model = Probe()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    assert model.train_batches == [0, 0, 0, 1, 1, 1]
    assert model.val_batches == 2 * 4  # 8 validation samples in batches of 2, twice
    assert dm.skipped_samples == 0

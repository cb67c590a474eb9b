"""Offline latent augmentation: Eq. 1 against the hand formula, per-key determinism, the predict job, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from asuka.data.pipeline import tar_samples
from asuka.data.shards import decode_image, encode_image, write_manifest, write_shards
from trainers.latent_augment import add_noise, key_draw, main, predict_x0

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny" / "latent_augment.yaml"


def test_eq1_matches_hand_formula():
    g = torch.Generator().manual_seed(0)
    z0, eps, eps_hat = (torch.randn(2, 4, 3, 3, generator=g) for _ in range(3))
    ab = torch.tensor([0.3, 0.81])
    z_t = add_noise(z0, eps, ab)
    for b in range(2):
        hand = math.sqrt(ab[b]) * z0[b] + math.sqrt(1 - ab[b]) * eps[b]
        torch.testing.assert_close(z_t[b], hand)
        torch.testing.assert_close(predict_x0(z_t, eps_hat, ab)[b],
                                   (hand - math.sqrt(1 - ab[b]) * eps_hat[b]) / math.sqrt(ab[b]))
    torch.testing.assert_close(predict_x0(z_t, eps, ab), z0, rtol=1e-5, atol=1e-5)  # exact ε recovers z_0


def test_key_draw_deterministic_and_in_range():
    a, b = key_draw("img_1", 0, (4, 2, 2), (500, 1000)), key_draw("img_1", 0, (4, 2, 2), (500, 1000))
    assert a.timestep == b.timestep and torch.equal(a.noise, b.noise) and a.selected
    draws = [key_draw(f"k{i}", 0, (1,), (500, 1000), fraction=0.5) for i in range(200)]
    assert all(500 <= d.timestep < 1000 for d in draws)
    assert len({d.timestep for d in draws}) > 100
    assert 60 < sum(d.selected for d in draws) < 140
    assert key_draw("img_1", 1, (4, 2, 2), (500, 1000)).timestep != a.timestep or not torch.equal(
        key_draw("img_1", 1, (4, 2, 2), (500, 1000)).noise, a.noise)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from skimage import data

    root = tmp_path_factory.mktemp("shards")
    photos = [data.astronaut(), data.chelsea(), data.coffee()]
    samples = [{"__key__": f"photo_{i}", "jpg": encode_image(np.ascontiguousarray(p[:72, 10:90]), "jpg"),
                "json": json.dumps({"i": i}).encode()} for i, p in enumerate(photos * 2)]
    train = write_shards(samples[:4], root, "train", maxcount=2)
    val = write_shards(samples[4:], root, "val", maxcount=2)
    write_manifest(root, {"train": train, "val": val})
    return root


def _read(path: Path) -> dict[str, dict]:
    return {s["__key__"]: s for s in tar_samples()(iter([{"url": str(path)}]))}


def _reference(pipe: Path, rgb: np.ndarray, key: str) -> np.ndarray:
    """Eq. 1 computed here from the diffusers components directly."""
    unet = UNet2DConditionModel.from_pretrained(pipe, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(pipe, subfolder="vae")
    tok = CLIPTokenizer.from_pretrained(pipe, subfolder="tokenizer")
    text = CLIPTextModel.from_pretrained(pipe, subfolder="text_encoder")
    ab_all = DDPMScheduler.from_pretrained(pipe, subfolder="scheduler").alphas_cumprod
    h, w = rgb.shape[:2]
    padded = np.pad(rgb, ((0, (-h) % 64), (0, (-w) % 64), (0, 0)), mode="reflect")
    x = torch.from_numpy(padded).permute(2, 0, 1)[None].float() / 127.5 - 1
    draw = key_draw(key, 0, (4, padded.shape[0] // 8, padded.shape[1] // 8), (500, 1000))
    with torch.no_grad():
        z0 = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        ab = ab_all[draw.timestep]
        z_t = ab.sqrt() * z0 + (1 - ab).sqrt() * draw.noise[None]
        ids = tok([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
        eps_hat = unet(torch.cat([z_t, torch.zeros_like(z_t[:, :1]), z0], 1), torch.tensor([draw.timestep]),
                       encoder_hidden_states=text(ids)[0]).sample
        z0_hat = (z_t - (1 - ab).sqrt() * eps_hat) / ab.sqrt()
        out = vae.decode(z0_hat / vae.config.scaling_factor).sample.clamp(-1, 1)
    return ((out[0] + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()[:h, :w]


@pytest.mark.slow
def test_predict_job_writes_resumable_shards(shards, tiny_inpaint_dir, tmp_path):
    out = tmp_path / "aug"
    args = ["--config", str(CONFIG), "--pipeline", str(tiny_inpaint_dir), "--shards", str(shards),
            "--output_dir", str(out), "--batch_size", "2"]
    main(args)
    names = sorted(p.name for p in out.glob("*.tar"))
    assert names == ["train-000000.tar", "train-000001.tar", "val-000000.tar"]
    assert all((out / f"{n}.done").is_file() for n in names)
    for name in names:
        original, augmented = _read(shards / name), _read(out / name)
        assert list(original) == list(augmented)  # same keys, same order
        for key, sample in original.items():
            assert augmented[key]["jpg"] == sample["jpg"] and augmented[key]["json"] == sample["json"]
            assert decode_image(augmented[key]["aug.png"]).shape == decode_image(sample["jpg"]).shape
    first = _read(out / "train-000000.tar")["photo_0"]
    reference = _reference(tiny_inpaint_dir, decode_image(first["jpg"]), "photo_0")
    assert np.abs(decode_image(first["aug.png"]).astype(int) - reference.astype(int)).max() <= 1

    from trainers.datamodule import InpaintingDataModule  # the output folder is a valid shard folder

    dm = InpaintingDataModule(train_shards=str(out), val_shards=str(out), resolution=32, batch_size=2,
                              num_workers=0, paired_image_keys={"aug.png": "aug_image"}, pin_memory=False)
    batch = next(iter(dm.val_dataloader()))
    assert batch["aug_image"].shape == batch["image"].shape and bool(batch["aug_image_present"].all())

    stamps = {n: (out / n).stat().st_mtime_ns for n in names}
    redo = out / "train-000001.tar"
    before = redo.read_bytes()
    (out / "train-000001.tar.done").unlink()  # as if the job stopped while writing this shard
    main(args)
    assert (out / "train-000000.tar").stat().st_mtime_ns == stamps["train-000000.tar"]  # skipped
    assert redo.stat().st_mtime_ns != stamps["train-000001.tar"]
    again = _read(redo)
    assert list(again) == list(_read(shards / "train-000001.tar"))
    assert all(np.array_equal(decode_image(again[k]["aug.png"]), decode_image(v["aug.png"]))
               for k, v in _read_bytes(before).items())  # deterministic per key


def _read_bytes(data: bytes) -> dict[str, dict]:
    import io
    import tarfile

    samples: dict[str, dict] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            key, field = member.name.split(".", 1)
            samples.setdefault(key, {})[field] = tar.extractfile(member).read()
    return samples


def test_bad_arguments(tiny_inpaint_dir, tmp_path):
    from trainers.latent_augment import run

    with pytest.raises(ValueError, match="--pipeline"):
        run()
    with pytest.raises(ValueError, match="t_range"):
        run(str(tiny_inpaint_dir), t_range=(900, 500))
    with pytest.raises(FileNotFoundError, match="shards"):
        run(str(tiny_inpaint_dir), shards=str(tmp_path / "missing-{000..001}.tar"))
    with pytest.raises(FileNotFoundError, match="pipeline"):
        run(str(tmp_path), shards=None, output_dir=str(tmp_path / "o"), trainer={"accelerator": "cpu"})

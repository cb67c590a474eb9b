"""``asuka inpaint``: single files, folders, the demo (subprocess), and one-line errors on bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from asuka.cli import main
from asuka.options import Option

FAST = ["--steps", "2"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Two real photographs at 72 x 64 (not multiples of 8 on one side), their masks, and a shared mask."""
    root = tmp_path_factory.mktemp("cli-inputs")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    for name, fn in (("coffee", skimage.data.coffee), ("cat", skimage.data.chelsea)):
        Image.fromarray(fn()).resize((72, 64)).save(root / "images" / f"{name}.png")
    first = np.zeros((64, 72), np.uint8)
    first[10:30, 20:50] = 255
    second = np.zeros((64, 72), np.uint8)
    second[40:60, 5:25] = 255
    Image.fromarray(first).save(root / "masks" / "coffee.png")
    Image.fromarray(second).save(root / "masks" / "cat.png")
    Image.fromarray(first).save(root / "shared_mask.png")
    Image.fromarray(np.zeros((64, 72), np.uint8)).save(root / "empty_mask.png")
    Image.fromarray(np.zeros((60, 72), np.uint8)).save(root / "small_mask.png")
    return root


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _known_equal(result: Path, image: Path, mask: Path) -> bool:
    res, img = np.asarray(Image.open(result)), np.asarray(Image.open(image))
    known = np.asarray(Image.open(mask)) < 128
    return res.shape == img.shape and np.array_equal(res[known], img[known])


def test_single_image(files, tiny_inpaint_dir, tmp_path, capsys):
    image, mask, out = files / "images" / "coffee.png", files / "masks" / "coffee.png", tmp_path / "out.png"
    code, stdout, _ = _run(capsys, "inpaint", "--image", image, "--mask", mask, "--out", out,
                           "--model", tiny_inpaint_dir, "--prompt", "coffee", *FAST)
    assert code == 0 and f"wrote {out}" in stdout
    assert _known_equal(out, image, mask)  # paste-back: bit-exact outside the hole
    hole = np.asarray(Image.open(mask)) >= 128
    result = np.asarray(Image.open(out))
    assert not np.array_equal(result[hole], np.asarray(Image.open(image))[hole])

    raw = tmp_path / "raw.png"
    assert _run(capsys, "inpaint", "--image", image, "--mask", mask, "--out", raw, "--model", tiny_inpaint_dir,
                "--no-paste-back", "--prompt", "coffee", *FAST)[0] == 0
    assert not _known_equal(raw, image, mask)  # the model's own pixels outside the hole ...
    assert np.array_equal(np.asarray(Image.open(raw))[hole], result[hole])  # ... and the same seed, same hole


def test_folder_with_matching_masks(files, tiny_inpaint_dir, tmp_path, capsys):
    out = tmp_path / "per-image"
    code, stdout, _ = _run(capsys, "inpaint", "--image", files / "images", "--mask", files / "masks",
                           "--out", out, "--model", tiny_inpaint_dir, *FAST)
    assert code == 0 and f"wrote 2 images in {out}" in stdout
    for stem in ("coffee", "cat"):
        assert _known_equal(out / f"{stem}.png", files / "images" / f"{stem}.png", files / "masks" / f"{stem}.png")


def test_folder_with_one_shared_mask_without_hole(files, tmp_path, capsys):
    """One mask file for a folder; no hole: the inputs are written unchanged and the model is never loaded
    (the --model folder does not even exist)."""
    out = tmp_path / "shared"
    assert _run(capsys, "inpaint", "--image", files / "images", "--mask", files / "empty_mask.png",
                "--out", out, "--model", tmp_path / "no-such-model")[0] == 0
    for stem in ("coffee", "cat"):
        written, given = Image.open(out / f"{stem}.png"), Image.open(files / "images" / f"{stem}.png")
        assert np.array_equal(np.asarray(written), np.asarray(given))


def test_soft_mask_warns_in_one_line(files, tmp_path, capsys):
    soft = np.zeros((64, 72), np.uint8)
    soft[5:20, 5:20] = 100  # below the threshold (128): no hole after binarization
    Image.fromarray(soft).save(tmp_path / "soft.png")
    code, _, err = _run(capsys, "inpaint", "--image", files / "images" / "cat.png", "--mask", tmp_path / "soft.png",
                        "--out", tmp_path / "o.png")
    assert code == 0 and err.strip().splitlines() == [
        "asuka inpaint: warning: --mask soft.png: soft mask (values other than 0/1 or 0/255) binarized at 0.5 (>= 128 for "
        "uint8) - pass a binary mask to silence this"]


@pytest.mark.parametrize("args, message", [
    (["--image", "{f}/nope.png", "--mask", "{f}/shared_mask.png"], "--image: not found"),
    (["--image", "{f}/images/cat.png", "--mask", "{f}/small_mask.png"], "size 72x60 differs from the image's 72x64"),
    (["--image", "{f}/images/cat.png", "--mask", "{f}/shared_mask.png", "--method", "nope"],
     "unknown inference method 'nope'"),
    (["--image", "{f}/images/coffee.png", "--mask", "{f}/images/cat.png"], "colour mask"),
    (["--image", "{f}/images/cat.png"], "--mask is required"),
    (["--mask", "{f}/shared_mask.png"], "--mask needs --image"),
    (["--image", "{f}/images", "--mask", "{f}/shared_mask.png", "--out", "{f}/x.png"],
     "is a file but --image is a folder"),
    (["--image", "{f}/images/cat.png", "--mask", "{f}/shared_mask.png", "--model", "{f}/missing"], "folder not found"),
    (["--image", "{f}/images/cat.png", "--mask", "{f}/shared_mask.png", "--max-size", "32"],
     "exceeds max_size=32"),
    (["--image", "{f}/images/cat.png", "--mask", "{f}/shared_mask.png", "--method", "asuka"],  # an SD folder
     "cannot load"),
    (["--image", "{f}/images/cat.png", "--mask", "{f}/shared_mask.png", "--method", "corrfill", "--baseline", "nope"],
     "error: --baseline: 'nope' is not one of the choices"),  # named as the command line spelled it
    (["--image", "{f}/images/cat.png", "--mask", "{f}/shared_mask.png", "--method", "corrfill", "--set",
      "baseline=nope"], "error: --set baseline: 'nope' is not one of the choices"),
    (["--image", "{f}/images/cat.png", "--mask", "{f}/shared_mask.png", "--method", "corrfill", "--baseline", "nope",
      "--set", "baseline=side-by-side"], "error: --baseline: also given as --set baseline; pass one of them"),
])
def test_bad_input_one_line_error(files, tiny_inpaint_dir, tmp_path, capsys, args, message):
    argv = [a.format(f=files) for a in args]
    defaults = {"--model": str(tiny_inpaint_dir), "--out": str(tmp_path / "o.png")}
    argv += [item for flag, value in defaults.items() if flag not in argv for item in (flag, value)]
    code, _, err = _run(capsys, "inpaint", *argv, *FAST)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("asuka inpaint: error: ") and "Traceback" not in err
    assert message in lines[0]


def test_folder_with_missing_mask(files, tiny_inpaint_dir, tmp_path, capsys):
    masks = tmp_path / "only-coffee"
    masks.mkdir()
    (masks / "coffee.png").write_bytes((files / "masks" / "coffee.png").read_bytes())
    code, _, err = _run(capsys, "inpaint", "--image", files / "images", "--mask", masks, "--out", tmp_path / "o",
                        "--model", tiny_inpaint_dir)
    assert code == 1 and "--mask: no mask of the same stem" in err and "for cat.png" in err
    assert len(err.strip().splitlines()) == 1


def test_any_registered_method_and_its_options(files, tmp_path, capsys, monkeypatch):
    from asuka.pipelines import _registry as registry

    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    seen = {}

    class Negative:
        multiple = 16

        def __call__(self, image, mask, *, generator, progress_bar, num_inference_steps=10):
            seen.update(shape=tuple(image.shape), steps=num_inference_steps)
            return -image

    registry.register_method("negative-test", build=lambda model, *, device, dtype, vae: Negative(),
                             default_model=lambda: "none",
                             options=[Option("num_inference_steps", "int", 10, "steps", min=1)])
    image, mask, out = files / "images" / "cat.png", files / "masks" / "cat.png", tmp_path / "neg.png"
    assert _run(capsys, "inpaint", "--method", "negative-test", "--image", image, "--mask", mask, "--out", out,
                "--steps", "3")[0] == 0
    assert seen == {"shape": (1, 3, 64, 80), "steps": 3}  # padded to the method's multiple of 16
    hole = np.asarray(Image.open(mask)) >= 128
    assert np.array_equal(np.asarray(Image.open(out))[hole], 255 - np.asarray(Image.open(image))[hole])
    code, _, err = _run(capsys, "inpaint", "--method", "negative-test", "--image", image, "--mask", mask,
                        "--out", out, "--prompt", "a cat")
    assert code == 1
    assert err.strip() == "asuka inpaint: error: --prompt: this method takes no 'prompt' input; it takes: none"


def test_out_must_not_overwrite_the_input(files, capsys):
    code, _, err = _run(capsys, "inpaint", "--image", files / "images", "--mask", files / "shared_mask.png",
                        "--out", files / "images")
    assert code == 1 and "would overwrite the input image" in err


def test_list_methods(capsys):
    code, stdout, _ = _run(capsys, "inpaint", "--list-methods")
    assert code == 0 and any(line.startswith("sd: diffusers") for line in stdout.splitlines())


def _subprocess(args: list[str], cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, ASUKA_CACHE=str(cache), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "asuka", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_demo_default_in_subprocess(tmp_path):
    """``asuka inpaint`` with no input: scikit-image's astronaut, a generated mask, the tiny pipeline (cached)."""
    proc = _subprocess(["inpaint", *FAST], tmp_path, tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "outputs" / "demo" / "sd"
    assert "wrote outputs/demo/sd/astronaut.png" in proc.stdout
    assert (tmp_path / "cache" / "tiny-sd-inpaint" / "model_index.json").is_file()
    assert _known_equal(out / "astronaut.png", out / "astronaut_input.png", out / "astronaut_mask.png")
    assert Image.open(out / "astronaut.png").size == (256, 256)


def test_bad_input_in_subprocess_has_no_traceback(tmp_path):
    proc = _subprocess(["inpaint", "--image", "missing.png", "--mask", "missing_mask.png"], tmp_path, tmp_path)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip() == "asuka inpaint: error: --image: not found: missing.png (check the path)"

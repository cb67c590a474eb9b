"""Reliability of ``asuka inpaint`` (issue 17): output clashes refused before any work, keep-going over bad files
with a failure report (``--fail-fast`` to stop), atomic writes, the pixel limit, one-line errors, animated GIFs.

Masks without a hole keep the model unloaded (the image is returned as it is), so these tests run no network."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pathlib import Path

from asuka.cli import main
from test_reliability_data import png_header_only


def _folder(tmp_path, names=("a", "b"), hole=False):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(exist_ok=True)
    masks.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(images / f"{name}.png")
        mask = np.zeros((32, 32), np.uint8)
        if hole:
            mask[8:16, 8:16] = 255
        Image.fromarray(mask).save(masks / f"{name}.png")
    return images, masks


def _run(capsys, *args):
    code = main(["inpaint", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, [line for line in captured.err.splitlines() if line.startswith("asuka ")]


def test_out_equal_to_the_mask_is_refused_before_any_work(tmp_path, capsys):
    images, masks = _folder(tmp_path)
    before = (masks / "a.png").read_bytes()
    code, _, err = _run(capsys, "--image", images / "a.png", "--mask", masks / "a.png", "--out", masks / "a.png")
    assert code == 1 and err == [f"asuka inpaint: error: --out: writing {masks / 'a.png'} would overwrite the "
                                 f"input mask {masks / 'a.png'}; choose another --out"]
    assert (masks / "a.png").read_bytes() == before


def test_two_inputs_with_one_output_name_are_refused(tmp_path, capsys):
    images, masks = _folder(tmp_path, names=("x",))
    Image.open(images / "x.png").save(images / "x.jpg")  # x.png and x.jpg: both would become out/x.png
    code, _, err = _run(capsys, "--image", images, "--mask", masks, "--out", tmp_path / "out")
    assert code == 1 and "would both be written to" in err[-1] and "x.jpg" in err[-1] and "x.png" in err[-1]
    assert not (tmp_path / "out").exists()


def test_bad_files_are_reported_and_the_rest_written(tmp_path, capsys):
    images, masks = _folder(tmp_path, names=("a", "b", "c"))
    (images / "b.png").write_bytes((images / "b.png").read_bytes()[:200])  # truncated
    (images / "c.png").write_bytes(png_header_only(30000, 30000))  # over the pixel limit, from its header
    code, out, err = _run(capsys, "--image", images, "--mask", masks, "--out", tmp_path / "out")
    assert code == 1
    assert "wrote 1 of 3 images" in out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png"]  # and no temporary file
    assert err[0].startswith("asuka inpaint: failed: b: --image b.png: cannot read") and "truncated" in err[0]
    assert err[1].startswith("asuka inpaint: failed: c: --image c.png:") and "30000×30000" in err[1]
    assert err[2] == "asuka inpaint: error: 2 of 3 images failed (listed above)"

    code, out, err = _run(capsys, "--image", images, "--mask", masks, "--out", tmp_path / "out2", "--fail-fast")
    assert code == 1 and len(err) == 1 and err[0].startswith("asuka inpaint: error: --image b.png: cannot read")
    code, out, err = _run(capsys, "--image", images / "c.png", "--mask", masks / "c.png", "--out",
                          tmp_path / "c.png", "--max-pixels", str(10**9))  # a raised limit passes the header check
    assert code == 1 and len(err) == 1 and "30000×30000" not in err[0]  # one input: its own one-line error


def test_outputs_are_written_atomically(tmp_path, capsys, monkeypatch):
    images, masks = _folder(tmp_path, names=("a",))
    target = tmp_path / "out.png"
    target.write_bytes(b"previous result")

    def full_disk(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    code, out, err = _run(capsys, "--image", images / "a.png", "--mask", masks / "a.png", "--out", target)
    assert code == 1 and len(err) == 1 and "No space left on device" in err[0]
    assert target.read_bytes() == b"previous result"  # never a half-written PNG
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["out.png"]


def test_atomic_writes_get_the_permissions_a_plain_write_would(tmp_path):
    import os
    import stat

    from asuka.atomic import atomic_path

    mask = os.umask(0o027)
    try:
        with atomic_path(tmp_path / "new.png") as tmp:
            tmp.write_bytes(b"new")
        assert stat.S_IMODE((tmp_path / "new.png").stat().st_mode) == 0o640   # 0o666 less the umask, not mkstemp's 0o600
        (tmp_path / "kept.png").write_bytes(b"old")
        os.chmod(tmp_path / "kept.png", 0o604)
        with atomic_path(tmp_path / "kept.png") as tmp:
            tmp.write_bytes(b"new")
        assert stat.S_IMODE((tmp_path / "kept.png").stat().st_mode) == 0o604  # a replaced file keeps its mode
    finally:
        os.umask(mask)


@pytest.mark.parametrize("args, message", [
    (["--seed", str(2**64)], "argument --seed: must be an integer in [0, 2**64)"),
    (["--seed", "-1"], "argument --seed: must be an integer in [0, 2**64)"),
    (["--hd-margin", "-5"], "argument --hd-margin: must be an integer >= 0, got -5"),
    (["--guidance-scale", "nan"], "argument --guidance-scale: must be a finite number, got nan"),
    (["--guidance-scale", "inf"], "argument --guidance-scale: must be a finite number, got inf"),
    (["--set", "guidance_scale=nan"], "--set guidance_scale"),
])
def test_bad_numbers_give_one_line(tmp_path, capsys, args, message):
    images, masks = _folder(tmp_path, names=("a",))
    try:
        code, _, err = _run(capsys, "--image", images / "a.png", "--mask", masks / "a.png", "--out",
                            tmp_path / "o.png", *args)
    except SystemExit as exit_info:  # argparse: usage line + one error line
        code, err = exit_info.code, capsys.readouterr().err.strip().splitlines()
    assert code in (1, 2) and message in err[-1] and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "o.png").exists()


def test_library_rejects_bad_seeds_and_margins():
    from asuka.api import check_seed
    from asuka.errors import InputError
    from asuka.pipelines._hd import HDStrategy

    assert check_seed(2**64 - 1) == 2**64 - 1
    for bad in (2**64, -1, 1.5, True):
        with pytest.raises(InputError, match=r"seed: must be an integer in \[0, 2\*\*64\)"):
            check_seed(bad)
    with pytest.raises(InputError, match="hd_margin: must be >= 0 pixels"):
        HDStrategy(margin=-5)


def test_animated_gif_warns_and_uses_the_first_frame(tmp_path, capsys):
    from asuka.pipelines._common import AnimatedImageWarning, load_image

    frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    gif = tmp_path / "anim.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with pytest.warns(AnimatedImageWarning, match="animated .3 frames.; only its first frame is used"):
        image = load_image(gif)
    assert float(image[0, 0].mean()) > 0.9 and float(image[0, 1].mean()) < -0.9  # red: the first frame
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "m.png")
    code, _, err = _run(capsys, "--image", gif, "--mask", tmp_path / "m.png", "--out", tmp_path / "o.png")
    assert code == 0 and any("warning:" in line and "animated" in line for line in err)


def _tiny_copy(tmp_path, name):
    import shutil

    from asuka.models.tiny import default_tiny_inpaint_dir

    return Path(shutil.copytree(default_tiny_inpaint_dir(), tmp_path / name))


def test_truncated_or_pickled_model_files_give_one_line(tmp_path, capsys):
    import os

    import torch

    images, masks = _folder(tmp_path, names=("a",), hole=True)  # a hole: the model is loaded
    truncated = _tiny_copy(tmp_path, "truncated")
    weights = truncated / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, _, err = _run(capsys, "--image", images / "a.png", "--mask", masks / "a.png", "--out", tmp_path / "o.png",
                        "--model", truncated, "--steps", "1")
    assert code == 1 and err[-1].startswith(f"asuka inpaint: error: --model: cannot load '{truncated}'")

    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'marker'}",)

    pickled = _tiny_copy(tmp_path, "pickled")
    (pickled / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"w": RunsCode()}, pickled / "unet" / "diffusion_pytorch_model.bin")
    code, _, err = _run(capsys, "--image", images / "a.png", "--mask", masks / "a.png", "--out", tmp_path / "o.png",
                        "--model", pickled, "--steps", "1")
    assert code == 1 and err[-1].startswith(f"asuka inpaint: error: --model: cannot load '{pickled}'")
    assert not (tmp_path / "marker").exists() and not (tmp_path / "o.png").exists()


def test_truncated_or_crafted_metric_weights_give_one_line(tmp_path):
    import os

    import torch

    from asuka.errors import InputError
    from asuka.metrics.inception import InceptionFeatures, save_random_inception_weights
    from asuka.metrics.lpips import LPIPS

    good = save_random_inception_weights(tmp_path / "inception.pth")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:4096])

    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'marker'}",)

    crafted = tmp_path / "crafted.pth"
    torch.save({"state_dict": {"w": RunsCode()}}, crafted)
    for path in (truncated, crafted):
        with pytest.raises(InputError) as info:
            InceptionFeatures(path)
        assert info.value.field == "inception_weights" and "\n" not in str(info.value)
        with pytest.raises(InputError) as info:
            LPIPS("alex", path)
        assert info.value.field == "lpips_weights" and "\n" not in str(info.value)
    assert not (tmp_path / "marker").exists()


def test_evaluate_leaves_unreadable_items_out_loudly(tmp_path, capsys):
    import json

    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    (data / "image").mkdir(parents=True)
    (data / "mask").mkdir()
    for key in ("k0", "k1", "k2"):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8)).save(data / "image" / f"{key}.png")
        mask = np.zeros((64, 64), np.uint8)
        mask[16:40, 16:40] = 255
        Image.fromarray(mask).save(data / "mask" / f"{key}.png")
    predictions = tmp_path / "predictions"
    predictions.mkdir()
    for key in ("k0", "k1", "k2"):
        (predictions / f"{key}.png").write_bytes((data / "image" / f"{key}.png").read_bytes())
    (data / "image" / "k1.png").write_bytes((data / "image" / "k1.png").read_bytes()[:150])  # truncated
    args = ["evaluate", "--data", str(data), "--predictions", str(predictions), "--metrics", "psnr,ssim"]
    code = main([*args, "--out", str(tmp_path / "out")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("asuka evaluate")]
    assert code == 1
    assert err[0].startswith("asuka evaluate: failed: k1: ") and "truncated" in err[0]
    assert err[-1].startswith("asuka evaluate: error: 1 item(s) could not be read and are not in the scores")
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["overall"]["n"] == 2
    code = main([*args, "--out", str(tmp_path / "out2"), "--fail-fast"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("asuka evaluate")]
    assert code == 1 and len(err) == 1 and "k1" in err[0] and "truncated" in err[0]

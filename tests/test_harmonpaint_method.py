"""The registered ``harmonpaint`` method: declarations and presets, the runner through the plumbing (API, CLI
inpaint and evaluate)."""

from __future__ import annotations

import inspect
import json
import sys

import pytest
import torch
from PIL import Image

from asuka.pipelines._registry import get_method

SIZE = 64
FAST = {"num_inference_steps": 3}  # t = 667 (structure phase), 334, 1 (style phase)


def test_declarations_presets_and_signature_defaults_agree():
    from asuka.pipelines.harmonpaint.pipeline import HarmonPaintPipeline
    from asuka.pipelines.harmonpaint.runner import HarmonPaintRunner

    spec = get_method("harmonpaint").spec
    defaults = spec.defaults()
    assert (defaults["tau"], defaults["lam"], defaults["division_eta"], defaults["num_inference_steps"],
            defaults["guidance_scale"]) == (0.1, 1.4, 0.6, 50, 7.5)
    assert defaults["sams_layers"] == (2, 3, 4, 5, 6) and defaults["makvs_layers"] == tuple(range(8, 16))
    assert spec.resolve("natural")["lam"] == 0.8 and spec.resolve("stylised")["lam"] == 1.4
    for cls in (HarmonPaintRunner, HarmonPaintPipeline):
        params = inspect.signature(cls.__call__).parameters
        for name in ("num_inference_steps", "guidance_scale"):
            assert params[name].default == defaults[name]
    assert [i.role for i in spec.inputs] == ["prompt", "negative_prompt"]


def test_registering_module_is_torch_free():
    import subprocess

    code = ("import sys; from asuka.pipelines._registry import get_method; get_method('harmonpaint'); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))


def test_api_run_with_paste_back_and_preset(tiny_inpaint_dir, files):
    from asuka.api import Inpainter
    from asuka.pipelines._common import load_image, load_mask

    inpainter = Inpainter("harmonpaint", model=tiny_inpaint_dir, preset="natural", options=FAST)
    out = inpainter(files / "photo.png", files / "photo_mask.png", inputs={"prompt": "a red boat"}, seed=0)
    image, mask = load_image(files / "photo.png"), load_mask(files / "photo_mask.png")
    keep = (mask < 0.5).expand_as(image)
    assert out.shape == image.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out[keep], image[keep], rtol=0, atol=0)
    assert not torch.equal(out[~keep], image[~keep])


def test_cli_inpaint_and_evaluate(tiny_inpaint_dir, files, tmp_path):
    from asuka.cli import main

    out = tmp_path / "result.png"
    assert main(["inpaint", "--method", "harmonpaint", "--model", str(tiny_inpaint_dir), "--image",
                 str(files / "photo.png"), "--mask", str(files / "photo_mask.png"), "--prompt", "a cat", "--preset",
                 "natural", "--steps", "3", "--set", "sams_variant=bg_bg", "--out", str(out)]) == 0
    assert Image.open(out).size == (SIZE, SIZE)
    data = tmp_path / "data" / "512"
    for sub, name in (("image", "photo.png"), ("mask", "photo_mask.png")):
        (data / sub).mkdir(parents=True)
        Image.open(files / name).save(data / sub / "0000.png")
    result = tmp_path / "eval"
    assert main(["evaluate", "--method", "harmonpaint", "--model", str(tiny_inpaint_dir), "--data",
                 str(tmp_path / "data"), "--out", str(result), "--steps", "2", "--limit", "1", "--no-progress"]) == 0
    metrics = json.loads((result / "metrics.json").read_text())
    assert metrics["settings"]["method"] == "harmonpaint" and metrics["overall"]["n"] == 1


def test_bad_option_is_a_field_error():
    from asuka.api import Inpainter
    from asuka.errors import InputError

    with pytest.raises(InputError) as err:
        Inpainter("harmonpaint", options={"sams_variant": "all"})
    assert err.value.field == "options.sams_variant"

"""``hd-painter`` through the registry: torch-free registration, the API (options, presets, per-item prompts,
paste-back), ``asuka inpaint --method hd-painter`` and ``asuka evaluate --method hd-painter`` with per-image prompts."""

from __future__ import annotations

import ast
import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from asuka.api import Inpainter
from asuka.cli import main
from asuka.errors import InputError
from asuka.pipelines._registry import get_method

ROOT = Path(__file__).resolve().parents[1]
FAST = {"num_inference_steps": 2, "working_long_side": 64}


def test_registration_is_torch_free_and_declares_the_official_defaults():
    package = ROOT / "asuka" / "pipelines" / "hd_painter"
    for module in ("__init__.py", "defaults.py"):                    # what `--list-methods` imports: no torch
        tree = ast.parse((package / module).read_text())
        imported = {node.module for node in tree.body if isinstance(node, ast.ImportFrom)}
        imported |= {alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
        assert imported <= {"__future__", "typing", "asuka.options", "asuka.pipelines._registry",
                            "asuka.pipelines.hd_painter.defaults"}, imported
    spec = get_method("hd-painter").spec
    defaults = spec.defaults()
    assert defaults["num_inference_steps"] == 50 and defaults["guidance_scale"] == 7.5 and defaults["eta"] == 0.1
    assert defaults["sigma_mode"] == "official" and defaults["working_long_side"] == 512
    from asuka.pipelines.hd_painter.runner import HDPainterRunner

    signature = inspect.signature(HDPainterRunner.__call__).parameters
    assert all(signature[name].default == value for name, value in defaults.items())
    assert spec.resolve("official-eval", None, None)["eta"] == 0.25


def _batch():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 48, 64, generator=g) * 2 - 1
    mask = torch.zeros(2, 1, 48, 64)
    mask[0, :, 8:40, 8:40] = 1
    mask[1, :, 16:48, 24:64] = 1
    return image, mask


def test_api_batch_with_per_item_prompts_equals_single_runs(tiny_inpaint_dir):
    inpainter = Inpainter("hd-painter", model=tiny_inpaint_dir, options=FAST)
    image, mask = _batch()
    prompts = [{"prompt": "a red boat"}, {"prompt": "a cat"}]
    both = inpainter(image, mask, inputs=prompts, seed=3)
    assert both.shape == image.shape
    known = (mask < 0.5).expand_as(image)
    assert torch.equal(both[known], image[known])                          # paste-back
    one = inpainter(image[:1], mask[:1], inputs=prompts[0], seed=3)
    two = inpainter(image[1:], mask[1:], inputs=prompts[1], seed=3)
    torch.testing.assert_close(both, torch.cat([one, two]), atol=1e-5, rtol=0)
    with pytest.raises(InputError) as err:
        Inpainter("hd-painter", options={"sigma_mode": "cumulative"})
    assert err.value.field == "options.sigma_mode"


def test_cli_inpaint_and_evaluate_with_per_image_prompts(tiny_inpaint_dir, tmp_path, capsys):
    data = tmp_path / "data"
    (data / "image").mkdir(parents=True)
    (data / "mask").mkdir()
    rng = np.random.default_rng(0)
    for stem in ("boat", "cat"):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(data / "image" / f"{stem}.png")
        m = np.zeros((48, 64), np.uint8)
        m[8:40, 16:56] = 255
        Image.fromarray(m).save(data / "mask" / f"{stem}.png")
    prompts = data / "prompts.json"
    prompts.write_text(json.dumps({"boat": "a red boat", "cat": "a cat"}))
    flags = ["--model", str(tiny_inpaint_dir), "--steps", "1", "--set", "working_long_side=64"]
    out = tmp_path / "out"
    code = main(["inpaint", "--method", "hd-painter", "--image", str(data / "image"), "--mask", str(data / "mask"),
                 "--prompt", str(prompts), "--out", str(out), *flags])
    assert code == 0 and sorted(p.name for p in out.iterdir()) == ["boat.png", "cat.png"]
    report = tmp_path / "eval"
    code = main(["evaluate", "--method", "hd-painter", "--data", str(data), "--prompt", str(prompts), "--out",
                 str(report), "--metrics", "psnr", "--no-progress", *flags])
    assert code == 0 and (report / "metrics.json").is_file()
    assert sorted(p.stem for p in (report / "predictions").glob("*.png")) == ["boat", "cat"]
    code = main(["inpaint", "--method", "hd-painter", "--set", "sigma_mode=cumulative", *flags])
    assert code != 0 and "--set sigma_mode" in capsys.readouterr().err


def test_sr_after_any_method(tiny_inpaint_dir, tmp_path, capsys):
    from asuka.models.tiny_upscaler import save_tiny_upscaler

    upscaler = save_tiny_upscaler(tmp_path / "x4")
    image, mask = _batch()
    sr_options = {"output_long_side": 128, "pad_multiple": 32, "num_inference_steps": 1}
    painter = Inpainter("sd", model=tiny_inpaint_dir, options={"num_inference_steps": 1}, sr=upscaler,
                        sr_options=sr_options)
    out = painter(image, mask, inputs=[{"prompt": "a red boat"}, {"prompt": "a cat"}], seed=0)
    assert out.shape == (2, 3, 96, 128) and float(out.min()) >= -1 and float(out.max()) <= 1
    assert painter.settings()["sr"] == str(upscaler)
    code = main(["inpaint", "--method", "sd", "--model", str(tiny_inpaint_dir), "--steps", "1", "--sr",
                 str(tmp_path / "missing"), "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert code != 0 and "--sr" in err and "Traceback" not in err

"""The registered ``pilot`` method: declarations, presets, the runner through the plumbing (API, CLI, evaluate) and
the builder's optional ControlNet / T2I-Adapter / IP-Adapter / LoRA weights."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from PIL import Image

from asuka.pipelines._registry import get_method

SIZE = 64
FAST = {"num_inference_steps": 2, "op_interval": 1, "num_gradient_ops": 1}


@pytest.fixture(scope="module")
def adapters(sd_dir, tmp_path_factory):
    """Tiny ControlNet folder, IP-Adapter weight file (with its image encoder) and LoRA file for the tiny UNet."""
    from diffusers import UNet2DConditionModel

    from asuka.models.tiny_adapters import LORA_WEIGHT_NAME, save_tiny_controlnet, save_tiny_lora
    from asuka.models.tiny_ip_adapter import WEIGHT_NAMES, save_tiny_ip_adapter

    root = tmp_path_factory.mktemp("pilot-adapters")
    unet = UNet2DConditionModel.from_pretrained(sd_dir, subfolder="unet")
    return {"controlnet": save_tiny_controlnet(root / "cn", unet),
            "ip_adapter": save_tiny_ip_adapter(root / "ipa", unet) / "models" / WEIGHT_NAMES["ip-adapter"],
            "lora": save_tiny_lora(root / "lora", unet) / LORA_WEIGHT_NAME}


def test_declarations_presets_and_runner_defaults_agree():
    from asuka.pipelines.pilot.pipeline import PilotInpaintPipeline
    from asuka.pipelines.pilot.runner import PilotRunner

    spec = get_method("pilot").spec
    defaults = spec.defaults()
    runner = inspect.signature(PilotRunner.__call__).parameters
    pipeline = inspect.signature(PilotInpaintPipeline.__call__).parameters
    for name, value in defaults.items():
        assert runner[name].default == value, name
        if name in pipeline:
            assert pipeline[name].default == value, name
    assert {p.name for p in spec.presets} == {"t2i_step100", "t2i_step200", "controlnet_step100", "ipa_step100",
                                              "ipa_controlnet_step100"}
    paper = spec.resolve(None, None, None)
    assert (paper["num_inference_steps"], paper["op_interval"], paper["num_gradient_ops"], paper["gamma"],
            paper["guidance_scale"]) == (200, 10, 10, 1.0, 7.5)
    step200 = spec.resolve("t2i_step200", None, None)
    assert (step200["num_inference_steps"], step200["op_interval"], step200["num_gradient_ops"]) == (200, 20, 20)
    both = spec.resolve("ipa_controlnet_step100", None, None)
    assert (both["gamma"], both["ip_adapter_scale"], both["controlnet_conditioning_scale"]) == (0.8, 0.4, 0.8)


def test_api_run_with_paste_back(sd_dir, files):
    from asuka.api import Inpainter
    from asuka.pipelines._common import load_image, load_mask

    out = Inpainter("pilot", model=sd_dir, options=FAST)(files / "photo.png", files / "photo_mask.png",
                                                          inputs={"prompt": "a cat"}, seed=0)
    image, mask = load_image(files / "photo.png"), load_mask(files / "photo_mask.png")
    keep = (mask < 0.5).expand_as(image)
    assert out.shape == image.shape
    torch.testing.assert_close(out[keep], image[keep], rtol=0, atol=0)
    assert not torch.equal(out[~keep], image[~keep])


def test_cli_inpaint_with_adapters_and_evaluate(sd_dir, files, adapters, tmp_path):
    from asuka.cli import main

    out = tmp_path / "result.png"
    assert main(["inpaint", "--method", "pilot", "--model", str(sd_dir), "--image", str(files / "photo.png"),
                 "--mask", str(files / "photo_mask.png"), "--prompt", "a cat", "--preset", "ipa_controlnet_step100",
                 "--steps", "2", "--set", "op_interval=1", "--set", "num_gradient_ops=1", "--out", str(out),
                 "--controlnet", str(adapters["controlnet"]), "--control-image", str(files / "control.png"),
                 "--ip-adapter", str(adapters["ip_adapter"]), "--ip-adapter-image", str(files / "control.png"),
                 "--lora", str(adapters["lora"])]) == 0
    assert Image.open(out).size == (SIZE, SIZE)
    data = tmp_path / "data" / "512"
    for sub, name in (("image", "photo.png"), ("mask", "photo_mask.png")):
        (data / sub).mkdir(parents=True)
        Image.open(files / name).save(data / sub / "0000.png")
    result = tmp_path / "eval"
    assert main(["evaluate", "--method", "pilot", "--model", str(sd_dir), "--data", str(tmp_path / "data"), "--out",
                 str(result), "--steps", "2", "--set", "op_interval=1", "--limit", "1", "--no-progress"]) == 0
    metrics = json.loads((result / "metrics.json").read_text())
    assert metrics["settings"]["method"] == "pilot" and metrics["overall"]["n"] == 1


def test_bad_option_weights_and_inference_mode_are_field_errors(sd_dir, files):
    from asuka.api import Inpainter
    from asuka.errors import InputError

    with pytest.raises(InputError) as err:
        Inpainter("pilot", options={"gamma": 1.5})
    assert err.value.field == "options.gamma"
    with pytest.raises(InputError) as err:
        get_method("pilot").load(sd_dir, weights={"lora": files / "missing.safetensors"})
    assert err.value.field == "weights.lora"
    painter = Inpainter("pilot", model=sd_dir, options=FAST)
    with pytest.raises(InputError) as err, torch.inference_mode():
        painter(files / "photo.png", files / "photo_mask.png", seed=0)
    assert err.value.field == "num_gradient_ops"


def test_builder_loads_controlnet_ip_adapter_and_lora(sd_dir, files, adapters):
    from asuka.pipelines._common import load_image, load_mask
    from asuka.pipelines.pilot.runner import build_pilot

    runner = build_pilot(sd_dir, device=torch.device("cpu"), dtype=torch.float32, **adapters)
    assert runner.multiple == 64 and runner.pipe.controlnet is not None and runner.pipe.image_encoder is not None
    image, mask = load_image(files / "photo.png"), load_mask(files / "photo_mask.png")
    control = load_image(files / "control.png")
    defaults = {**get_method("pilot").spec.defaults(), **FAST}

    def run(**kw):
        return runner(image, mask, generator=[torch.Generator().manual_seed(0)], progress_bar=False,
                      prompt=["a cat"], control_image=control, ip_adapter_image=[control], **{**defaults, **kw})

    out = run()
    assert out.shape == image.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, run(lora_scale=0.0))  # the option reaches the loaded LoRA
    # a batch whose items have different IP-Adapter images runs item by item, equal to single runs
    pair = runner(image.expand(2, -1, -1, -1), mask.expand(2, -1, -1, -1), progress_bar=False,
                  generator=[torch.Generator().manual_seed(0) for _ in range(2)], prompt=["a cat"] * 2,
                  control_image=control.expand(2, -1, -1, -1), ip_adapter_image=[control, image], **defaults)
    torch.testing.assert_close(pair[:1], out, rtol=0, atol=0)
    assert not torch.allclose(pair[1:], out)
